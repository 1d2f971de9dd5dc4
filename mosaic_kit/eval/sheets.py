"""Contact sheets: rows of text, reference thumbnails and output thumbnails, as one PIL image."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field

from PIL import Image, ImageDraw, ImageFont, ImageOps

__all__ = ["SheetRow", "contact_sheet"]

_BACKGROUND = (255, 255, 255)
_CELL = (230, 230, 230)
_TEXT = (20, 20, 20)
_MARGIN = 8
_GAP = 4
_GROUP_GAP = 16
_FONT_SIZE = 13
"""Caption size in pixels. Pillow's default font (Aileron) at its default 10 px hints the space
down to the width of the gap between letters, so words ran together; from 12 px a space is wider
than any gap inside a word."""


@dataclass
class SheetRow:
    """One row of a contact sheet: a caption, then reference thumbnails, then output thumbnails.

    Args:
        text: caption above the thumbnails (wrapped to the sheet width; may be empty).
        references: PIL images shown first (e.g. the subjects' photos).
        outputs: PIL images shown after a wider gap (e.g. the generated images).

    Example:
        >>> row = SheetRow("a dog on the beach", outputs=[Image.new("RGB", (8, 8))])
        >>> len(row.references), len(row.outputs)
        (0, 1)
    """

    text: str = ""
    references: Sequence[Image.Image] = field(default_factory=list)
    outputs: Sequence[Image.Image] = field(default_factory=list)


def _thumbnail(image: Image.Image, size: int) -> Image.Image:
    cell = Image.new("RGB", (size, size), _CELL)
    thumb = ImageOps.contain(image.convert("RGB"), (size, size), Image.Resampling.BICUBIC)  # scales up or down
    cell.paste(thumb, ((size - thumb.width) // 2, (size - thumb.height) // 2))
    return cell


def _caption_font() -> ImageFont.FreeTypeFont:
    """Pillow's bundled FreeType font (Aileron) at `_FONT_SIZE`; needs Pillow >= 10.1 with FreeType."""
    try:
        return ImageFont.load_default(size=_FONT_SIZE)
    except (ImportError, TypeError) as error:  # no FreeType, or a Pillow before 10.1 (no `size`)
        raise ImportError(
            "Contact sheets need Pillow >= 10.1 built with FreeType (every Pillow wheel is): "
            f"`pip install -U pillow` ({error})."
        ) from error


def contact_sheet(rows: Sequence[SheetRow], *, thumb_size: int = 128, title: str = "") -> Image.Image:
    """Lays out rows of captions and thumbnails (scaled to fit, aspect kept, centred on grey square cells).

    Captions use Pillow's bundled FreeType font (Aileron) at 13 px, where a space is clearly wider
    than the gaps between letters (at Pillow's default 10 px, words ran together).

    Args:
        rows: the `SheetRow`s, top to bottom (at least one).
        thumb_size: side of each thumbnail cell in pixels (>= 8); defaults to 128.
        title: optional caption at the top of the sheet.

    Returns:
        An RGB PIL image.

    Raises:
        ValueError: if `rows` is empty or holds something else than `SheetRow`s, or `thumb_size`
            is not an int >= 8.
        ImportError: if Pillow is older than 10.1 or built without FreeType.

    Example:
        >>> red, blue = Image.new("RGB", (40, 20), "red"), Image.new("RGB", (16, 16), "blue")
        >>> sheet = contact_sheet([SheetRow("refs", [red]), SheetRow("a prompt", [red], [blue, blue])], thumb_size=32)
        >>> sheet.mode, sheet.width >= 4 * 32
        ('RGB', True)
    """
    if isinstance(thumb_size, bool) or not isinstance(thumb_size, int) or thumb_size < 8:
        raise ValueError(f"Expected `thumb_size` to be an int >= 8, but got {thumb_size!r}.")
    if not isinstance(rows, Sequence) or len(rows) == 0:
        raise ValueError(f"Expected `rows` to be a non-empty list of SheetRow, but got {rows!r:.80}.")
    for index, row in enumerate(rows):
        if not isinstance(row, SheetRow):
            raise ValueError(f"Expected `rows[{index}]` to be a SheetRow, but got {type(row).__name__}.")
    font = _caption_font()
    _, top, _, bottom = font.getbbox("Ag")
    line_height = bottom - top + 4
    char_width = max(1.0, font.getlength("n"))

    def row_width(row: SheetRow) -> int:
        count = len(row.references) + len(row.outputs)
        gap = _GROUP_GAP if row.references and row.outputs else 0
        return count * thumb_size + max(0, count - 1) * _GAP + gap

    width = max(max(row_width(row) for row in rows), 6 * thumb_size // 2) + 2 * _MARGIN
    chars = max(10, int((width - 2 * _MARGIN) / char_width))

    def wrap(text: str) -> list[str]:
        return [line for paragraph in text.splitlines() for line in (textwrap.wrap(paragraph, chars) or [""])]

    title_lines = wrap(title) if title else []
    wrapped = [wrap(row.text) if row.text else [] for row in rows]
    height = _MARGIN + len(title_lines) * line_height + (_GAP if title_lines else 0)
    for row, lines in zip(rows, wrapped):
        thumbs = bool(row.references or row.outputs)
        height += len(lines) * line_height + (thumb_size if thumbs else 0) + _MARGIN
    sheet = Image.new("RGB", (width, height), _BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    y = _MARGIN
    for line in title_lines:
        draw.text((_MARGIN, y), line, fill=_TEXT, font=font)
        y += line_height
    y += _GAP if title_lines else 0
    for row, lines in zip(rows, wrapped):
        for line in lines:
            draw.text((_MARGIN, y), line, fill=_TEXT, font=font)
            y += line_height
        x = _MARGIN
        for image in row.references:
            sheet.paste(_thumbnail(image, thumb_size), (x, y))
            x += thumb_size + _GAP
        if row.references and row.outputs:
            x += _GROUP_GAP - _GAP
        for image in row.outputs:
            sheet.paste(_thumbnail(image, thumb_size), (x, y))
            x += thumb_size + _GAP
        y += (thumb_size if row.references or row.outputs else 0) + _MARGIN
    return sheet
