"""Captions on contact sheets (`mosaic_kit.eval.contact_sheet`, also the trainer's validation sheets)
keep the spaces between words visible: every word gap is clearly wider than any gap inside a word."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mosaic_kit.eval import SheetRow, contact_sheet

CAPTION = "two subjects side by side on a table"


def _first_line(text: str) -> np.ndarray:
    """Ink mask (dark pixels) of the first caption line of a sheet wide enough to hold it."""
    blanks = [Image.new("RGB", (8, 8), "white")] * 8  # white cells make the sheet wide: one line
    sheet = contact_sheet([SheetRow(text, outputs=blanks)], thumb_size=64)
    ink = np.asarray(sheet.convert("L")) < 160
    top = np.flatnonzero(ink.any(1))[0]
    return ink[: top + 20]


def _blank_runs(ink: np.ndarray) -> list[int]:
    """Widths of the runs of blank pixel columns between the first and last inked column."""
    columns = ink.any(0)
    inked = np.flatnonzero(columns)
    runs, run = [], 0
    for has_ink in columns[inked[0] : inked[-1] + 1]:
        if has_ink:
            if run:
                runs.append(run)
            run = 0
        else:
            run += 1
    return sorted(runs, reverse=True)


def _ink_width(ink: np.ndarray) -> int:
    inked = np.flatnonzero(ink.any(0))
    return int(inked[-1] - inked[0] + 1)


@pytest.mark.parametrize("text", [CAPTION, "attention of each reference's points"])  # an inference, a validation caption
def test_caption_spaces_are_wider_than_any_gap_between_letters(text):
    spaces = text.count(" ")
    runs = _blank_runs(_first_line(text))
    word_gaps, letter_gaps = runs[:spaces], runs[spaces:]
    assert len(word_gaps) == spaces and all(gap >= 3 for gap in word_gaps), runs
    assert min(word_gaps) >= max(letter_gaps) + 2, runs  # the default 10 px font: 2 px spaces, 2-3 px letter gaps


def test_caption_with_spaces_is_wider_than_without():
    spaces = CAPTION.count(" ")
    with_spaces = _ink_width(_first_line(CAPTION))
    without = _ink_width(_first_line(CAPTION.replace(" ", "")))
    assert with_spaces - without >= 3 * spaces, (with_spaces, without)
