"""Doctests of the extractors that need an optional dependency skip when it is missing."""

import pytest

_OPTIONAL = {"dinov2.py": "transformers", "diffusion.py": "diffusers", "dit.py": "diffusers"}


@pytest.fixture(autouse=True)
def _skip_without_optional_dependency(request):
    module = _OPTIONAL.get(request.node.path.name)
    if module is not None:
        pytest.importorskip(module)
