"""Random correspondence batches and attention inputs for the tests; loading a recipe or benchmark
script as a module; running a two-process gloo script; the DreamBench photos the tests read."""

from __future__ import annotations

import importlib.util
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import torch

from mosaic_kit.correspondence import Correspondences


def random_dicts(
    rng: random.Random,
    batch: int,
    ref_tokens: list[int],
    tgt_tokens: int,
    absent_prob: float = 0.2,
    empty_prob: float = 0.15,
    max_points: int = 6,
) -> list[list[dict[int, int]]]:
    """Released-format samples with absent (trailing) and empty references."""
    samples = []
    for _ in range(batch):
        count = len(ref_tokens)
        while count > 0 and rng.random() < absent_prob:
            count -= 1
        refs = []
        for k in range(count):
            if rng.random() < empty_prob:
                refs.append({})
                continue
            n = rng.randint(1, min(max_points, ref_tokens[k]))
            us = rng.sample(range(ref_tokens[k]), n)
            refs.append({u: rng.randrange(tgt_tokens) for u in us})
        samples.append(refs)
    return samples


def random_corr(
    seed: int, batch: int, num_refs: int, tgt_tokens: int = 12, ref_token_range: tuple[int, int] = (2, 7), **kwargs
) -> Correspondences:
    rng = random.Random(seed)
    ref_tokens = [rng.randint(*ref_token_range) for _ in range(num_refs)]
    return Correspondences.from_dicts(random_dicts(rng, batch, ref_tokens, tgt_tokens, **kwargs), ref_tokens, tgt_tokens)


def random_qk(
    corr: Correspondences, blocks: int, heads: int, dim: int, dtype=torch.float64, scale: float = 1.0, seed: int = 0
):
    g = torch.Generator().manual_seed(seed)
    queries = [
        (torch.randn(corr.batch_size, heads, corr.total_ref_tokens, dim, generator=g, dtype=torch.float64) * scale)
        .to(dtype).requires_grad_()
        for _ in range(blocks)
    ]
    keys = [
        (torch.randn(corr.batch_size, heads, corr.tgt_tokens, dim, generator=g, dtype=torch.float64) * scale)
        .to(dtype).requires_grad_()
        for _ in range(blocks)
    ]
    return queries, keys


ROOT = Path(__file__).resolve().parents[1]
DREAMBENCH_SUBSET = ROOT / "tests" / "data" / "dreambench_subset"
"""9 subjects, 3 photos each at 256 px, their 5 multi-subject cases, with attribution and licence."""


def dreambench_for_tests() -> Path:
    """The DreamBench copy the defaults find (``$MOSAIC_DREAMBENCH`` or the folder that
    ``recipes/fetch_dreambench.py`` fills) when this machine has one, else the subset in the
    repository, so the tests that need real photos run on every machine."""
    from mosaic_kit.data import find_dreambench

    return find_dreambench() or DREAMBENCH_SUBSET


def load_script(relative_path: str, name: str | None = None):
    """Imports a script of the repository (``recipes/x.py``, ``benchmarks/y.py``) as a module."""
    path = ROOT / relative_path
    spec = importlib.util.spec_from_file_location(name or path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a process group's rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_two_process_script(source: str, folder: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Writes ``source`` to ``folder`` and runs it as ``python script.py PORT *args`` with this
    checkout's ``mosaic_kit`` (the script spawns its processes); fails the test if it fails."""
    script = folder / "two_processes.py"
    script.write_text(source)
    done = subprocess.run([sys.executable, str(script), str(free_port()), *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def train_in_process(raw: dict):
    """Trains a `MosaicTrainer` built from the config dict ``raw`` in this process and returns it;
    torch's thread count is restored afterwards (the trainer sets ``cpu_threads``)."""
    from mosaic_kit.training import MosaicTrainer, config_from_dict

    threads = torch.get_num_threads()
    try:
        trainer = MosaicTrainer(config_from_dict(raw))
        trainer.train()
    finally:
        torch.set_num_threads(threads)
    return trainer
