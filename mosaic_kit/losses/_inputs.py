"""Reading the attention statistics the losses need from either input form (private).

The losses accept ``x`` as a `CaptureResult` (fast path) or as a
dense ``(B, N_ref_total, N_tgt)`` tensor holding A (slow, obviously-correct twin). Both are
reduced here to the same two quantities, so the loss math that follows is shared.
"""

from __future__ import annotations

import math

import torch

from ..attention import CaptureResult
from ..correspondence import Correspondences
from ..correspondence._checks import check_floating, check_shape, compute_dtype


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
