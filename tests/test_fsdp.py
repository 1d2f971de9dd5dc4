"""FSDP with every linear layer wrapped computes the multi-reference forward and its gradients
exactly (two CPU processes, gloo). The trainer does not offer FSDP yet (see the training guide);
this is the model-level half of it."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_fsdp_with_linear_units_is_exact(tmp_path):
    import subprocess

    script = tmp_path / "fsdp_check.py"
    script.write_text(SCRIPT)
    out = tmp_path / "result.txt"
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(script), str(free_port()), str(out)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(root)})
    assert done.returncode == 0, done.stderr[-3000:]
    forward, backward, same_keys = out.read_text().split()
    assert float(forward) == 0.0 and float(backward) == 0.0 and same_keys == "True"
