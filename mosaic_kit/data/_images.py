"""Image, mask and point helpers shared by the readers, the composer and the collate (private).

Conventions: images are ``(3, H, W)`` float in ``[0, 1]``; masks ``(H, W)`` bool; points
``(x, y)`` in continuous pixel coordinates (pixel ``i`` covers ``[i, i + 1)``, its centre is
``i + 0.5``), so resizing a frame from ``W`` to ``W'`` maps ``x`` to ``x * W' / W`` exactly.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from ..correspondence._checks import check_int

__all__ = ["as_size", "load_mask", "load_rgb", "pil_to_tensor", "resize_image", "resize_mask", "scale_pairs"]


def as_size(name: str, value: object) -> tuple[int, int]:
    """``(H, W)`` from an int (a square) or a pair of ints."""
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return check_int(f"{name}[0]", value[0], minimum=1), check_int(f"{name}[1]", value[1], minimum=1)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"Expected `{name}` to be an int or a pair (H, W) of ints, but got {value!r}.")
    side = check_int(name, value, minimum=1)
    return side, side


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """``(3, H, W)`` float in ``[0, 1]`` from a PIL image (converted to RGB)."""
    image = image.convert("RGB")
    width, height = image.size
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return data.view(height, width, 3).permute(2, 0, 1).float().div_(255)


def load_rgb(source: str | Path | Image.Image, size: tuple[int, int] | None = None) -> torch.Tensor:
    """``(3, H, W)`` float image from a path or a PIL image, resized (bicubic) to ``size`` = (H, W)."""
    if isinstance(source, Image.Image):
        image = source.convert("RGB")
    else:
        with Image.open(source) as opened:
            image = opened.convert("RGB")
    if size is not None and image.size != (size[1], size[0]):
        image = image.resize((size[1], size[0]), Image.BICUBIC)
    return pil_to_tensor(image)


def load_mask(path: str | Path) -> torch.Tensor:
    """``(H, W)`` bool mask of an image file: a pixel is inside where its grey value is non-zero."""
    with Image.open(path) as opened:
        image = opened.convert("L")
        width, height = image.size
        data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return data.view(height, width) > 0


def resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(3, H, W)`` → ``(3, *size)``: bilinear with antialiasing, clamped to ``[0, 1]``."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    resized = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False, antialias=True)
    return resized[0].clamp_(0, 1)


def centre_indices(source: int, target: int, device: torch.device | None = None) -> torch.Tensor:
    """For each of ``target`` cells along an axis, the source cell holding its centre."""
    index = ((torch.arange(target, device=device, dtype=torch.float64) + 0.5) * (source / target)).floor().long()
    return index.clamp_(0, source - 1)


def resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(H, W)`` bool → ``(*size)`` bool, each new pixel reading the old pixel at its centre."""
    if tuple(mask.shape) == tuple(size):
        return mask.bool()
    rows = centre_indices(mask.shape[0], size[0], mask.device)
    cols = centre_indices(mask.shape[1], size[1], mask.device)
    return mask.bool()[rows][:, cols]


def scale_pairs(
    pairs: torch.Tensor, ref_scale: tuple[float, float], tgt_scale: tuple[float, float]
) -> torch.Tensor:
    """``(P, 4)`` pairs ``(ref_x, ref_y, tgt_x, tgt_y)`` with each frame scaled by ``(sx, sy)``."""
    factors = torch.tensor([ref_scale[0], ref_scale[1], tgt_scale[0], tgt_scale[1]], dtype=torch.float64)
    return (pairs.to(torch.float64) * factors).to(pairs.dtype if pairs.is_floating_point() else torch.float32)
