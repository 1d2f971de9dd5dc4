"""recipes/any_dit_minimal.py runs as written (20 steps, tiny SD3, CPU) and MOSAIC's losses fall."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "any_dit_minimal.py"


def test_any_dit_minimal_recipe_trains_and_scal_falls(tmp_path):
    output = tmp_path / "losses.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, str(RECIPE), "--output", str(output)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    history = json.loads(output.read_text())
    assert len(history) == 20
    assert all(set(h) == {"loss", "diffusion", "scal", "mdl"} for h in history)
    values = [v for h in history for v in h.values()]
    assert all(v == v and abs(v) < 1e6 for v in values)  # finite
    for h in history:  # eq. 15 with the paper's weights
        assert h["loss"] == pytest.approx(h["diffusion"] + 0.4 * h["scal"] + 0.6 * h["mdl"], rel=1e-5, abs=1e-6)
    mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    assert mean(history[-5:], "scal") < mean(history[:5], "scal")
    assert mean(history[-5:], "mdl") < mean(history[:5], "mdl")
    lines = run.stdout.splitlines()
    assert sum(line.startswith("step ") for line in lines) == 20
    assert lines[-2].startswith("SCAL mean of the first 5 steps") and lines[-1].startswith("MDL mean")


def test_any_dit_minimal_recipe_needs_at_most_25_mosaic_lines():
    """The issue's budget: no more than 25 lines that concern MOSAIC (marked `# MOSAIC`)."""
    lines = RECIPE.read_text().splitlines()
    mosaic = [line for line in lines if "  # MOSAIC" in line]  # code lines with the marker comment
    assert 0 < len(mosaic) <= 25
    # everything from mosaic_kit is marked
    assert all("# MOSAIC" in line for line in lines if "mosaic_kit" in line and not line.lstrip().startswith(("#", '"')))
