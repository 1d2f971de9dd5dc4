"""The training config's synthetic-world settings (data.synthetic_world, data.synthetic_validation)
reach the worlds the trainer trains and validates on."""

from __future__ import annotations

import pytest

from mosaic_kit.data import HELD_OUT_IDENTITIES, TRAIN_IDENTITIES
from mosaic_kit.training import config_from_dict
from mosaic_kit.training.datasets import build_dataset

WORLD = {"identity_range": [0, 8], "subject_style": "two_tone", "background": "plain", "occlusion": 0.0}


def _data(**data):
    return config_from_dict({"data": {"target_size": 32, "ref_size": 16, "synthetic_length": 4, **data}})


def test_world_settings_reach_the_training_and_validation_worlds():
    config = _data(synthetic_world=WORLD)
    train = build_dataset(config).world.config
    held = build_dataset(config, validation=True).world.config
    assert (train.identity_range, train.subject_style, train.background, train.occlusion) == ((0, 8), "two_tone", "plain", 0.0)
    assert held.identity_range == HELD_OUT_IDENTITIES and held.subject_style == "two_tone" and held.seed == train.seed + 1
    seen = build_dataset(_data(synthetic_world=WORLD, synthetic_validation="seen"), validation=True).world.config
    assert seen.identity_range == (0, 8) and seen.seed == train.seed + 1  # the trained subjects, new layouts
    assert all(0 <= i < 8 for i in build_dataset(config)[0].meta["identities"])
    assert "on a plain background" in build_dataset(config)[1].caption
    default = build_dataset(_data()).world.config  # without the settings: the world as before
    assert default.identity_range == TRAIN_IDENTITIES and default.subject_style == "textured"


@pytest.mark.parametrize("data, match", [
    ({"synthetic_world": {"image_size": 64}}, "data.synthetic_world"),
    ({"synthetic_world": {"colours": 2}}, "Unknown settings in `data.synthetic_world`"),
    ({"synthetic_world": [1, 2]}, "data.synthetic_world"),
    ({"synthetic_validation": "train"}, "data.synthetic_validation"),
])
def test_bad_world_settings_name_the_setting(data, match):
    with pytest.raises(ValueError, match=match):
        _data(**data)


def test_validation_samples_use_the_configured_guidance(tmp_path, monkeypatch):
    from mosaic_kit.models import MosaicFluxFamily
    from mosaic_kit.training import MosaicTrainer

    seen = []
    original = MosaicFluxFamily.sample

    def recording(self, *args, guidance_scale=None, **kwargs):
        seen.append(guidance_scale)
        return original(self, *args, guidance_scale=guidance_scale, **kwargs)

    monkeypatch.setattr(MosaicFluxFamily, "sample", recording)
    config = config_from_dict({
        "output_dir": str(tmp_path / "run"), "max_steps": 1, "validate_every": 1, "validation_samples": 1,
        "validation_steps": 1, "validation_guidance": 1.0, "tracker": None, "mixed_precision": "no",
        "ema_decay": None, "cpu_threads": 1,
        "model": {"base": None, "lora_rank": 2, "pixel_space": 2,
                  "tiny_overrides": {"num_layers": 1, "num_single_layers": 1, "num_attention_heads": 2}},
        "data": {"target_size": 32, "ref_size": 16, "batch_size": 1, "synthetic_world": WORLD},
    })
    MosaicTrainer(config).train()
    assert seen and set(seen) == {1.0}
    assert (tmp_path / "run" / "samples").is_dir()
    for bad in (-1.0, "high", True):
        with pytest.raises(ValueError, match="validation_guidance"):
            config_from_dict({"validation_guidance": bad})
