"""Input checks and optional imports of the feature extractors (private).

A bad input raises `ValueError` naming the argument, what was expected and what arrived; a
missing optional dependency raises `ImportError` naming the extra that installs it.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from types import ModuleType

import torch
import torch.nn.functional as F

__all__ = [
    "IMAGE_RANGE_SLACK",
    "check_grid_size",
    "check_images",
    "check_int",
    "check_size",
    "require",
    "resize_to_grid",
    "shape_str",
]

# Images may leave [0, 1] by this much (rounding of a resize or of a colour conversion).
IMAGE_RANGE_SLACK = 1e-3

_EXTRA = "flux"


def shape_str(shape: Sequence[object]) -> str:
    """Formats a shape as ``(2, 3, 64, 64)``."""
    return "(" + ", ".join(str(s) for s in shape) + ")"


def check_int(name: str, value: object, minimum: int | None = None) -> int:
    """Returns ``value`` as an int; raises unless it is an integer (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"Expected `{name}` to be an integer, but got {value!r}.")
    if minimum is not None and value < minimum:
        raise ValueError(f"Expected `{name}` >= {minimum}, but got {value}.")
    return int(value)


def check_size(name: str, value: object) -> tuple[int, int]:
    """Returns an int or a pair of ints (all >= 1) as ``(height, width)``."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = check_int(name, value, minimum=1)
        return size, size
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise ValueError(f"Expected `{name}` to be an integer or a pair of integers (height, width), but got {value!r}.")
    return check_int(f"{name}[0]", value[0], minimum=1), check_int(f"{name}[1]", value[1], minimum=1)


def check_grid_size(value: object) -> tuple[int, int]:
    """Returns ``grid_size`` as ``(rows, cols)``."""
    return check_size("grid_size", value)


def check_images(images: object, name: str = "images") -> torch.Tensor:
    """Raises unless ``images`` is a float tensor ``(B, 3, H, W)`` with B, H, W >= 1 and values in [0, 1]."""
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"Expected `{name}` to be a torch.Tensor of shape (B, 3, H, W), but got {type(images).__name__}.")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"Expected `{name}` of shape (B, 3, H, W), but got {shape_str(images.shape)}.")
    if min(images.shape) < 1:
        raise ValueError(f"Expected `{name}` of shape (B, 3, H, W) with B, H, W >= 1, but got {shape_str(images.shape)}.")
    if not images.is_floating_point():
        raise ValueError(f"Expected `{name}` with a floating dtype (values in [0, 1]), but got {images.dtype}.")
    low, high = images.aminmax()
    # Written so that NaN fails too.
    if not (bool(low >= -IMAGE_RANGE_SLACK) and bool(high <= 1 + IMAGE_RANGE_SLACK)):
        raise ValueError(
            f"Expected `{name}` with values in [0, 1], but got values in [{float(low):.4g}, {float(high):.4g}]."
        )
    return images


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
