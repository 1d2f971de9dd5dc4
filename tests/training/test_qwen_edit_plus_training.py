"""The trainer with ``model.family: qwen_edit_plus``: recipes/configs/tiny_qwen_edit_plus_cpu.yaml's
path end to end on tiny random components (validation sheet sampled by the stock pipeline); the
LoRA file it writes loads into a fresh stock `QwenImageEditPlusPipeline` and changes its output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

pytest.importorskip("diffusers")

from mosaic_kit.models.qwen import QwenEditPlusFamily  # noqa: E402
from mosaic_kit.training import MosaicTrainer, config_from_dict  # noqa: E402
from mosaic_kit.utils import tensor_to_pil  # noqa: E402

CONFIG = Path(__file__).resolve().parents[2] / "recipes" / "configs" / "tiny_qwen_edit_plus_cpu.yaml"


@pytest.mark.slow  # about 12 s on one CPU thread (the trainer's set-up, 6 steps, a validation sheet)
def test_tiny_qwen_edit_plus_config_trains_and_the_stock_pipeline_loads_its_lora(tmp_path):
    raw = yaml.safe_load(CONFIG.read_text())
    raw.update(output_dir=str(tmp_path / "run"), max_steps=6, checkpoint_every=6, log_every=2, validation_samples=1,
               validation_steps=1)
    threads = torch.get_num_threads()
    try:
        trainer = MosaicTrainer(config_from_dict(raw))
        summary = trainer.train()
    finally:
        torch.set_num_threads(threads)
    assert type(trainer.family).__name__ == "QwenEditPlusFamily" and summary["steps"] == 6
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 3 and all(np.isfinite(row["scal"]) and row["scal"] > 0 for row in history)
    assert (tmp_path / "run" / "samples" / "step-0000006.png").is_file()  # sampled by the stock pipeline

    stock = QwenEditPlusFamily.tiny(seed=raw["model"]["tiny_seed"])  # a fresh stock pipeline, same base
    references = [tensor_to_pil(r) for r in trainer.validation_dataset()[0].references]

    def run():
        with stock.image_sizes():
            return stock.pipe(image=references, prompt="a red star", height=32, width=32, num_inference_steps=2,
                              true_cfg_scale=1.0, generator=torch.Generator().manual_seed(0), output_type="pt").images

    base = run()
    stock.pipe.load_lora_weights(str(tmp_path / "run"))
    assert not torch.equal(run(), base)
    stock.pipe.disable_lora()
    assert torch.equal(run(), base)
