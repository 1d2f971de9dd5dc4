"""The doctests of `mosaic_kit.models.quantize` quantize with torchao, the optional ``quant`` extra
(``bash scripts/setup.sh quant``): without it they are skipped, and CI runs them in its
quantization step after installing the extra."""

import importlib.util

import pytest


@pytest.fixture(autouse=True)
def _torchao_for_quantize_doctests(request):
    if request.node.nodeid.startswith("mosaic_kit/models/quantize.py::") and importlib.util.find_spec("torchao") is None:
        pytest.skip("needs torchao (the `quant` extra: bash scripts/setup.sh quant)")
