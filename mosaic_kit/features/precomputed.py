"""User-supplied features behind the extractor interface."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..utils.checks import shape_str
from .base import FeatureExtractor

__all__ = ["Precomputed"]


class Precomputed(FeatureExtractor):
    """Features the user computes: a callable on the images, or a fixed tensor.

    The features are resized bilinearly to `grid_size` like any other extractor's, so features of
    any model, computed at any resolution, can be matched with the rest of the toolkit.

    Args:
        features: either a callable `images -> (B, C, h, w)` float tensor (a module becomes a
            submodule and follows `.to()`), or a fixed float tensor `(C, h, w)` or `(N, C, h, w)`:
            one map for every image (`N = 1`) or one per image of the batch (`N = B`).
        grid_size: cells of the output grid, an int or `(gh, gw)`; defaults to 64.

    Shape:
        - Input: `(B, 3, H, W)` float in [0, 1] (a fixed tensor only needs its batch size).
        - Output: `(B, C, gh, gw)` float32.

    Raises:
        ValueError: if `features` is neither callable nor a float tensor of rank 3 or 4; `forward`
            raises if the callable returns something else than `(B, C, h, w)` float features or a
            fixed tensor's batch is neither 1 nor B.

    Example:
        >>> fixed = Precomputed(torch.randn(8, 16, 16), grid_size=4)
        >>> fixed(torch.rand(2, 3, 64, 64)).shape
        torch.Size([2, 8, 4, 4])
        >>> colours = Precomputed(lambda images: images[:, :, ::4, ::4], grid_size=(8, 4))
        >>> colours(torch.rand(1, 3, 32, 32)).shape
        torch.Size([1, 3, 8, 4])
    """

    name = "precomputed"

    def __init__(
        self,
        features: Callable[[torch.Tensor], torch.Tensor] | torch.Tensor,
        *,
        grid_size: int | tuple[int, int] = 64,
    ) -> None:
        super().__init__(grid_size)
        if isinstance(features, torch.Tensor):
            if features.ndim not in (3, 4) or not features.is_floating_point():
                raise ValueError(
                    "Expected `features` to be a callable or a float tensor of shape (C, h, w) or (N, C, h, w), "
                    f"but got a {features.dtype} tensor of shape {shape_str(features.shape)}."
                )
            self.register_buffer("fixed", features if features.ndim == 4 else features[None], persistent=False)
            self.function = None
        elif callable(features):
            self.fixed = None
            self.function = features
        else:
            raise ValueError(
                f"Expected `features` to be a callable or a float tensor, but got {type(features).__name__}."
            )

    def extract(self, images: torch.Tensor) -> torch.Tensor:
        """The user's features for `images`, at their own resolution.

        Args:
            images: `(B, 3, H, W)` float images with values in [0, 1].

        Returns:
            `(B, C, h, w)` float features.

        Example:
            >>> Precomputed(torch.ones(1, 2, 3, 3)).extract(torch.rand(4, 3, 8, 8)).shape
            torch.Size([4, 2, 3, 3])
        """
        batch = images.shape[0]
        if self.fixed is not None:
            if self.fixed.shape[0] not in (1, batch):
                raise ValueError(
                    f"Expected fixed `features` with batch 1 or {batch} (the images'), "
                    f"but got {shape_str(self.fixed.shape)}."
                )
            return self.fixed.expand(batch, -1, -1, -1)
        features = self.function(images)
        if not isinstance(features, torch.Tensor) or features.ndim != 4 or features.shape[0] != batch:
            got = shape_str(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise ValueError(f"Expected the `features` callable to return shape ({batch}, C, h, w), but got {got}.")
        if not features.is_floating_point():
            raise ValueError(f"Expected the `features` callable to return a float tensor, but got {features.dtype}.")
        return features
