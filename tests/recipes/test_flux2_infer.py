"""recipes/flux_mosaic_infer.py with ``--family flux2``: the stock FLUX.2 pipeline, the trained LoRA
loaded by its own ``load_lora_weights``, the contact sheet with the references beside the result."""

from __future__ import annotations


import numpy as np
import pytest
from helpers import load_script
import torch
from PIL import Image

pytest.importorskip("diffusers")

from mosaic_kit.models.flux2 import Flux2Family  # noqa: E402



def load_recipe():
    return load_script("recipes/flux_mosaic_infer.py", "flux_mosaic_infer")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (tests/conftest.py)


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
    plain = recipe.main([*common, "--output", str(tmp_path / "plain.png")])
    tuned = recipe.main([*common, "--lora", str(lora.parent), "--output", str(tmp_path / "tuned.png")])
    assert plain["pipeline"] == "Flux2KleinPipeline" and plain["references"] == 2
    a, b = (np.asarray(Image.open(tmp_path / name)) for name in ("plain.png", "tuned.png"))
    assert a.shape == (32, 32, 3) and not np.array_equal(a, b)
    sheet = Image.open(tmp_path / "tuned-sheet.png")
    assert sheet.width > 3 * 32  # two references and the result side by side
    again = recipe.main([*common, "--lora", str(lora), "--output", str(tmp_path / "again.png")])  # the file itself
    assert np.array_equal(np.asarray(Image.open(again["image"])), b)
