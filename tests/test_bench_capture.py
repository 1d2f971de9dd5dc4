"""The capture benchmark: its released-style baseline agrees with mosaic_kit, and it runs."""

import importlib.util
import json
import sys
from pathlib import Path

import torch

from mosaic_kit.correspondence import Correspondences

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bench_capture", ROOT / "benchmarks" / "bench_capture.py")
bench = importlib.util.module_from_spec(spec)
sys.modules["bench_capture"] = bench
spec.loader.exec_module(bench)


def test_released_style_baseline_equals_mosaic_kit_with_released_settings():
    cfg = dict(bench.PRESETS["tiny"], dtype="float64")
    dicts, corr, queries, keys = bench._inputs(cfg, torch.device("cpu"))
    assert isinstance(corr, Correspondences) and corr.to_dicts() == [dicts]
    released = bench.released_style_loss(dicts, corr.ref_tokens, queries, keys)
    ours = bench.mosaic_loss(corr, queries, keys, paper=False)
    torch.testing.assert_close(ours, released, rtol=1e-9, atol=1e-12)
    g_released = torch.autograd.grad(released, queries + keys)
    g_ours = torch.autograd.grad(ours, queries + keys)
    for a, b in zip(g_ours, g_released):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-12)


def test_benchmark_runs_and_writes_its_report(tmp_path):
    out = tmp_path / "report.json"
    report = bench.main(["--preset", "tiny", "--repeats", "1", "--scal-points", "64", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(report))
    assert set(saved["capture"]) == set(bench.METHODS)
    for result in saved["capture"].values():
        assert result["time_ms"] > 0 and result["runs"] == 1 and result["peak_consumed_mib"] <= result["peak_mib"] + 1
    assert abs(saved["capture"]["mosaic_kit"]["loss"] - saved["capture"]["released"]["loss"]) < 1e-4
    assert saved["ratios"]["mosaic_kit"]["speed"] > 0
    assert set(saved["ratios"]["mosaic_kit"]) == {"memory", "memory_grads_consumed", "speed"}
    assert saved["scal"]["points"] == 64 and saved["scal"]["speed_ratio"] > 1
    assert saved["hardware"]["device"] == "cpu"
