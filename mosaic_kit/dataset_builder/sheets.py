"""The dataset builder's contact sheets: masks tinted over an image (`overlay_masks`) and rows of
panels at one height with their captions (`panel_sheet`; `mosaic_kit.eval.contact_sheet` is the
thumbnail grid of references and generated images)."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

import torch
from PIL import Image, ImageDraw

from ..data import resize_mask, to_rgb
from ..utils.images import pil_to_tensor, tensor_to_pil

__all__ = ["overlay_masks", "panel_sheet"]


_COLOURS = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240)]


def overlay_masks(image: Image.Image, masks: Sequence[torch.Tensor], boxes: Sequence[Sequence[float]] = ()) -> Image.Image:
    """``image`` with each mask tinted in its colour (and each box outlined).

    Args:
        image: the image.
        masks: ``(h, w)`` bool masks (any size; read at the image's pixel centres).
        boxes: optional ``[x0, y0, x1, y1]`` boxes in the image's pixels.

    Returns:
        A new RGB image.

    Examples:
        >>> mask = torch.zeros(4, 4, dtype=torch.bool); mask[0, 0] = True
        >>> out = overlay_masks(Image.new("RGB", (4, 4), "black"), [mask])
        >>> out.getpixel((0, 0)) != (0, 0, 0), out.getpixel((3, 3))
        (True, (0, 0, 0))
    """
    pixels = pil_to_tensor(to_rgb(image))
    for k, mask in enumerate(masks):
        mask = resize_mask(mask, (image.height, image.width))
        colour = torch.tensor(_COLOURS[k % len(_COLOURS)], dtype=torch.float32).view(3, 1) / 255
        pixels[:, mask] = 0.5 * pixels[:, mask] + 0.5 * colour
    out = tensor_to_pil(pixels)
    draw = ImageDraw.Draw(out)
    for k, box in enumerate(boxes):
        draw.rectangle([float(v) for v in box], outline=_COLOURS[k % len(_COLOURS)], width=2)
    return out


def panel_sheet(rows: Sequence[tuple[Sequence[Image.Image], str]], height: int = 160, min_width: int = 0) -> Image.Image:
    """One row per sample: its panels scaled to ``height`` side by side, its caption above (at
    most two lines, wrapped).

    Args:
        rows: per sample, its panels and a caption.
        height: panel height in pixels.
        min_width: the sheet's least width in pixels.

    Returns:
        The sheet.

    Examples:
        >>> sheet = panel_sheet([([Image.new("RGB", (32, 16)), Image.new("RGB", (16, 16))], "a")], height=16)
        >>> sheet.size
        (48, 32)
        >>> panel_sheet([([Image.new("RGB", (16, 16))], "a long caption " * 9)], height=16, min_width=120).size
        (120, 44)
    """
    if not rows:
        raise ValueError("Expected at least one row in `rows`, but got none.")
    scaled = [[p.resize((max(1, round(p.width * height / p.height)), height)) for p in panels] for panels, _ in rows]
    width = max(max(sum(p.width for p in panels) for panels in scaled), min_width)
    chars = max(8, width // 6)  # PIL's default bitmap font is about 6 pixels per character
    captions = [textwrap.wrap(caption, chars)[:2] or [""] for _, caption in rows]
    line = 12
    tops, top = [], 0
    for lines in captions:
        tops.append(top)
        top += len(lines) * line + 4 + height
    sheet = Image.new("RGB", (width, top), "white")
    draw = ImageDraw.Draw(sheet)
    for panels, lines, top in zip(scaled, captions, tops):
        for i, text in enumerate(lines):
            draw.text((2, top + 2 + i * line), text, fill=(0, 0, 0))
        x, y = 0, top + len(lines) * line + 4
        for panel in panels:
            sheet.paste(panel, (x, y))
            x += panel.width
    return sheet
