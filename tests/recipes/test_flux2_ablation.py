"""The synthetic ablation runs for the FLUX.2 family (recipes/configs/synthetic_flux2_cpu.yaml)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_flux2_ablation_smoke_run_scores_every_setting(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "synthetic_ablation.py"), "--preset", "flux2-cpu", "--smoke",
         "--output-dir", str(tmp_path), "eval.generation_samples=0"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    text = json.dumps(results)
    for setting in ("diffusion", "scal", "scal_mdl_jsd"):
        assert setting in text
    assert (tmp_path / "table.md").read_text().count("| scal_mdl_jsd |") >= 1
    config = (tmp_path / "runs" / "scal" / "seed0" / "config.yaml").read_text()
    assert "family: flux2" in config
