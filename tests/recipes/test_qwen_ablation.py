"""The synthetic ablation runs for the Qwen-Image-Edit-Plus family (recipes/configs/synthetic_qwen_cpu.yaml)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("diffusers")

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_qwen_ablation_smoke_run_scores_every_setting(tmp_path):
    """``--smoke`` on the Qwen config: a pixel-space Qwen-Image-Edit-Plus model (the smoke model
    shrunk along the config's own ``tiny_overrides`` keys: Qwen-Image has no single blocks)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(ROOT / "recipes" / "synthetic_ablation.py"), "--config",
         str(ROOT / "recipes" / "configs" / "synthetic_qwen_cpu.yaml"), "--smoke", "--output-dir", str(tmp_path),
         "eval.generation_samples=0"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    text = json.dumps(json.loads((tmp_path / "results.json").read_text()))
    for setting in ("diffusion", "scal", "scal_mdl_jsd"):
        assert setting in text
    assert (tmp_path / "table.md").read_text().count("| scal_mdl_jsd |") >= 1
    config = yaml.safe_load((tmp_path / "runs" / "scal" / "seed0" / "config.yaml").read_text())
    assert config["model"]["family"] == "qwen_edit_plus" and config["model"]["pixel_space"] == 2
    assert config["model"]["tiny_overrides"] == {"num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 16}
