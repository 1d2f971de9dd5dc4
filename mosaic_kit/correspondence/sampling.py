"""Subsampling correspondences to at most P points per reference."""

from __future__ import annotations

import torch

from ..utils.checks import check_int, check_int_pair, check_option
from .batch import Correspondences, check_correspondences
from .grid import TokenGrid

__all__ = ["SUBSAMPLE_METHODS", "subsample"]

SUBSAMPLE_METHODS = ("random", "farthest")
"""Methods of `subsample`."""


def _random_order(corr: Correspondences, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    keys = torch.rand(corr.point_mask.shape, generator=generator).to(corr.device)
    keys = keys.masked_fill(~corr.point_mask, 2.0)  # padding sorts last
    return keys.argsort(dim=-1, stable=True)


def _farthest_order(corr: Correspondences, max_points: int, grid_cols: int) -> torch.Tensor:
    """Greedy farthest-point order on the target grid, starting at each list's first point."""
    rowcol = torch.stack((corr.tgt_index // grid_cols, corr.tgt_index % grid_cols), dim=-1).float()
    unselected = torch.where(corr.point_mask, float("inf"), float("-inf"))
    # The first real point of every list (argmax returns the first True).
    chosen = corr.point_mask.to(torch.int8).argmax(-1, keepdim=True)
    order = [chosen]
    for _ in range(1, max_points):
        picked = rowcol.gather(2, chosen[..., None].expand(-1, -1, -1, 2))
        dist = (rowcol - picked).square().sum(-1)
        unselected = torch.minimum(unselected, dist)
        unselected = unselected.scatter(-1, chosen, float("-inf"))
        chosen = unselected.argmax(-1, keepdim=True)
        order.append(chosen)
    return torch.cat(order, dim=-1)


def subsample(
    corr: Correspondences,
    max_points: int,
    method: str = "random",
    seed: int = 0,
    target_grid: TokenGrid | tuple[int, int] | None = None,
) -> Correspondences:
    """Keeps at most ``max_points`` points per reference.

    - ``"random"``: a uniform random subset, reproducible by ``seed`` (points in random order);
    - ``"farthest"``: greedy farthest-point sampling on the target token grid, starting from each
      reference's first point (deterministic); spreads the points over the target.

    References with at most ``max_points`` points keep all of them.

    Args:
        corr: the correspondences.
        max_points: the most points kept per reference (>= 1).
        method: one of `SUBSAMPLE_METHODS`.
        seed: seed of the random subset.
        target_grid: the target's token grid (a `TokenGrid` or ``(rows, cols)``), needed by
            ``"farthest"``; ``rows * cols`` must equal ``corr.tgt_tokens``.

    Returns:
        Correspondences with ``P = min(P, max_points)``.

    Example:
        >>> corr = Correspondences.from_dicts([[{0: 0, 1: 1, 2: 2, 3: 15}]], ref_tokens=[4], tgt_tokens=16)
        >>> subsample(corr, 2, "farthest", target_grid=(4, 4)).to_dicts()  # token 0, then the far corner
        [[{0: 0, 3: 15}]]
        >>> subsample(corr, 2, "random", seed=3).num_points
        tensor([[2]])
    """
    check_correspondences("corr", corr)
    check_option("method", method, SUBSAMPLE_METHODS)
    max_points = check_int("max_points", max_points, minimum=1)
    seed = check_int("seed", seed)
    keep = min(max_points, corr.max_points)
    if method == "random":
        order = _random_order(corr, seed)[..., :keep]
    else:
        if target_grid is None:
            raise ValueError("Expected `target_grid` (TokenGrid or (rows, cols)) for method 'farthest', but got None.")
        if isinstance(target_grid, TokenGrid):
            rows, cols = target_grid.rows, target_grid.cols
        else:
            rows, cols = check_int_pair("target_grid", target_grid)
        if rows * cols != corr.tgt_tokens:
            raise ValueError(
                f"Expected `target_grid` with rows * cols = corr.tgt_tokens = {corr.tgt_tokens}, "
                f"but got {rows} * {cols} = {rows * cols}."
            )
        if keep == 0:
            order = torch.zeros(*corr.point_mask.shape[:2], 0, dtype=torch.long, device=corr.device)
        else:
            order = _farthest_order(corr, keep, cols)
    slots = torch.arange(keep, device=corr.device).view(1, 1, -1)
    valid = slots < corr.num_points[..., None]
    return corr._gather_points(order, valid)
