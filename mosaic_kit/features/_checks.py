"""Optional imports and grid helpers of the feature extractors (private); the input checks
are `mosaic_kit.utils.checks`.

A bad input raises `ValueError` naming the argument, what was expected and what arrived; a
missing optional dependency raises `ImportError` naming the extra that installs it.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch
import torch.nn.functional as F

from ..utils.checks import check_size

__all__ = ["check_grid_size", "require", "resize_to_grid"]

_EXTRA = "flux"


def check_grid_size(value: object) -> tuple[int, int]:
    """Returns ``grid_size`` as ``(rows, cols)``."""
    return check_size("grid_size", value)


def resize_to_grid(features: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Resizes ``(B, C, h, w)`` features bilinearly to ``(B, C, *grid)`` in float32.

    ``align_corners=False``: the centre of grid cell (i, j) samples the native map at the same
    relative image position as the centre of native cell (i', j') it falls in.
    """
    features = features.float()
    if tuple(features.shape[-2:]) == tuple(grid):
        return features
    return F.interpolate(features, size=grid, mode="bilinear", align_corners=False)


def require(module: str, what: str) -> ModuleType:
    """Imports an optional dependency, or raises `ImportError` naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"{what} needs `{module}`, which is not installed. Install it with `pip install mosaic_kit[{_EXTRA}]`."
        ) from error
