"""Semantic Correspondence Attention Loss (SCAL), eq. 10."""

from __future__ import annotations

import torch
from torch import nn

from ..attention import CaptureResult
from ..correspondence import Correspondences
from ..utils.checks import check_option
from ._inputs import check_inputs, check_no_exact_zero, pair_log_probs
from ._reduce import batch_mean, check_eps

__all__ = ["SCAL", "SCAL_REDUCTIONS", "scal"]

SCAL_REDUCTIONS = ("per_ref", "pooled")
"""Reductions of `scal`: ``"per_ref"`` (paper) and ``"pooled"`` (released)."""


def _scal_compute(log_a: torch.Tensor, corr: Correspondences, reduction: str) -> torch.Tensor:
    mask = corr.point_mask.to(log_a.device)
    nll = -log_a  # (B, K, P), 0 where padded
    counts = mask.sum(-1).to(nll.dtype)  # (B, K)
    if reduction == "per_ref":
        per_ref = nll.sum(-1) / counts.clamp_min(1.0)
        takes_part = (counts > 0).to(nll.dtype)
        participants = takes_part.sum(-1)
        per_sample = (per_ref * takes_part).sum(-1) / participants.clamp_min(1.0)
        return batch_mean(per_sample, participants > 0)
    total = counts.sum(-1)
    return batch_mean(nll.sum((1, 2)) / total.clamp_min(1.0), total > 0)


def scal(
    x: CaptureResult | torch.Tensor,
    corr: Correspondences,
    reduction: str = "per_ref",
    eps: float = 0.0,
) -> torch.Tensor:
    """Semantic Correspondence Attention Loss, eq. 10 of the paper.

    The cross-entropy of each annotated reference point against its target token:

    $$
    \\mathcal{L}_{SCA} = -\\frac{1}{K}\\sum_{k=1}^{K}\\frac{1}{P^{(k)}}\\sum_{j=1}^{P^{(k)}}
    \\log\\left(A[G(u^{(k)}_j), v^{(k)}_j] + \\epsilon\\right)
    $$

    for one sample, where the sum runs over the references that have points (references without
    points and absent references take no part). The batch value is the mean over samples with at
    least one point, and 0 when there are none.

    Args:
        x: a `CaptureResult` (fast path), or a dense
            ``(B, N_ref_total, N_tgt)`` tensor holding A (rows softmaxed over the targets and
            averaged over blocks and heads; the slow twin).
        corr: the correspondences (B samples, K references, P points).
        reduction: ``"per_ref"`` (paper: mean over the points of each reference, then over
            references) or ``"pooled"`` (released: one mean over all points of the sample).
        eps: added inside the log (paper: 0; released: 1e-9). With ``eps = 0`` a dense ``x``
            that is exactly 0 at an annotated pair raises a `ValueError` (the loss would be
            +inf); the capture path works with log-probabilities and never meets an exact 0.

    Returns:
        Scalar loss in float32 (float64 for float64 inputs).

    Raises:
        ValueError: on a bad option, ``corr`` or ``x``; for a dense ``x``, also when it holds a
            NaN, inf or negative entry, when a row of a present reference does not sum to 1
            within ``max(1e-3, 4·eps(dtype))``, or (``eps = 0``) on an exact 0 at an annotated pair.

    Example:
        >>> corr = Correspondences.from_dicts([[{0: 1}, {0: 0, 1: 0}]], ref_tokens=[2, 2], tgt_tokens=2)
        >>> A = torch.tensor([[[0.5, 0.5], [0.5, 0.5], [0.25, 0.75], [1.0, 0.0]]])
        >>> scal(A, corr)  # -(log 0.5 + (log 0.25 + log 1.0) / 2) / 2
        tensor(0.6931)
        >>> scal(A, corr, reduction="pooled")  # -(log 0.5 + log 0.25 + log 1.0) / 3
        tensor(0.6931)
    """
    check_option("reduction", reduction, SCAL_REDUCTIONS)
    eps = check_eps("eps", eps)
    check_inputs(x, corr)
    if eps == 0 and isinstance(x, torch.Tensor):
        check_no_exact_zero(x, corr)
    return _scal_compute(pair_log_probs(x, corr, eps), corr, reduction)


class SCAL(nn.Module):
    """Module form of `scal` (same arguments and math).

    Example:
        >>> corr = Correspondences.from_dicts([[{0: 1}]], ref_tokens=[2], tgt_tokens=2)
        >>> loss = SCAL(reduction="pooled", eps=1e-9)
        >>> loss(torch.tensor([[[0.5, 0.5], [0.9, 0.1]]]), corr)
        tensor(0.6931)
    """

    def __init__(self, reduction: str = "per_ref", eps: float = 0.0) -> None:
        super().__init__()
        check_option("reduction", reduction, SCAL_REDUCTIONS)
        self.reduction = reduction
        self.eps = check_eps("eps", eps)

    def forward(self, x: CaptureResult | torch.Tensor, corr: Correspondences) -> torch.Tensor:
        """See `scal`."""
        return scal(x, corr, reduction=self.reduction, eps=self.eps)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, eps={self.eps}"
