"""Dense feature extractors for building correspondences.

Every extractor is a `FeatureExtractor`: `(B, 3, H, W)` float images in [0, 1] in,
`(B, C, gh, gw)` float32 features out on a `grid_size` grid, row-major over the image (cell
`(i, j)` covers pixel rows `i * H / gh … (i + 1) * H / gh`). Cosine nearest neighbours between the
feature grids of a target and a reference give dense correspondences.

- `DenseSIFT`: SIFT descriptors of a patch around every cell (kornia); no weights, no download.
- `DINOv2`: patch tokens of a DINOv2 ViT (transformers).
- `DiffusionFeatures`: UNet features of a noised image at one timestep, as in DIFT (diffusers).
- `DiTFeatures`: the same with a diffusion transformer (diffusers' `DiTTransformer2DModel`): the
  tokens of one block, laid out on their patch grid.
- `Precomputed`: features the user computes (a callable or a tensor).
- `build_extractor`: any of them by name.

transformers and diffusers are imported only when a model is loaded; install them with
`pip install mosaic_kit[flux]`.

Example:
    >>> import torch
    >>> from mosaic_kit.features import DenseSIFT
    >>> target, reference = torch.rand(2, 1, 3, 64, 64).unbind(0)
    >>> sift = DenseSIFT(grid_size=8, patch_size=16)
    >>> f_target, f_reference = sift(target).flatten(2), sift(reference).flatten(2)  # (1, 128, 64)
    >>> similarity = torch.einsum("bct,bcr->btr", f_target, f_reference)  # unit-norm: cosine
    >>> nearest = similarity.argmax(-1)  # (1, 64): reference cell of each target cell, row-major
    >>> nearest.shape
    torch.Size([1, 64])
"""

from .base import FeatureExtractor
from .diffusion import DiffusionFeatures
from .dinov2 import DINOv2
from .dit import DiTFeatures
from .factory import EXTRACTORS, build_extractor, parse_extractor_spec
from .precomputed import Precomputed
from .sift import DenseSIFT

__all__ = [
    "DINOv2",
    "DiTFeatures",
    "DenseSIFT",
    "DiffusionFeatures",
    "EXTRACTORS",
    "FeatureExtractor",
    "Precomputed",
    "build_extractor",
    "parse_extractor_spec",
]
