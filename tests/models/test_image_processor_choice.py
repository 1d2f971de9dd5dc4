"""No transformers image-processor warnings on mosaic_kit's inference and training paths: diffusers'
FLUX pipelines import ``CLIPImageProcessor`` and ``SiglipImageProcessor``, which without torchvision
made transformers warn twice on every run; mosaic_kit binds their PIL backends first
(`mosaic_kit.models._image_processors`). The recipes' own runs are checked in
tests/recipes/test_infer_recipe.py and tests/training/test_training.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")

ROOT = Path(__file__).resolve().parents[2]

# A fresh interpreter (transformers warns once per process): the transformers logger and Python's
# warnings are recorded from before the first import, then the tiny FLUX.1 and FLUX.2 paths run.
SCRIPT = r'''
import json, logging, sys, warnings
records = []

class Keep(logging.Handler):
    def emit(self, record):
        records.append(f"{record.name}: {record.getMessage()}")

logging.getLogger("transformers").addHandler(Keep())
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torch
    from PIL import Image
    from mosaic_kit.models import Flux2Family
    from mosaic_kit.pipelines import tiny_mosaic_pipeline
    torch.set_num_threads(1)
    reference = Image.new("RGB", (64, 64), "red")
    tiny_mosaic_pipeline()("a cat", [reference], height=32, width=32, ref_size=32, num_inference_steps=1,
                           progress=False)
    Flux2Family.tiny().sample("a cat", [reference], 32, 32, num_inference_steps=1)
    import transformers
    from transformers.utils import is_torchvision_available
    bound = {name: getattr(transformers, name).__name__ for name in ("CLIPImageProcessor", "SiglipImageProcessor")}
messages = records + [f"{w.category.__name__}: {w.message}" for w in caught]
print(json.dumps({"messages": messages, "bound": bound, "torchvision": is_torchvision_available()}))
'''


def test_tiny_inference_and_training_paths_print_no_image_processor_warnings(tmp_path):
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    about_processors = [m for m in result["messages"] if "torchvision" in m or "ImageProcessor" in m]
    assert about_processors == [], about_processors
    assert "torchvision" not in done.stderr
    if not result["torchvision"]:  # the PIL backends, chosen explicitly (what transformers' fallback picks)
        assert result["bound"] == {"CLIPImageProcessor": "CLIPImageProcessorPil",
                                   "SiglipImageProcessor": "SiglipImageProcessorPil"}
