"""Attention localisation: do annotated reference points attend to their target tokens?

For each annotated pair `(u, v)` of reference k (a `Correspondences` point), take the attention
row of reference token u over the target tokens (eq. 8), find its argmax `v̂`, and call it a hit
when `v̂` lies within `radius` tokens of `v` on the target token grid (Chebyshev distance, so
`radius=1` accepts the 3×3 neighbourhood). The hit rate is the fraction of real points that hit.

`RefTargetCapture` keeps only what the losses need (pair log-probabilities and per-reference
mean rows), not a full row per point, so the score takes the rows themselves, in either form:

- `(B, K, P, N_tgt)`, one row per annotated point: `mosaic_kit.attention.PointAttentionRows`
  accumulates exactly these (fed like `RefTargetCapture`, e.g. alongside it during training);
- `(B, N_ref_total, N_tgt)`, the dense map: `mosaic_kit.attention.dense_ref_target_attention(
  queries, keys)` from the per-block reference queries `(B, H, N_ref_total, D)` and target keys
  `(B, H, N_tgt, D)` (the tensors one feeds to `RefTargetCapture.add`); small inputs only.
"""

from __future__ import annotations

import torch

from ..correspondence import Correspondences, TokenGrid
from ..utils.checks import (
    check_floating,
    check_int,
    check_option,
    check_shape,
)

__all__ = ["HIT_RATE_REDUCTIONS", "attention_hit_rate"]

HIT_RATE_REDUCTIONS = ("mean", "none")
"""Reductions of `attention_hit_rate`: the fraction of real points that hit, or the hits."""


def _grid_shape(tgt_grid: object) -> tuple[int, int]:
    if isinstance(tgt_grid, TokenGrid):
        return tgt_grid.rows, tgt_grid.cols
    if isinstance(tgt_grid, (tuple, list)) and len(tgt_grid) == 2:
        return check_int("tgt_grid[0] (rows)", tgt_grid[0], minimum=1), check_int("tgt_grid[1] (cols)", tgt_grid[1], minimum=1)
    raise ValueError(f"Expected `tgt_grid` to be a TokenGrid or a (rows, cols) pair, but got {tgt_grid!r}.")


def attention_hit_rate(
    attention: torch.Tensor,
    corr: Correspondences,
    tgt_grid: TokenGrid | tuple[int, int],
    radius: int = 1,
    reduction: str = "mean",
) -> torch.Tensor:
    """Hit rate of annotated points: the argmax of each point's attention row over the target
    tokens lies within `radius` tokens (Chebyshev distance on the target grid) of its target token.

    For a real pair `(u, v)` of sample b, reference k (global row `G(u) = offset_k + u`, eq. 9):

    $$
    \\hat v = \\arg\\max_t A_b[G(u), t], \\qquad
    \\text{hit} = \\max(|r(\\hat v) - r(v)|, |c(\\hat v) - c(v)|) \\le \\text{radius}
    $$

    with `r(t) = t // cols`, `c(t) = t % cols` (row-major tokens). Ties go to the lowest token
    index. Any increasing transform of A (log-probabilities, logits) gives the same result.

    Args:
        attention: either `(B, N_ref_total, N_tgt)` rows indexed by global reference token, as
            returned by `mosaic_kit.attention.dense_ref_target_attention`, or `(B, K, P, N_tgt)`
            one row per point in `corr`'s padded layout (rows at padded points are ignored), as
            `mosaic_kit.attention.PointAttentionRows.result()` returns.
            Floating point.
        corr: the annotated pairs; `corr.tgt_tokens` must equal `N_tgt` and, for the 3-D form,
            `corr.total_ref_tokens` must equal `N_ref_total`.
        tgt_grid: the target's `TokenGrid`, or its `(rows, cols)`; `rows * cols == N_tgt`.
        radius: largest accepted Chebyshev distance in tokens (0: exact token); defaults to 1.
        reduction: `"mean"` (the fraction of real points that hit, a 0-dim float32 tensor, NaN
            when `corr` has no real point) or `"none"` (`(B, K, P)` bool hits, False at padded
            points); defaults to `"mean"`.

    Returns:
        See `reduction`.

    Raises:
        ValueError: on shapes that do not match `corr` or `tgt_grid`, a negative `radius`, or an
            unknown `reduction`.

    Example:
        >>> corr = Correspondences.from_dicts([[{0: 0, 1: 15}]], ref_tokens=[2], tgt_tokens=16)
        >>> attention = torch.zeros(1, 2, 16)
        >>> attention[0, 0, 5] = 1.0  # token 0 attends to (1, 1): one step from (0, 0)
        >>> attention[0, 1, 0] = 1.0  # token 1 attends to (0, 0): far from (3, 3)
        >>> attention_hit_rate(attention, corr, (4, 4), radius=1)
        tensor(0.5000)
        >>> attention_hit_rate(attention, corr, (4, 4), radius=0, reduction="none")
        tensor([[[False, False]]])
    """
    if not isinstance(corr, Correspondences):
        raise ValueError(f"Expected `corr` to be a Correspondences, but got {type(corr).__name__}.")
    check_option("reduction", reduction, HIT_RATE_REDUCTIONS)
    radius = check_int("radius", radius, minimum=0)
    rows, cols = _grid_shape(tgt_grid)
    if rows * cols != corr.tgt_tokens:
        raise ValueError(
            f"Expected `tgt_grid` with rows * cols == corr.tgt_tokens = {corr.tgt_tokens}, but got {rows} × {cols}."
        )
    batch, refs, points = corr.point_mask.shape
    if not isinstance(attention, torch.Tensor):
        raise ValueError(f"Expected `attention` to be a torch.Tensor, but got {type(attention).__name__}.")
    if attention.ndim == 3:
        check_shape("attention", attention, [batch, corr.total_ref_tokens, corr.tgt_tokens], "(B, N_ref_total, N_tgt)")
    else:
        check_shape("attention", attention, [batch, refs, points, corr.tgt_tokens], "(B, K, P, N_tgt)")
    check_floating("attention", attention)

    corr = corr.to(attention.device)
    mask = corr.point_mask
    if attention.ndim == 3:
        best_per_row = attention.argmax(dim=-1)  # (B, N_ref_total)
        global_rows = torch.where(mask, corr.global_rows, torch.zeros_like(corr.global_rows))
        predicted = best_per_row.gather(1, global_rows.reshape(batch, -1)).reshape(batch, refs, points)
    else:
        predicted = attention.argmax(dim=-1)  # (B, K, P)
    target = corr.tgt_index
    distance = torch.maximum((predicted // cols - target // cols).abs(), (predicted % cols - target % cols).abs())
    hits = (distance <= radius) & mask
    if reduction == "none":
        return hits
    total = mask.sum()
    return (hits.sum().float() / total.float()).cpu() if bool(total > 0) else torch.tensor(float("nan"))
