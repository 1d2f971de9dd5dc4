"""``model.quantize`` in the config: accepted for every registered family (each family's builders,
``tiny`` and ``from_pretrained``, take ``quantize``), refused with ``model.trainable`` other than
``lora``. Needs no torchao: the config is only checked here (the quantized models are tested in
tests/models/test_quantize.py, CI's quant step)."""

from __future__ import annotations

import pytest

from mosaic_kit.pipelines import family_names, get_family
from mosaic_kit.training import config_from_dict


def _raw(tmp_path, family: str, **model) -> dict:
    return {"output_dir": str(tmp_path / "run"), "model": {"family": family, "base": None, **model}}


@pytest.mark.parametrize("name", family_names())
def test_model_quantize_is_accepted_for_every_family(tmp_path, name):
    assert "quantize" in get_family(name).config_extras
    assert config_from_dict(_raw(tmp_path, name, quantize="int8")).model.quantize == "int8"


def test_model_quantize_needs_a_lora_only_run(tmp_path):
    with pytest.raises(ValueError, match=r"`model.trainable: lora` with `model.quantize: int8`"):
        config_from_dict(_raw(tmp_path, "qwen_edit_plus", quantize="int8", trainable="all"))
