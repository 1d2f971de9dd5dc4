"""AES: an aesthetic predictor's score ×10 (`AestheticModel`, `image_grid`).

XVerse's protocol (``eval/tools/idip_aes_score.py``): the aesthetic predictor v2.5 (a SigLIP
so400m vision tower with a regression head, scores about 1-10; package
``aesthetic-predictor-v2-5``) scores the case's saved file, which is the 2×2 grid of its four
images (``image_grid``), once per case, ×10; AES is the mean over cases. The predictor is not in
transformers: `AestheticPredictorV25` wraps the package where it is installed;
`SiglipAestheticModel` runs any transformers SigLIP vision tower with a regression head (what the
tiny stand-in uses).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from torch import nn

__all__ = ["AestheticModel", "AestheticPredictorV25", "SiglipAestheticModel", "image_grid", "tiny_aesthetic_model"]


def image_grid(images: Sequence[Image.Image], columns: int = 2) -> Image.Image:
    """Images pasted row by row on a black canvas, `columns` per row, each cell the first image's
    size (XVerse saves a case's 4 images as one 2×2 grid this way); one image is returned as is.

    Example:
        >>> grid = image_grid([Image.new("RGB", (8, 6), c) for c in ("red", "green", "blue", "white")])
        >>> grid.size, grid.getpixel((9, 7))
        ((16, 12), (255, 255, 255))
    """
    if not images:
        raise ValueError("Expected `images` to hold at least one image, but got none.")
    if len(images) == 1:
        return images[0].convert("RGB")
    width, height = images[0].size
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * width, rows * height))
    for index, image in enumerate(images):
        grid.paste(image.convert("RGB"), (index % columns * width, index // columns * height))
    return grid


class AestheticModel(abc.ABC):
    """The AES scorer's interface: one aesthetic score per image, on the predictor's own scale
    (about 1-10 for v2.5; AES multiplies by 10)."""

    @abc.abstractmethod
    def score(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """``(len(images),)`` float32 scores."""


class SiglipAestheticModel(AestheticModel):
    """A transformers SigLIP vision tower and a regression head on its pooled embedding.

    Args:
        vision_model: a `SiglipVisionModel`.
        head: maps ``(N, hidden)`` pooled embeddings to ``(N, 1)`` scores.
        image_processor: the tower's image processor.
    """

    def __init__(self, vision_model: nn.Module, head: nn.Module, image_processor: Any) -> None:
        self.vision_model, self.head, self.image_processor = vision_model.eval(), head.eval(), image_processor

    def score(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """The head's output per image."""
        parameter = next(self.vision_model.parameters())
        pixels = self.image_processor(images=[i.convert("RGB") for i in images], return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            pooled = self.vision_model(pixel_values=pixels.to(parameter.device, parameter.dtype)).pooler_output
            return self.head(pooled).float().cpu().reshape(-1)


class AestheticPredictorV25(AestheticModel):
    """XVerse's aesthetic model, the aesthetic predictor v2.5, through its package (not tested
    here; the package fetches the SigLIP tower and its head weights on first use).

    Args:
        device: where it runs; defaults to "cuda".
        dtype: defaults to bfloat16 (as XVerse).

    Raises:
        ImportError: naming the package to install, when it is missing.

    Example:
        >>> model = AestheticPredictorV25()  # doctest: +SKIP
    """

    def __init__(self, device: str = "cuda", dtype: torch.dtype = torch.bfloat16) -> None:
        try:
            from aesthetic_predictor_v2_5 import convert_v2_5_from_siglip
        except ImportError as error:
            raise ImportError(
                "XVerse's AES model, the aesthetic predictor v2.5, is not in transformers: "
                "`pip install aesthetic-predictor-v2-5` (or pass another AestheticModel)."
            ) from error
        model, self.preprocessor = convert_v2_5_from_siglip(low_cpu_mem_usage=True)
        self.model = model.to(dtype).to(device).eval()

    def score(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """The predictor's score per image."""
        parameter = next(self.model.parameters())
        pixels = self.preprocessor(images=[i.convert("RGB") for i in images], return_tensors="pt").pixel_values
        with torch.inference_mode():
            return self.model(pixels.to(parameter.device, parameter.dtype)).logits.float().cpu().reshape(-1)


def tiny_aesthetic_model(seed: int = 0) -> SiglipAestheticModel:
    """A tiny random SigLIP vision tower (32×32 input, 8×8 patches, 1 layer) with a linear head,
    built in code for tests and smoke runs; its scores mean nothing. Deterministic given `seed`;
    the global RNG is untouched.

    Example:
        >>> tiny_aesthetic_model().score([Image.new("RGB", (40, 40))]).shape
        torch.Size([1])
    """
    import transformers

    config = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=32, patch_size=8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tower = transformers.SiglipVisionModel(config)
        head = nn.Linear(32, 1)
    processor_class = getattr(transformers, "SiglipImageProcessorPil", None) or transformers.SiglipImageProcessor
    return SiglipAestheticModel(tower, head, processor_class(size={"height": 32, "width": 32}))
