"""Image, mask and point helpers shared by the readers, the composer and the collate (private).

Conventions: images are ``(3, H, W)`` float in ``[0, 1]``; masks ``(H, W)`` bool; points
``(x, y)`` in continuous pixel coordinates (pixel ``i`` covers ``[i, i + 1)``, its centre is
``i + 0.5``), so resizing a frame from ``W`` to ``W'`` maps ``x`` to ``x * W' / W`` exactly.

Every image file goes through `to_rgb` (see there: the pixel limit, 16-bit, palette, alpha and
CMYK images).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from ..utils.checks import check_int
from ..utils.images import pil_to_tensor as _pil_to_tensor

__all__ = [
    "ALPHA_BACKGROUND", "MAX_IMAGE_PIXELS", "as_size", "load_mask", "load_rgb", "open_image", "pil_to_tensor",
    "resize_image", "resize_mask", "scale_pairs", "to_rgb",
]

MAX_IMAGE_PIXELS = 8192 * 8192
"""The most pixels (W·H) an image file may have; a larger one is refused from its header, before
any pixel is decoded (a decompression bomb: a small file declaring a huge image)."""

ALPHA_BACKGROUND = (255, 255, 255)
"""The RGB colour (white) that images with an alpha channel are composited on."""

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")
_PLAIN_MODES = ("1", "L", "RGB", "RGBX", "CMYK", "YCbCr", "HSV")


def as_size(name: str, value: object) -> tuple[int, int]:
    """``(H, W)`` from an int (a square) or a pair of ints."""
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return check_int(f"{name}[0]", value[0], minimum=1), check_int(f"{name}[1]", value[1], minimum=1)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"Expected `{name}` to be an int or a pair (H, W) of ints, but got {value!r}.")
    side = check_int(name, value, minimum=1)
    return side, side


def check_pixels(image: Image.Image, where: str) -> None:
    """Raises `ValueError` naming ``where`` when ``image`` has more than `MAX_IMAGE_PIXELS` pixels."""
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise ValueError(
            f"{where}: expected an image of at most MAX_IMAGE_PIXELS = {MAX_IMAGE_PIXELS} pixels, but it declares "
            f"{width}×{height} = {width * height} (W×H; a decompression bomb?); it was not decoded"
        )


def open_image(path: str | Path) -> Image.Image:
    """The image of a file, decoded, after checking its declared size against `MAX_IMAGE_PIXELS`.

    Args:
        path: the image file.

    Returns:
        The decoded PIL image, in its own mode (pass it to `to_rgb`).

    Raises:
        ValueError: naming the file, when it is missing, not an image, too large or truncated.

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "grey16.png"
        >>> Image.new("I;16", (3, 2), 65535).save(path)
        >>> image = open_image(path)
        >>> image.mode, image.size, to_rgb(image).getpixel((0, 0))
        ('I;16', (3, 2), (255, 255, 255))
        >>> open_image(path.with_name("missing.png"))
        Traceback (most recent call last):
        ...
        ValueError: ...missing.png: expected a readable image file, but FileNotFoundError: ...
    """
    try:
        with warnings.catch_warnings():  # PIL warns above 89 M pixels; anything that large is refused below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(path)
        with opened:
            check_pixels(opened, str(path))
            opened.load()
            return opened.copy()
    except Image.DecompressionBombError as error:  # PIL's own limit, from the header as well
        raise ValueError(f"{path}: expected at most MAX_IMAGE_PIXELS = {MAX_IMAGE_PIXELS} pixels, but {error}") from None
    except (OSError, SyntaxError) as error:  # missing, unidentified (an OSError), truncated, corrupt
        raise ValueError(f"{path}: expected a readable image file, but {type(error).__name__}: {error}") from None


def _sixteen_bit_to_l(image: Image.Image, where: str) -> Image.Image:
    """A 16-bit grey image (or a 32-bit one holding 16-bit values) as 8-bit ``L``: ``round(v / 257)``."""
    width, height = image.size
    values = torch.frombuffer(bytearray(image.convert("I").tobytes()), dtype=torch.int32).view(height, width)
    if values.numel() and (int(values.min()) < 0 or int(values.max()) > 65535):
        raise ValueError(
            f"{where}: expected a 16-bit grey image with values in [0, 65535], but mode {image.mode!r} holds values "
            f"in [{int(values.min())}, {int(values.max())}]"
        )
    eight_bit = torch.div(values + 128, 257, rounding_mode="floor").to(torch.uint8)
    return Image.frombytes("L", (width, height), bytes(eight_bit.contiguous().untyped_storage()))


def to_rgb(image: Image.Image, where: str = "image") -> Image.Image:
    """Any supported PIL image as 8-bit RGB, or a `ValueError` naming ``where`` (never a silent clip).

    - RGB, grey (``1``, ``L``), CMYK (PIL's conversion, no colour profile), YCbCr and HSV: converted;
    - 16-bit grey (``I;16*``, and ``I`` holding values in [0, 65535]): scaled, ``round(v / 257)``
      (PIL's own conversion would clip every value above 255 to white);
    - alpha (``LA``, ``RGBA``, ``PA``, and a palette ``P`` with transparency): composited on
      `ALPHA_BACKGROUND` (white);
    - palette ``P`` without transparency: its colours;
    - anything else (``F`` floats, whose range is unknown; ``LAB``; 16-bit ``I`` values outside
      [0, 65535]): refused;
    - more than `MAX_IMAGE_PIXELS` pixels: refused.

    Args:
        image: a PIL image.
        where: the file or argument named in errors.

    Returns:
        An RGB image of the same size.

    Example:
        >>> grey16 = Image.new("I;16", (1, 1), 32896)
        >>> to_rgb(grey16).getpixel((0, 0))  # PIL's convert("RGB") gives (255, 255, 255)
        (128, 128, 128)
        >>> to_rgb(Image.new("RGBA", (1, 1), (255, 0, 0, 0))).getpixel((0, 0))  # transparent: background
        (255, 255, 255)
    """
    if not isinstance(image, Image.Image):
        raise ValueError(f"Expected `{where}` to be a PIL image, but got {type(image).__name__}.")
    check_pixels(image, where)
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES:
        return _sixteen_bit_to_l(image, where).convert("RGB")
    if mode == "P" and ("transparency" in image.info or image.palette is not None and image.palette.mode == "RGBA"):
        mode = "PA"
    if mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in _PLAIN_MODES or mode == "P":
        return image if mode == "RGB" else image.convert("RGB")
    raise ValueError(
        f"{where}: expected an RGB, grey, 16-bit grey, palette, CMYK or alpha image, but got PIL mode {mode!r}"
    )


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """``(3, H, W)`` float in ``[0, 1]`` from a PIL image (converted with `to_rgb`)."""
    return _pil_to_tensor(to_rgb(image))


def load_rgb(source: str | Path | Image.Image, size: tuple[int, int] | None = None) -> torch.Tensor:
    """``(3, H, W)`` float image from a path or a PIL image (`to_rgb`), resized (bicubic) to ``size`` = (H, W).

    Raises:
        ValueError: naming the file, when it cannot be read or converted (see `open_image`, `to_rgb`).
    """
    if isinstance(source, Image.Image):
        image = to_rgb(source)
    else:
        image = to_rgb(open_image(source), str(source))
    if size is not None and image.size != (size[1], size[0]):
        image = image.resize((size[1], size[0]), Image.BICUBIC)
    return pil_to_tensor(image)


def load_mask(path: str | Path) -> torch.Tensor:
    """``(H, W)`` bool mask of an image file: a pixel is inside where its grey value is non-zero.

    The grey value is PIL's ``L`` conversion (alpha is ignored); 16-bit grey masks are read at
    full depth (any non-zero 16-bit value is inside).

    Raises:
        ValueError: naming the file, when it cannot be read (see `open_image`).
    """
    image = open_image(path)
    width, height = image.size
    if image.mode in _SIXTEEN_BIT_MODES:
        data = torch.frombuffer(bytearray(image.convert("I").tobytes()), dtype=torch.int32)
    else:
        data = torch.frombuffer(bytearray(image.convert("L").tobytes()), dtype=torch.uint8)
    return data.view(height, width) != 0


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
