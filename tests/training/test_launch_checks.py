"""Settings that used to fail late or with a raw error: a FLUX.2 ``data.ref_size`` below what the
stock pipeline takes (refused at config time instead of in the validation sheet after training),
and ``fsdp: true`` under a plain ``python`` (one process: trains in a single-process group instead
of torch's raw "RANK expected")."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")

from mosaic_kit.training import MosaicTrainer, config_from_dict  # noqa: E402
from mosaic_kit.models.flux2 import Flux2Family  # noqa: E402

FLUX2_MIN_REFERENCE_SIDE = Flux2Family.min_sample_reference_side
from mosaic_kit.training.fsdp import shard_linear_units  # noqa: E402


def test_the_minimum_is_the_stock_flux2_pipelines_own():
    from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor

    side = FLUX2_MIN_REFERENCE_SIDE
    Flux2ImageProcessor.check_image_input(Image.new("RGB", (side, side)))
    with pytest.raises(ValueError, match="too small"):
        Flux2ImageProcessor.check_image_input(Image.new("RGB", (side - 16, side - 16)))  # the next multiple of 16


@pytest.mark.parametrize("ref_size", [16, 32, 48])
def test_flux2_references_below_64_px_are_refused_at_config_time(ref_size):
    with pytest.raises(ValueError, match="data.ref_size.*>= 64.*flux2") as error:
        config_from_dict({"model": {"family": "flux2"}, "data": {"ref_size": ref_size}, "validation_samples": 1})
    message = str(error.value)
    assert f"got {ref_size}" in message and "check_image_input" in message and "validation_samples: 0" in message


@pytest.mark.parametrize("values", [
    {"model": {"family": "flux2"}, "data": {"ref_size": 64}},
    {"model": {"family": "flux2"}, "data": {"ref_size": 32}, "validation_samples": 0},  # no sheet: no stock pipeline
    {"model": {"family": "flux1"}, "data": {"ref_size": 32}},  # FLUX.1 samples through mosaic_kit's pipeline
    {"model": {"family": "flux2"}, "data": {"kind": "manifest", "root": "m.jsonl", "ref_size": 32}},  # files' sizes
])
def test_settings_the_stock_pipeline_takes_are_accepted(values):
    config_from_dict(values)


@pytest.mark.parametrize("bad", [-1, 1.5, "2", True])
def test_validation_samples_must_be_a_non_negative_int(bad):
    with pytest.raises(ValueError, match="validation_samples"):
        config_from_dict({"validation_samples": bad})


FAST = {"max_steps": 2, "checkpoint_every": 2, "log_every": 1, "validation_samples": 0, "tracker": None,
        "ema_decay": None, "mixed_precision": "no", "cpu_threads": 1,
        "model": {"lora_rank": 4, "gradient_checkpointing": False,
                  "tiny_overrides": {"num_layers": 1, "num_single_layers": 1}},
        "data": {"target_size": 64, "ref_size": 32, "batch_size": 1, "synthetic_refs": [1, 2]}}


def _run(tmp_path, name: str, **changes) -> tuple[list[dict], list[int]]:
    """The logged history, and the process group's size at every step (0: none)."""
    config = config_from_dict({**FAST, "output_dir": str(tmp_path / name), **changes})
    dist, sizes = torch.distributed, []
    threads = torch.get_num_threads()
    try:
        MosaicTrainer(config, on_step_end=lambda trainer, step: sizes.append(
            dist.get_world_size() if dist.is_initialized() else 0)).train()
    finally:
        torch.set_num_threads(threads)
    history = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return history, sizes


def test_fsdp_under_a_plain_python_trains_in_a_single_process_group(tmp_path):
    """One process with `fsdp: true` and no launcher: before, torch's "RANK expected"; now a
    world-size-1 group, the FSDP2 path (LoRA-only checkpoint with the gathered optimiser state),
    and the same losses and LoRA as the same run without FSDP."""
    from safetensors.torch import load_file

    dist = torch.distributed
    assert not dist.is_initialized()
    try:
        sharded, sizes = _run(tmp_path, "fsdp", fsdp=True)
    finally:
        if dist.is_initialized():  # the test's own clean-up, should the run fail before its end
            dist.destroy_process_group()
    assert sizes == [1, 1]  # a group of one process while training (accelerate's end_training frees it)
    plain, sizes = _run(tmp_path, "plain")
    assert sizes == [0, 0]
    assert [r["step"] for r in sharded] == [r["step"] for r in plain] == [1, 2]
    for got, expected in zip(sharded, plain):
        for key in ("loss", "flow_matching", "scal", "mdl"):
            assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-7), (key, got, expected)
    assert (tmp_path / "fsdp" / "checkpoints" / "step-0000002" / "fsdp_optimizer.pt").is_file()
    one, two = (load_file(str(tmp_path / name / "pytorch_lora_weights.safetensors")) for name in ("plain", "fsdp"))
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-6)


def test_several_processes_without_a_process_group_are_refused():
    assert not torch.distributed.is_initialized()
    with pytest.raises(ValueError, match="process group of 2 processes"):
        shard_linear_units(torch.nn.Sequential(torch.nn.Linear(2, 2)), "cpu", 2)
