"""``model.lora_format: comfyui``: the trainer writes the LoRA in ComfyUI's key names beside the
diffusers file (and beside the EMA file), holding the same LoRA; config checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("diffusers")

from diffusers import Flux2KleinPipeline  # noqa: E402

from mosaic_kit.models import read_lora_file  # noqa: E402
from mosaic_kit.training import (  # noqa: E402
    COMFYUI_LORA_FILE,
    EMA_COMFYUI_LORA_FILE,
    EMA_LORA_FILE,
    LORA_FILE,
    MosaicTrainer,
    config_from_dict,
)

CONFIG = Path(__file__).resolve().parents[2] / "recipes" / "configs" / "tiny_flux2_cpu.yaml"


def _raw(tmp_path, **model):
    raw = yaml.safe_load(CONFIG.read_text())
    raw.update(output_dir=str(tmp_path / "run"), max_steps=2, checkpoint_every=2, log_every=1,
               validation_samples=0, ema_decay=0.5)
    raw["model"].update(lora_rank=2, **model)
    raw["data"].update(batch_size=1, synthetic_refs=[1, 2], max_refs=2)
    return raw


def test_comfyui_lora_format_writes_the_same_lora_beside_the_diffusers_file(tmp_path):
    threads = torch.get_num_threads()
    try:
        summary = MosaicTrainer(config_from_dict(_raw(tmp_path, lora_format="comfyui", lora_alpha=4))).train()
    finally:
        torch.set_num_threads(threads)
    run = tmp_path / "run"
    assert summary["comfyui_lora"] == str(run / COMFYUI_LORA_FILE)
    for diffusers_name, comfy_name in ((LORA_FILE, COMFYUI_LORA_FILE), (EMA_LORA_FILE, EMA_COMFYUI_LORA_FILE)):
        comfy = read_lora_file(run / comfy_name)
        assert comfy and all(k.startswith("lora_unet_") for k in comfy)
        # diffusers reads the ComfyUI file (kohya converter): the diffusers file's LoRA, alpha/rank folded
        back = Flux2KleinPipeline.lora_state_dict(str(run), weight_name=comfy_name)
        state, metadata = Flux2KleinPipeline.lora_state_dict(str(run), weight_name=diffusers_name,
                                                             return_lora_metadata=True)
        scale = metadata["transformer.lora_alpha"] / metadata["transformer.r"]
        assert scale == 2
        expected = {k: v * scale if ".lora_B." in k else v for k, v in state.items()}
        assert sorted(back) == sorted(expected)
        assert all(torch.equal(back[k], expected[k]) for k in expected)
    assert json.loads((run / "summary.json").read_text())["comfyui_lora"].endswith(COMFYUI_LORA_FILE)


def test_lora_format_is_checked(tmp_path):
    assert config_from_dict(_raw(tmp_path)).model.lora_format == "diffusers"  # the default
    with pytest.raises(ValueError, match=r"`model.lora_format` to be one of \['diffusers', 'comfyui'\], but got 'kohya'"):
        config_from_dict({"model": {"lora_format": "kohya"}})
    assert config_from_dict({"model": {"family": "flux1", "lora_format": "comfyui"}}).model.lora_format == "comfyui"
