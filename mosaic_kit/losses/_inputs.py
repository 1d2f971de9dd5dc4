"""Reading the attention statistics the losses need from either input form (private).

The losses accept ``x`` as a `CaptureResult` (fast path) or as a
dense ``(B, N_ref_total, N_tgt)`` tensor holding A (slow, obviously-correct twin). Both are
reduced here to the same two quantities, so the loss math that follows is shared.

A dense map is checked in full (it is the slow path, where a device sync costs nothing): finite,
non-negative, and every row of a present reference summing to 1 within `row_sum_tolerance` (a
map whose rows sum to 2 would otherwise give a plausible, wrong loss).
"""

from __future__ import annotations

import math

import torch

from ..attention import CaptureResult
from ..correspondence import Correspondences
from ..utils.checks import check_floating, check_shape, compute_dtype
from ..utils.finite import check_finite


def _same_points(a: Correspondences, b: Correspondences) -> bool:
    """True when two correspondence batches hold the same layout, points and masks."""
    if (a.ref_tokens, a.tgt_tokens, a.point_mask.shape) != (b.ref_tokens, b.tgt_tokens, b.point_mask.shape):
        return False
    b = b.to(a.device)
    mask = a.point_mask
    return (
        torch.equal(mask, b.point_mask)
        and torch.equal(a.ref_present, b.ref_present)
        and torch.equal(a.ref_index[mask], b.ref_index[mask])
        and torch.equal(a.tgt_index[mask], b.tgt_index[mask])
    )


def check_inputs(x: object, corr: object) -> None:
    """Validates ``corr`` and that ``x`` matches it."""
    if not isinstance(corr, Correspondences):
        raise ValueError(f"Expected `corr` to be a Correspondences, but got {type(corr).__name__}.")
    if isinstance(x, CaptureResult):
        if x.corr is not corr and not _same_points(x.corr, corr):
            raise ValueError(
                "Expected `x` captured for `corr` (the same points, masks and token layout), but the capture "
                "was built for other correspondences; capture again after changing them (e.g. after "
                "enforce_disjoint or subsample)."
            )
        return
    if not isinstance(x, torch.Tensor):
        raise ValueError(
            f"Expected `x` to be a CaptureResult or a dense (B, N_ref_total, N_tgt) tensor, but got {type(x).__name__}."
        )
    check_shape("x", x, [corr.batch_size, corr.total_ref_tokens, corr.tgt_tokens], "(B, N_ref_total, N_tgt)")
    check_floating("x", x)
    check_dense_map(x, corr)


def row_sum_tolerance(dtype: torch.dtype) -> float:
    """How far a row of a dense map may sum from 1: ``max(1e-3, 4·eps(dtype))`` (bf16: 0.031)."""
    return max(1e-3, 4 * torch.finfo(dtype).eps)


def present_rows(corr: Correspondences) -> torch.Tensor:
    """``(B, N_ref_total)`` bool: the rows of A that belong to a present reference."""
    counts = torch.tensor(corr.ref_tokens, device=corr.device)
    return torch.repeat_interleave(corr.ref_present, counts, dim=1)


def check_dense_map(x: torch.Tensor, corr: Correspondences) -> None:
    """Raises unless the dense map ``x`` is finite, >= 0 and its present rows sum to 1 (see module doc)."""
    check_finite("x", x, force=True)
    with torch.no_grad():
        negative = x < 0
        if bool(negative.any()):
            b, row, col = (int(i) for i in negative.nonzero()[0])
            raise ValueError(
                f"Expected `x` to hold attention probabilities >= 0, but got {int(negative.sum())} negative entries "
                f"(e.g. x[{b}, {row}, {col}] = {float(x[b, row, col]):.6g})."
            )
        sums = x.sum(-1, dtype=compute_dtype(x.dtype))
        tolerance = row_sum_tolerance(x.dtype)
        off = present_rows(corr).to(x.device) & ((sums - 1).abs() > tolerance)
        if bool(off.any()):
            b, row = (int(i) for i in off.nonzero()[0])
            raise ValueError(
                f"Expected every row of `x` of a present reference (A softmaxed over the N_tgt target tokens) to sum "
                f"to 1 within {tolerance:.3g}, but {int(off.sum())} rows do not, e.g. row {row} of sample {b} sums to "
                f"{float(sums[b, row]):.6g}."
            )


