"""Smoke tests of recipes/flux_mosaic_infer.py on the tiny random pipeline."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import load_script
from PIL import Image

pytest.importorskip("diffusers")

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "flux_mosaic_infer.py"


def load_recipe():
    return load_script("recipes/flux_mosaic_infer.py", "flux_mosaic_infer")


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 6])
def test_cli_writes_image_and_sheet(tmp_path, k):
    paths = []
    for i in range(k):
        path = tmp_path / f"ref{i}.png"
        Image.new("RGB", (20 + i, 24), (40 * i, 100, 200)).save(path)
        paths.append(str(path))
    out = tmp_path / "out" / "result.png"
    summary = load_recipe().main(["--references", *paths, "--steps", "2", "--output", str(out), "--prompt", "things"])
    assert summary["references"] == k
    image = Image.open(out)
    assert image.size == (32, 32)
    sheet = Image.open(out.with_name("result-sheet.png"))
    assert sheet.width > (k + 1) * 32  # references and the result side by side


def test_default_run_as_a_program(tmp_path):
    out = tmp_path / "r.png"
    done = subprocess.run([sys.executable, str(RECIPE), "--output", str(out), "--steps", "1"],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(RECIPE.parents[1])})  # this checkout's mosaic_kit
    assert done.returncode == 0, done.stderr
    assert "torchvision" not in done.stderr  # no transformers image-processor warnings (mosaic_kit.models)
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(summary["image"]).is_file() and Path(summary["sheet"]).is_file()


def test_missing_reference_fails_clearly(tmp_path, capsys):
    with pytest.raises(SystemExit) as failed:
        load_recipe().main(["--references", str(tmp_path / "nope.png"), "--output", str(tmp_path / "x.png")])
    error = capsys.readouterr().err
    assert failed.value.code == 2 and len(error.strip().splitlines()) == 1
    assert re.search(r"argument --references: .*reference_images\[0\].*nope\.png.*does not exist", error)
    assert not (tmp_path / "x.png").exists()
