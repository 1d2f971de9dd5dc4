"""FSDP: with every linear layer its own unit the multi-reference forward and its gradients are
exact (two CPU processes, gloo; FSDP1 here, FSDP2 in the trainer), and the trainer under FSDP2
logs the same losses as one process on the same global batch, writes LoRA-only checkpoints and
resumes from them exactly."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from helpers import free_port, run_two_process_script

pytest.importorskip("diffusers")

SCRIPT = r'''
import os, sys, torch, torch.distributed as dist, torch.multiprocessing as mp

def run(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from mosaic_kit.models import MosaicFluxTransformer, add_reference_lora
    from mosaic_kit.models.testing import random_packed_inputs, tiny_flux_transformer
    transformer = tiny_flux_transformer()
    torch.manual_seed(0)  # the same LoRA initialisation on both ranks
    add_reference_lora(transformer, rank=4)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    model = MosaicFluxTransformer(transformer)
    inputs = random_packed_inputs(transformer, reference_sizes=[(32, 32), (16, 32)])
    expected = model(**inputs)
    expected.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    sharded = FSDP(model, auto_wrap_policy=ModuleWrapPolicy({torch.nn.Linear}), use_orig_params=True,
                   device_id=torch.device("cpu"))
    got = sharded(**inputs)
    got.square().mean().backward()
    forward = (got - expected).abs().max().item()
    with FSDP.summon_full_params(sharded, with_grads=True):
        found = {n.replace("_fsdp_wrapped_module.", ""): p.grad for n, p in sharded.named_parameters()
                 if p.grad is not None}
        backward = max((found[n] - g).abs().max().item() for n, g in grads.items())
        same_keys = sorted(found) == sorted(grads)
    if rank == 0:
        with open(out, "w") as handle:
            handle.write(f"{forward} {backward} {same_keys}")
    dist.destroy_process_group()

if __name__ == "__main__":
    mp.spawn(run, args=(int(sys.argv[1]), sys.argv[2]), nprocs=2)
'''


@pytest.mark.slow
def test_fsdp_with_linear_units_is_exact(tmp_path):
    out = tmp_path / "result.txt"
    run_two_process_script(SCRIPT, tmp_path, str(out))
    forward, backward, same_keys = out.read_text().split()
    assert float(forward) == 0.0 and float(backward) == 0.0 and same_keys == "True"


REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "flux_mosaic_train.py"
# the smoke config (the main job's default, main_cpu.yaml, trains for minutes)
SMOKE = ["--config", str(REPO / "recipes" / "configs" / "tiny_cpu.yaml")]
TRAIN = ["data.target_size=64", "data.ref_size=32", "data.batch_size=1", "model.lora_rank=4", "data.synthetic_refs=[1,3]",
         "max_steps=4", "checkpoint_every=2", "keep_checkpoints=3", "log_every=1", "validation_samples=1",
         "validation_steps=1", "validate_every=0", "tracker=null", "ema_decay=null", "model.capture_blocks=all"]


def _train(out: Path, *overrides: str, processes: int = 1, kill_at: int | None = None):
    import subprocess

    launch = ([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(free_port())] if processes > 1 else [sys.executable])
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    if kill_at is not None:
        env["MOSAIC_KILL_AT_STEP"] = str(kill_at)
    return subprocess.run([*launch, str(RECIPE), *SMOKE, f"output_dir={out}", *TRAIN, *overrides], capture_output=True,
                          text=True, timeout=900, env=env)


def _records(out: Path) -> dict[int, dict]:
    import json

    return {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.slow
def test_trainer_under_fsdp2_matches_one_process_and_resumes_exactly(tmp_path):
    """Two gloo processes under FSDP2 with one sample each against one process with two
    accumulated micro-batches of one sample: the same global batch (data order, noise, dropout),
    so the same losses; then a run killed after its step-2 checkpoint resumes bit-identically."""
    import torch
    from safetensors.torch import load_file

    single, sharded, killed = tmp_path / "single", tmp_path / "fsdp", tmp_path / "killed"
    done = _train(single, "gradient_accumulation=2")
    assert done.returncode == 0, done.stderr[-3000:]
    done = _train(sharded, "fsdp=true", processes=2)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = _records(single), _records(sharded)
    assert sorted(one) == sorted(two) == [1, 2, 3, 4]
    for step in one:
        for key in ("loss", "flow_matching", "scal", "mdl"):
            expected, got = one[step][key], two[step][key]
            assert got == pytest.approx(expected, rel=1e-5, abs=1e-7), (step, key, got, expected)
    assert two[1]["loss"] == pytest.approx(one[1]["loss"], rel=1e-6)  # the same weights at step 1
    checkpoint = sharded / "checkpoints" / "step-0000004"
    files = {p.name for p in checkpoint.iterdir()}
    assert {"fsdp_optimizer.pt", "lora_parameters.safetensors", "pytorch_lora_weights.safetensors",
            "trainer_rank0.pt", "trainer_rank1.pt", "scheduler.bin"} <= files
    assert not any(name.startswith(("model", "pytorch_model")) for name in files)  # LoRA only
    raw = load_file(str(checkpoint / "lora_parameters.safetensors"))
    assert raw and all(".lora_" in key for key in raw)
    lora_one = load_file(str(single / "pytorch_lora_weights.safetensors"))
    lora_two = load_file(str(sharded / "pytorch_lora_weights.safetensors"))
    assert lora_one.keys() == lora_two.keys()
    for key in lora_one:  # full, gathered tensors, as trained by one process (to rounding)
        torch.testing.assert_close(lora_two[key], lora_one[key], rtol=1e-4, atol=1e-6)
    assert (sharded / "samples" / "step-0000004.png").is_file()  # validation runs on both processes

    done = _train(killed, "fsdp=true", processes=2, kill_at=2)
    assert done.returncode != 0 and sorted(_records(killed)) == [1, 2]
    done = _train(killed, "fsdp=true", "--resume", "latest", processes=2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert {s: r["loss"] for s, r in _records(killed).items()} == {s: r["loss"] for s, r in two.items()}
    resumed = load_file(str(killed / "pytorch_lora_weights.safetensors"))
    assert all(torch.equal(resumed[key], lora_two[key]) for key in lora_two)