def check_no_exact_zero(x: torch.Tensor, corr: Correspondences) -> None:
    """With ``eps == 0``: raises when the dense map is exactly 0 at an annotated pair (SCAL = +inf)."""
    rows = torch.where(corr.point_mask, corr.global_rows, 0)
    cols = torch.where(corr.point_mask, corr.tgt_index, 0)
    picked = x.detach()[torch.arange(corr.batch_size, device=x.device).view(-1, 1, 1), rows.to(x.device), cols.to(x.device)]
    zero = (picked == 0) & corr.point_mask.to(x.device)
    if bool(zero.any()):
        b, k, p = (int(i) for i in zero.nonzero()[0])
        raise ValueError(
            f"Expected `x` > 0 at every annotated pair with eps = 0 (-log 0 is +inf), but A is exactly 0 at "
            f"{int(zero.sum())} pairs, e.g. sample {b}, reference {k}, point {p} (row {int(rows[b, k, p])}, target "
            f"token {int(cols[b, k, p])}); pass eps > 0 (released: 1e-9) or use the capture path, which works in log space."
        )


def pair_log_probs(x: CaptureResult | torch.Tensor, corr: Correspondences, eps: float) -> torch.Tensor:
    """``(B, K, P)`` ``log(A[G(u), v] + eps)``, 0 where padded, in the loss dtype."""
    if isinstance(x, CaptureResult):
        log_a = x.pair_log_probs
        if eps > 0:
            log_a = torch.logaddexp(log_a, torch.full_like(log_a, math.log(eps)))
    else:
        dense = x.to(compute_dtype(x.dtype))
        rows = torch.where(corr.point_mask, corr.global_rows, 0).flatten(1)
        cols = torch.where(corr.point_mask, corr.tgt_index, 0).flatten(1)
        picked = dense[torch.arange(corr.batch_size, device=dense.device)[:, None], rows, cols]
        # Padded slots read 1 so that neither their value nor their gradient can be inf/NaN.
        picked = torch.where(corr.point_mask.flatten(1).to(picked.device), picked, 1.0)
        log_a = torch.log(picked + eps).view(corr.point_mask.shape)
    return torch.where(corr.point_mask.to(log_a.device), log_a, 0.0)


def ref_rows(x: CaptureResult | torch.Tensor, corr: Correspondences, aggregate: str | None) -> tuple[torch.Tensor, str]:
    """``(B, K, N_tgt)`` mean attention row of each reference, and the aggregate used."""
    if isinstance(x, CaptureResult):
        if x.ref_rows is None:
            raise ValueError(
                "Expected `x` captured with aggregate 'points' or 'all' for MDL, but it was captured with aggregate=None."
            )
        if aggregate is not None and aggregate != x.aggregate:
            raise ValueError(
                f"Expected `aggregate` to match the capture's aggregate {x.aggregate!r}, but got {aggregate!r}."
            )
        return x.ref_rows, x.aggregate
    aggregate = aggregate or "points"
    dense = x.to(compute_dtype(x.dtype))
    if aggregate == "points":
        rows = torch.where(corr.point_mask, corr.global_rows, 0)
        picked = dense[torch.arange(corr.batch_size, device=dense.device).view(-1, 1, 1), rows]  # (B, K, P, N_tgt)
        mask = corr.point_mask[..., None].to(dense.dtype)
        return (picked * mask).sum(2) / corr.num_points.clamp_min(1)[..., None].to(dense.dtype), aggregate
    means = [dense[:, off : off + n].mean(1) for off, n in zip(corr.ref_offsets, corr.ref_tokens)]
    return torch.stack(means, dim=1) * corr.ref_present[..., None].to(dense.dtype), aggregate
