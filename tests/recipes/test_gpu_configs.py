"""The ready configurations for 24, 48 and 80 GB cards (recipes/configs/gpu_*.yaml): valid training
configs, the same model, sizes, base and encoder setting as the memory benchmark's row measured
for them, and a header stating that row's measured peak."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from helpers import load_script

pytest.importorskip("diffusers")

from mosaic_kit.training.config import config_from_dict  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _load(path: Path):
    values = yaml.safe_load(path.read_text())
    values.setdefault("data", {})["root"] = "/data/manifest.jsonl"  # what the user sets (data.root=...)
    return config_from_dict(values)


def test_ready_configs_are_the_measured_rows_and_state_their_peaks():
    bench = load_script("benchmarks/bench_memory.py", "bench_memory")
    report = json.loads((bench.RESULTS / "memory-cpu.json").read_text())
    rows = {(r["config"], r["mode"], r.get("quantize", "none")): r for r in report["results"]}
    assert sorted(bench.READY) == ["gpu-24gb", "gpu-48gb", "gpu-80gb"]
    for name, cfg in bench.READY.items():
        path = ROOT / cfg["recipe"]
        config = _load(path)
        values = yaml.safe_load(path.read_text())
        assert (config.data.target_size, config.data.ref_size, config.data.max_refs) == (
            cfg["size"], cfg["ref_size"], cfg["refs"]), name
        assert config.model.family == cfg["family"] and config.model.lora_rank == cfg["rank"], name
        assert config.model.quantize == cfg["quantize"] and config.model.capture_blocks == "all", name
        assert ("cache_dir" in values["data"]) != cfg["live_encoders"], name  # cached encoders need the cache
        step = rows[(name, "mosaic", cfg["quantize"])]["peak_bytes"] / bench.GIB
        header = "".join(line for line in path.read_text().splitlines(keepends=True) if line.startswith("#"))
        assert f"{step:.2f} GiB" in header and "MEASURED" in header, name
    step_24 = rows[("gpu-24gb", "mosaic", bench.READY["gpu-24gb"]["quantize"])]["peak_bytes"]
    encoders = sum(e["bytes_bf16"] for e in report["encoders"][bench.READY["gpu-24gb"]["encoders"]])
    assert (step_24 + encoders) / bench.GIB <= 22  # the acceptance: encoders live, as the config says


def test_a_config_with_an_unknown_key_is_refused(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data:\n  cache_dir: null\n  cache_folder: null\n")
    with pytest.raises(ValueError, match="cache_folder"):
        _load(path)
