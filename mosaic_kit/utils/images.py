"""Tensor ↔ PIL image conversion, one owner for the project's convention: a float image is
``(3, H, W)`` (or ``(H, W)`` grey) with values in [0, 1]; it becomes 8-bit by
``round(clamp(x, 0, 1) · 255)``, and an 8-bit image becomes float by ``x / 255``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .checks import shape_str

if TYPE_CHECKING:
    from PIL import Image

__all__ = ["pil_to_tensor", "tensor_to_pil", "to_uint8"]


def to_uint8(image: torch.Tensor) -> torch.Tensor:
    """Float values in [0, 1] (clamped) as uint8 ``round(x · 255)``; uint8 passes, bool → 0/255.

    Example:
        >>> to_uint8(torch.tensor([-1.0, 0.5, 0.999, 2.0])).tolist()
        [0, 128, 255, 255]
    """
    if not isinstance(image, torch.Tensor):
        raise ValueError(f"Expected `image` to be a torch.Tensor, but got {type(image).__name__}.")
    if image.dtype == torch.uint8:
        return image
    if image.dtype == torch.bool:
        return image.to(torch.uint8) * 255
    if not image.is_floating_point():
        raise ValueError(f"Expected `image` with a floating, uint8 or bool dtype, but got {image.dtype}.")
    return (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)


def tensor_to_pil(image: torch.Tensor) -> Image.Image:
    """A ``(3, H, W)`` image as an RGB PIL image, or an ``(H, W)`` one as a grey (``"L"``) image.

    Args:
        image: float in [0, 1] (clamped), uint8, or bool (a mask: 0 or 255), on any device.

    Returns:
        A PIL image of size ``(W, H)``.

    Example:
        >>> tensor_to_pil(torch.ones(3, 4, 6)).size
        (6, 4)
        >>> tensor_to_pil(torch.tensor([[True, False]])).getpixel((0, 0))
        255
    """
    from PIL import Image

    if not isinstance(image, torch.Tensor) or not (image.ndim == 2 or (image.ndim == 3 and image.shape[0] == 3)):
        got = shape_str(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"Expected `image` of shape (3, H, W) or (H, W), but got {got}.")
    array = to_uint8(image).cpu()
    if array.ndim == 2:
        return Image.frombytes("L", (array.shape[1], array.shape[0]), array.contiguous().numpy().tobytes())
    array = array.permute(1, 2, 0).contiguous()
    return Image.frombytes("RGB", (array.shape[1], array.shape[0]), array.numpy().tobytes())


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image as ``(3, H, W)`` float32 in [0, 1], a grey (``"L"``) one as ``(H, W)``.

    Other modes raise (convert first, e.g. `mosaic_kit.data` reads any mode through its `to_rgb`).

    Example:
        >>> from PIL import Image
        >>> pil_to_tensor(Image.new("RGB", (6, 4), (255, 0, 0)))[:, 0, 0].tolist()
        [1.0, 0.0, 0.0]
        >>> pil_to_tensor(tensor_to_pil(torch.full((2, 3), 0.5))).mul(255).tolist()[0]
        [128.0, 128.0, 128.0]
    """
    from PIL import Image

    if not isinstance(image, Image.Image):
        raise ValueError(f"Expected `image` to be a PIL image, but got {type(image).__name__}.")
    if image.mode not in ("RGB", "L"):
        raise ValueError(f"Expected `image` in PIL mode 'RGB' or 'L', but got {image.mode!r}.")
    width, height = image.size
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    if image.mode == "L":
        return data.view(height, width).float().div_(255)
    return data.view(height, width, 3).permute(2, 0, 1).float().div_(255)
