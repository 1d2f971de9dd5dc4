"""The interface every dense feature extractor implements."""

from __future__ import annotations

import torch
from torch import nn

from ..utils.checks import check_images, shape_str
from ._checks import check_grid_size, resize_to_grid

__all__ = ["FeatureExtractor"]


class FeatureExtractor(nn.Module):
    """Dense features of images on a fixed grid, the input of dense matching.

    `forward` takes `(B, 3, H, W)` float images with values in [0, 1] and returns `(B, C, gh, gw)`
    float32 features on a grid of `grid_size` cells, row-major over the image: cell `(i, j)` covers
    pixel rows `i * H / gh … (i + 1) * H / gh` and pixel columns `j * W / gw … (j + 1) * W / gw`.
    Features are computed without gradients.

    A subclass sets `name` and implements `extract`, which returns features at whatever native
    resolution the model gives; `forward` checks the images, calls `extract` under `torch.no_grad()`
    and resizes its output bilinearly (`align_corners=False`) to the grid when the sizes differ.

    Args:
        grid_size: cells of the output grid, an int for a square grid or `(gh, gw)`; defaults to 64.

    Attributes:
        name: short name of the extractor (the one `build_extractor` takes).
        grid_size: the grid as `(gh, gw)`.

    Raises:
        ValueError: if `grid_size` is not a positive int or a pair of them; `forward` raises if
            `images` is not a float tensor of shape `(B, 3, H, W)` with values in [0, 1] (slack 1e-3).

    Example:
        >>> import torch.nn.functional as F
        >>> class MeanColour(FeatureExtractor):
        ...     name = "mean_colour"
        ...     def extract(self, images):
        ...         return F.avg_pool2d(images, 8)  # (B, 3, H / 8, W / 8)
        >>> extractor = MeanColour(grid_size=(4, 2))
        >>> extractor(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 3, 4, 2])
        >>> extractor(torch.rand(3, 32, 32))
        Traceback (most recent call last):
        ...
        ValueError: Expected `images` of shape (B, 3, H, W), but got (3, 32, 32).
    """

    name: str = "feature_extractor"

    def __init__(self, grid_size: int | tuple[int, int] = 64) -> None:
        super().__init__()
        self.grid_size: tuple[int, int] = check_grid_size(grid_size)

    def extract(self, images: torch.Tensor) -> torch.Tensor:
        """Native dense features of checked images; subclasses implement it.

        Args:
            images: `(B, 3, H, W)` float images with values in [0, 1], already checked.

        Returns:
            `(B, C, h, w)` float features at any resolution `h × w`, row-major over the image.

        Example:
            >>> FeatureExtractor().extract(torch.rand(1, 3, 8, 8))
            Traceback (most recent call last):
            ...
            NotImplementedError: FeatureExtractor does not implement `extract`.
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement `extract`.")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Dense features of `images` on the grid.

        Args:
            images: `(B, 3, H, W)` float images with values in [0, 1].

        Returns:
            `(B, C, gh, gw)` float32 features, `(gh, gw) = grid_size`.

        Example:
            >>> from mosaic_kit.features import Precomputed
            >>> Precomputed(torch.zeros(5, 2, 2), grid_size=8)(torch.rand(1, 3, 16, 16)).shape
            torch.Size([1, 5, 8, 8])
        """
        images = check_images(images)
        with torch.no_grad():
            features = self.extract(images)
        if not isinstance(features, torch.Tensor) or features.ndim != 4 or features.shape[0] != images.shape[0]:
            got = shape_str(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise ValueError(
                f"Expected `{type(self).__name__}.extract` to return features of shape ({images.shape[0]}, C, h, w), "
                f"but got {got}."
            )
        return resize_to_grid(features, self.grid_size)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, grid_size={self.grid_size}"
