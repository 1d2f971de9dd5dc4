"""The capture benchmark: its released-style baseline agrees with mosaic_kit, and it runs."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from mosaic_kit.correspondence import Correspondences

ROOT = Path(__file__).resolve().parents[2]
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


def test_checkpointed_setting_equals_the_unchecked_losses_and_gradients():
    """With every feed inside a non-reentrant checkpoint, the released-style baseline and
    mosaic_kit still agree (values and gradients, float64), and both equal the unchecked run."""
    cfg = dict(bench.PRESETS["tiny"], dtype="float64")
    dicts, corr, _, _ = bench._inputs(cfg, torch.device("cpu"))
    hidden, weights = bench._block_inputs(cfg, torch.device("cpu"))
    leaves = hidden + weights
    n_ref = cfg["refs"] * cfg["ref_tokens"]
    queries = [(h[:, :n_ref] @ weights[2 * i]).view(1, n_ref, cfg["heads"], cfg["dim"]).transpose(1, 2) for i, h in enumerate(hidden)]
    keys = [(h[:, n_ref:] @ weights[2 * i + 1]).view(1, -1, cfg["heads"], cfg["dim"]).transpose(1, 2) for i, h in enumerate(hidden)]
    unchecked = bench.released_style_loss(dicts, corr.ref_tokens, queries, keys)
    expected = torch.autograd.grad(unchecked, leaves)
    for method in ("released", "mosaic_kit"):
        loss = bench.checkpointed_loss(method, cfg, dicts, corr, hidden, weights)
        torch.testing.assert_close(loss, unchecked, rtol=1e-9, atol=1e-12)
        for a, b in zip(torch.autograd.grad(loss, leaves), expected):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-12)


def test_benchmark_runs_and_writes_its_report(tmp_path):
    out = tmp_path / "report.json"
    report = bench.main(["--preset", "tiny", "--repeats", "1", "--scal-points", "64", "--checkpointing", "off", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(report))
    assert set(saved["capture"]) == set(bench.METHODS)
    for result in saved["capture"].values():
        assert result["time_ms"] > 0 and result["runs"] == 1 and result["peak_consumed_mib"] <= result["peak_mib"] + 1
    assert abs(saved["capture"]["mosaic_kit"]["loss"] - saved["capture"]["released"]["loss"]) < 1e-4
    assert saved["ratios"]["mosaic_kit"]["speed"] > 0
    assert set(saved["ratios"]["mosaic_kit"]) == {"memory", "memory_grads_consumed", "speed"}
    assert "capture_checkpointing" not in saved
    assert saved["scal"]["points"] == 64 and saved["scal"]["speed_ratio"] > 1
    assert saved["hardware"]["device"] == "cpu" and saved["worker_threads"] == 1


def test_checkpointing_worker_measures_both_methods():
    """The checkpointing worker in this process (the report test below runs it in subprocesses)."""
    cfg = bench.PRESETS["tiny"]
    released = bench._worker("released", cfg, "cpu", 1, checkpointing=True)
    ours = bench._worker("mosaic_kit", cfg, "cpu", 1, checkpointing=True)
    for result in (released, ours):
        assert result.time_ms > 0 and result.runs == 1 and result.peak_consumed_mib <= result.peak_mib + 1
    assert abs(ours.loss - released.loss) < 1e-4


@pytest.mark.slow
def test_benchmark_with_checkpointing_writes_its_table(tmp_path):
    out = tmp_path / "report.json"
    args = ["--preset", "tiny", "--repeats", "1", "--scal-points", "0", "--checkpointing", "on",
            "--methods", "released,mosaic_kit", "--out", str(out)]
    saved = json.loads(json.dumps(bench.main(args)))
    assert saved == json.loads(out.read_text())
    assert "capture" not in saved and "scal" not in saved
    results = saved["capture_checkpointing"]
    assert set(results) == {"released", "mosaic_kit"}
    for result in results.values():
        assert result["time_ms"] > 0 and result["runs"] == 1 and result["peak_consumed_mib"] <= result["peak_mib"] + 1
    assert abs(results["mosaic_kit"]["loss"] - results["released"]["loss"]) < 1e-4
    assert set(saved["ratios_checkpointing"]["mosaic_kit"]) == {"memory", "memory_grads_consumed", "speed"}
