"""The trainer with ``model.family: flux2``: recipes/configs/tiny_flux2_cpu.yaml's path end to end on
tiny random FLUX.2 components; the LoRA file it writes loads into the stock pipeline and changes
the output."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

pytest.importorskip("diffusers")

from diffusers import Flux2KleinPipeline  # noqa: E402

from mosaic_kit.pipelines.tiny_flux2 import TINY_FLUX2_TEXT_OUT_LAYERS, tiny_flux2_components  # noqa: E402
from mosaic_kit.training import MosaicTrainer, config_from_dict  # noqa: E402

CONFIG = Path(__file__).resolve().parents[2] / "recipes" / "configs" / "tiny_flux2_cpu.yaml"


def _config(tmp_path, **train):
    raw = yaml.safe_load(CONFIG.read_text())
    raw.update(output_dir=str(tmp_path / "run"), **train)
    return config_from_dict(raw)


def test_tiny_flux2_config_trains_and_the_stock_pipeline_loads_its_lora(tmp_path):
    threads = torch.get_num_threads()
    try:
        trainer = MosaicTrainer(_config(tmp_path, max_steps=12, checkpoint_every=12, log_every=4))
        summary = trainer.train()
    finally:
        torch.set_num_threads(threads)
    assert type(trainer.family).__name__ == "Flux2Family" and summary["steps"] == 12
    import json

    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    history = [row for row in history if "scal" in row]
    assert history and all(np.isfinite(row["scal"]) and row["scal"] > 0 for row in history)
    assert (tmp_path / "run" / "samples" / "step-0000012.png").is_file()  # sampled by the stock pipeline

    prompt, refs = "a red star", [trainer.validation_dataset()[0].references[0]]
    from mosaic_kit.utils import tensor_to_pil

    images = [tensor_to_pil(r) for r in refs]

    def generate(pipe):
        pipe.set_progress_bar_config(disable=True)
        out = pipe(image=images, prompt=prompt, height=64, width=64, num_inference_steps=2, output_type="np",
                   generator=torch.Generator().manual_seed(0), max_sequence_length=32,
                   text_encoder_out_layers=TINY_FLUX2_TEXT_OUT_LAYERS)
        return out.images[0]

    base = Flux2KleinPipeline(**tiny_flux2_components(seed=0))
    before = generate(base)
    base.load_lora_weights(str(tmp_path / "run"))  # the trainer's pytorch_lora_weights.safetensors
    after = generate(base)
    assert not np.array_equal(before, after)
    base.disable_lora()
    assert np.array_equal(generate(base), before)


def test_unknown_family_is_refused():
    with pytest.raises(ValueError, match="model.family"):
        config_from_dict({"model": {"family": "flux3"}})
