"""The FLUX.2 benchmark lays tokens out as the pipelines do, runs, and the GPU check's dry run works."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import load_script
import torch

pytest.importorskip("diffusers")

from mosaic_kit.models.flux2 import Flux2Family  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def load_bench():
    return load_script("benchmarks/bench_flux2.py", "bench_flux2")


@pytest.mark.parametrize("refs", [1, 3])
def test_benchmark_ids_are_the_pipelines_ids(refs):
    bench = load_bench()
    family = Flux2Family.tiny(max_sequence_length=4)
    inputs = family.encode(torch.zeros(1, 3, 64, 64), ["a"], torch.zeros(1, refs, 3, 32, 32))
    cond = inputs.conditioning
    expected = torch.cat([cond["latent_ids"], cond["reference_ids"]], dim=1)
    assert torch.equal(bench.image_ids(refs, 64, 32), expected)


def test_klein_preset_is_the_klein_architecture():
    bench = load_bench()
    from diffusers import Flux2Transformer2DModel

    with torch.device("meta"):
        model = Flux2Transformer2DModel(**bench.KLEIN_4B)
    params = sum(p.numel() for p in model.parameters())
    assert 3.5e9 < params < 4.2e9, params  # "4B"
    assert bench.KLEIN_4B["joint_attention_dim"] == 3 * 2560  # three Qwen3-4B layers stacked


def test_benchmark_runs_and_reports_the_overhead(tmp_path):
    threads = torch.get_num_threads()
    try:
        report = load_bench().main(["--preset", "tiny", "--device", "cpu", "--refs", "1", "--repeats", "1",
                                    "--threads", "1", "--out", str(tmp_path / "flux2.json")])
    finally:
        torch.set_num_threads(threads)
    saved = json.loads((tmp_path / "flux2.json").read_text())
    assert {(r["mode"], r["refs"]) for r in saved["results"]} == {("train", 1), ("train+losses", 1)}
    assert all(r["time_ms"] > 0 for r in report["results"])
    row = saved["overhead"][0]
    assert row["overhead_pct"] == pytest.approx(100 * (row["train_losses_ms"] / row["train_ms"] - 1))
    assert saved["target_overhead_pct"] == 5.0


@pytest.mark.slow
def test_gpu_check_dry_run_writes_one_report(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    assert report["dry_run"] and report["ok"]
    assert set(report["stages"]) == {"tests", "capture", "flux2", "flux1", "memory", "memory-quant"}
    assert [r["mode"] for r in report["stages"]["memory"]["report"]["results"]] == ["plain", "mosaic"]
    assert [(r["quantize"], r["mode"]) for r in report["stages"]["memory-quant"]["report"]["results"]] == [
        ("int8", "plain"), ("int8", "mosaic"), ("nf4", "plain"), ("nf4", "mosaic")]
    assert report["stages"]["flux2"]["report"]["overhead"][0]["refs"] == 1
