"""Pictures of matches: two images side by side with a line per correspondence."""

from __future__ import annotations

import torch

try:
    from kornia.image import draw_line
except ImportError:  # kornia < 0.8.3
    from kornia.utils import draw_line

from ..utils.checks import check_int, check_shape
from ..utils.images import to_uint8

__all__ = ["draw_matches"]


def _hues(count: int) -> torch.Tensor:
    """``(count, 3)`` distinct bright colours in [0, 1]."""
    hue = torch.arange(count, dtype=torch.float32) * 0.61803398875 % 1.0
    channel = torch.stack([hue, hue + 1 / 3, hue + 2 / 3], dim=-1) % 1.0
    return (0.5 + 0.5 * torch.cos(2 * torch.pi * channel)).clamp(0, 1)


def draw_matches(
    left: torch.Tensor,
    right: torch.Tensor,
    left_xy: torch.Tensor,
    right_xy: torch.Tensor,
    max_lines: int = 200,
    seed: int = 0,
    colours: torch.Tensor | None = None,
) -> torch.Tensor:
    """Draws ``left`` and ``right`` side by side with a line from each ``left_xy`` to ``right_xy``.

    Args:
        left: ``(3, H1, W1)`` float image in [0, 1].
        right: ``(3, H2, W2)`` float image in [0, 1].
        left_xy: ``(N, 2)`` ``(x, y)`` pixel points in ``left``.
        right_xy: ``(N, 2)`` ``(x, y)`` pixel points in ``right``.
        max_lines: at most this many lines, a seeded random subset when there are more.
        seed: seed of the subset.
        colours: optional ``(N, 3)`` float colours in [0, 1], one per line (e.g. green for a
            correct match, red for a wrong one); default: distinct hues.

    Returns:
        ``(3, max(H1, H2), W1 + W2)`` uint8 image.

    Example:
        >>> canvas = draw_matches(torch.zeros(3, 8, 8), torch.zeros(3, 8, 8),
        ...                       torch.tensor([[0.5, 0.5]]), torch.tensor([[7.5, 7.5]]))
        >>> canvas.shape, canvas.dtype, bool(canvas[:, 0, 0].any()), bool(canvas[:, 7, 15].any())
        (torch.Size([3, 8, 16]), torch.uint8, True, True)
    """
    check_shape("left", left, [3, None, None], "(3, H1, W1)")
    check_shape("right", right, [3, None, None], "(3, H2, W2)")
    check_shape("left_xy", left_xy, [None, 2], "(N, 2)")
    check_shape("right_xy", right_xy, [left_xy.shape[0], 2], "(N, 2)")
    max_lines = check_int("max_lines", max_lines, minimum=0)
    height = max(left.shape[1], right.shape[1])
    offset = left.shape[2]
    canvas = torch.zeros(3, height, offset + right.shape[2])
    canvas[:, : left.shape[1], :offset] = left.float().clamp(0, 1).cpu()
    canvas[:, : right.shape[1], offset:] = right.float().clamp(0, 1).cpu()
    count = left_xy.shape[0]
    chosen = torch.arange(count)
    if count > max_lines:
        chosen = torch.randperm(count, generator=torch.Generator().manual_seed(seed))[:max_lines].sort().values
    if colours is None:
        palette = _hues(len(chosen))
    else:
        check_shape("colours", colours, [count, 3], "(N, 3)")
        palette = colours.float().clamp(0, 1).cpu()[chosen]
    limits_left = torch.tensor([left.shape[2] - 1, left.shape[1] - 1])
    limits_right = torch.tensor([right.shape[2] - 1, right.shape[1] - 1])
    for colour, i in zip(palette, chosen.tolist()):
        start = torch.minimum(left_xy[i].cpu().floor().long().clamp_min(0), limits_left)
        end = torch.minimum(right_xy[i].cpu().floor().long().clamp_min(0), limits_right) + torch.tensor([offset, 0])
        draw_line(canvas, start, end, colour)
    return to_uint8(canvas)
