"""``model.quantize: int8`` (torchao int8 weight-only through diffusers' ``TorchAoConfig``): the
trainer trains the LoRA on a quantized frozen FLUX.2 base on the CPU, its losses stay close to the
unquantized run's, and its LoRA file loads into the unquantized stock pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from helpers import train_in_process

pytest.importorskip("diffusers")
pytest.importorskip("torchao")

from diffusers import Flux2KleinPipeline  # noqa: E402

from mosaic_kit.models import read_lora_file  # noqa: E402
from mosaic_kit.pipelines.tiny_flux2 import tiny_flux2_components  # noqa: E402
from mosaic_kit.training import LORA_FILE, config_from_dict  # noqa: E402

CONFIG = Path(__file__).resolve().parents[2] / "recipes" / "configs" / "tiny_flux2_cpu.yaml"

LOSS_BOUND = 5e-3
"""Bound on |loss(int8) − loss(none)| / loss(none) at every step of the same run (measured on the
CPU: at most 4.1e-4 over 8 steps for FLUX.2, 3.1e-4 for FLUX.1's tiny config)."""


def _run(tmp_path, quantize: str) -> tuple[list[float], Path]:
    raw = yaml.safe_load(CONFIG.read_text())
    out = tmp_path / quantize
    raw.update(output_dir=str(out), max_steps=3, checkpoint_every=3, log_every=1, validation_samples=0, ema_decay=None)
    raw["model"].update(quantize=quantize, lora_rank=4)
    trainer = train_in_process(raw)
    assert getattr(trainer.family.transformer, "is_quantized", False) == (quantize != "none")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [row["loss"] for row in rows if "loss" in row], out


def test_int8_base_trains_close_to_the_unquantized_run_and_its_lora_loads_in_the_stock_pipeline(tmp_path):
    plain, _ = _run(tmp_path, "none")
    quantized, out = _run(tmp_path, "int8")
    assert len(plain) == len(quantized) == 3
    worst = max(abs(q - p) / abs(p) for p, q in zip(plain, quantized))
    assert 0 < worst < LOSS_BOUND  # close, and not the same run by accident
    lora = read_lora_file(out / LORA_FILE)
    assert sorted(lora) == sorted(read_lora_file(tmp_path / "none" / LORA_FILE))
    pipe = Flux2KleinPipeline(**tiny_flux2_components())  # unquantized stock pipeline
    pipe.load_lora_weights(str(out))
    loaded = {k.replace(".default_0", ""): v for k, v in pipe.transformer.state_dict().items() if ".lora_" in k}
    assert sorted(loaded) == sorted(k.removeprefix("transformer.") for k in lora)


def test_quantize_setting_is_checked():
    with pytest.raises(ValueError, match=r"`model.quantize` to be one of .* but got 'int4'"):
        config_from_dict({"model": {"quantize": "int4"}})
    with pytest.raises(ValueError, match="`model.trainable: lora` with `model.quantize: int8`"):
        config_from_dict({"model": {"quantize": "int8", "trainable": "all"}})
    assert config_from_dict({"model": {"quantize": "nf4"}}).model.quantize == "nf4"  # built only on a GPU
