"""Offload (``model.offload_encoders``, ``model.group_offload``): the encoders sit on the CPU and
move onto the training device only while encoding or decoding; diffusers' group offloading of the
transformer; the same losses as without (CPU: onload and offload devices are both the CPU, so these
tests check the moves and the results, not the memory)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")

from mosaic_kit.data import SyntheticWorld, SyntheticWorldConfig, collate_samples  # noqa: E402
from mosaic_kit.models.encoders import encoder_modules, enable_encoder_offload  # noqa: E402
from mosaic_kit.pipelines.registry import build_family  # noqa: E402
from mosaic_kit.training import MosaicTrainer, config_from_dict  # noqa: E402
from mosaic_kit.training.offload import apply_offload  # noqa: E402


def _config(out: Path, family: str, **model) -> object:
    return config_from_dict({
        "output_dir": str(out), "max_steps": 2, "mixed_precision": "no", "log_every": 1, "checkpoint_every": 2,
        "validate_every": 0, "validation_samples": 0, "tracker": None, "ema_decay": 0.9, "cpu_threads": 1,
        "model": {"family": family, "lora_rank": 4, "gradient_checkpointing": True, **model},
        "data": {"target_size": 32, "ref_size": 64, "batch_size": 2, "synthetic_length": 4, "synthetic_refs": [1, 2]}})


def _losses(config) -> tuple[list[float], MosaicTrainer]:
    trainer = MosaicTrainer(config, progress=False)
    trainer.train()
    lines = (Path(config.output_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines], trainer


@pytest.mark.parametrize(("family", "group"), [("flux2", "block_level"), ("flux1", "leaf_level")])
def test_offloaded_training_gives_the_same_losses(tmp_path, family, group):
    plain, _ = _losses(_config(tmp_path / "plain", family))
    offloaded, trainer = _losses(_config(tmp_path / "offloaded", family, offload_encoders=True, group_offload=group))
    assert plain == offloaded and len(plain) == 2
    hooked = [name for name, module in trainer.family.transformer.named_modules()
              if getattr(module, "_diffusers_hook", None) is not None
              and module._diffusers_hook.get_hook("group_offloading") is not None]
    assert hooked  # diffusers' group-offloading hooks are on the transformer


def test_encoders_are_on_the_device_only_while_encoding_and_decoding(monkeypatch):
    family = build_family("flux2", seed=0)
    moves = []
    for module in encoder_modules(family):
        original = module.to

        def to(*args, _module=module, _original=original, **kwargs):
            moves.append((type(_module).__name__, str(torch.device(args[0]))))
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, "to", to)
    names = sorted(type(m).__name__ for m in encoder_modules(family))
    assert names == ["AutoencoderKLFlux2", "Qwen3ForCausalLM"]
    enable_encoder_offload(family, "cpu")
    assert sorted(moves) == [(name, "cpu") for name in names] and family.device == torch.device("cpu")
    moves.clear()
    world = SyntheticWorld(SyntheticWorldConfig(image_size=32, ref_size=64, min_refs=1, max_refs=1))
    inputs = family.encode_batch(collate_samples([world.sample(0)], 32, 64, vae_scale_factor=family.vae_scale_factor))
    assert [device for _, device in moves] == ["cpu"] * 4  # onto the device, then back (both the CPU here)
    assert {name for name, _ in moves[:2]} == {name for name, _ in moves[2:]} == set(names)
    moves.clear()
    family.decode(inputs.target, 32, 32)
    assert len(moves) == 4


def test_offload_settings_are_refused_where_they_cannot_work(tmp_path):
    with pytest.raises(ValueError, match=r"model.group_offload.*\('leaf_level',\).*flux1.*never its forward"):
        _config(tmp_path, "flux1", group_offload="block_level")
    with pytest.raises(ValueError, match="model.group_offload"):
        _config(tmp_path, "flux2", group_offload="disk")
    with pytest.raises(ValueError, match="model.group_offload_blocks"):
        _config(tmp_path, "flux2", group_offload="block_level", group_offload_blocks=0)
    cached = _config(tmp_path, "flux2", offload_encoders=True)
    with pytest.raises(ValueError, match="offload_encoders: false.*data.cache_dir"):
        config_from_dict({"model": {"family": "flux2", "offload_encoders": True}, "data": {"cache_dir": "c"}})
    with pytest.raises(ValueError, match="one training process"):
        apply_offload(build_family("flux2", seed=0), _config(tmp_path, "flux2", group_offload="leaf_level").model,
                      "cpu", processes=2)
    with pytest.raises(ValueError, match="built without them"):
        apply_offload(build_family("flux2", seed=0, encoders=False), cached.model, "cpu")
