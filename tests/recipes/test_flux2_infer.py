"""recipes/flux_mosaic_infer.py with ``--family flux2``: the stock FLUX.2 pipeline, the trained LoRA
loaded by its own ``load_lora_weights``, the contact sheet with the references beside the result."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")

from mosaic_kit.models.flux2 import Flux2Family  # noqa: E402

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "flux_mosaic_infer.py"


def load_recipe():
    spec = importlib.util.spec_from_file_location("flux_mosaic_infer", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_flux2_writes_image_and_sheet_and_the_lora_changes_the_output(tmp_path):
    refs = []
    for i in range(2):
        path = tmp_path / f"ref{i}.png"
        Image.new("RGB", (40 + 10 * i, 30), (120 * i, 100, 200)).save(path)
        refs.append(str(path))
    family = Flux2Family.tiny(seed=0)  # the recipe's tiny pipeline is seed 0 too
    with torch.random.fork_rng():
        torch.manual_seed(0)
        family.add_lora(rank=4, init=False)
    lora = family.save_lora(tmp_path / "lora")
    recipe = load_recipe()
    common = ["--family", "flux2", "--references", *refs, "--steps", "2", "--prompt", "two things"]
    plain = recipe.main([*common, "--out", str(tmp_path / "plain.png")])
    tuned = recipe.main([*common, "--lora", str(lora.parent), "--out", str(tmp_path / "tuned.png")])
    assert plain["pipeline"] == "Flux2KleinPipeline" and plain["references"] == 2
    a, b = (np.asarray(Image.open(tmp_path / name)) for name in ("plain.png", "tuned.png"))
    assert a.shape == (32, 32, 3) and not np.array_equal(a, b)
    sheet = Image.open(tmp_path / "tuned-sheet.png")
    assert sheet.width > 3 * 32  # two references and the result side by side
    again = recipe.main([*common, "--lora", str(lora), "--out", str(tmp_path / "again.png")])  # the file itself
    assert np.array_equal(np.asarray(Image.open(again["image"])), b)
