"""Multi-Reference Disentanglement Loss (MDL), eq. 11-14."""

from __future__ import annotations

import torch
from torch import nn

from ..attention import AGGREGATES, CaptureResult
from ..correspondence import Correspondences
from ..utils.checks import check_option
from ._inputs import check_inputs, ref_rows
from ._reduce import batch_mean, check_eps

__all__ = ["MDL", "MDL_DIVERGENCES", "mdl"]

MDL_DIVERGENCES = ("sym_kl", "jsd")
"""Divergences of `mdl`: symmetric KL (paper) and Jensen-Shannon (released)."""

_DEFAULT_EPS = {"jsd": 1e-8, "sym_kl": 0.0}


def _safe_log(values: torch.Tensor, eps: float) -> torch.Tensor:
    """``log(values + eps)``; with ``eps == 0`` values are clamped at the dtype's smallest normal
    number instead, which is exact unless a probability underflows and keeps logs finite."""
    if eps > 0:
        return torch.log(values + eps)
    return torch.log(values.clamp_min(torch.finfo(values.dtype).tiny))


def _mdl_compute(rows: torch.Tensor, takes_part: torch.Tensor, divergence: str, eps: float) -> torch.Tensor:
    tiny = torch.finfo(rows.dtype).tiny
    # Rows that take no part become uniform so that every intermediate stays finite.
    safe = torch.where(takes_part[..., None], rows, 1.0)
    dist = safe / safe.sum(-1, keepdim=True).clamp_min(tiny)  # eq. 12, L1 normalisation
    d_i, d_j = dist[:, :, None], dist[:, None]  # (B, K, 1, N), (B, 1, K, N)
    log_d = _safe_log(dist, eps)
    log_i, log_j = log_d[:, :, None], log_d[:, None]
    if divergence == "sym_kl":
        # ½ KL(a_i‖a_j) + ½ KL(a_j‖a_i) = ½ Σ_t (a_i - a_j)(log a_i - log a_j), eq. 13.
        pairwise = 0.5 * ((d_i - d_j) * (log_i - log_j)).sum(-1)
    else:
        log_mid = _safe_log(0.5 * (d_i + d_j), eps)
        pairwise = 0.5 * (d_i * (log_i - log_mid)).sum(-1) + 0.5 * (d_j * (log_j - log_mid)).sum(-1)
    refs = rows.shape[1]
    off_diagonal = ~torch.eye(refs, dtype=torch.bool, device=rows.device)
    pair_mask = takes_part[:, :, None] & takes_part[:, None] & off_diagonal
    num_pairs = pair_mask.sum((1, 2)).to(rows.dtype)
    per_sample = -torch.where(pair_mask, pairwise, 0.0).sum((1, 2)) / num_pairs.clamp_min(1.0)  # eq. 14
    return batch_mean(per_sample, num_pairs > 0)


def mdl(
    x: CaptureResult | torch.Tensor,
    corr: Correspondences,
    divergence: str = "sym_kl",
    aggregate: str | None = None,
    eps: float | None = None,
) -> torch.Tensor:
    """Multi-Reference Disentanglement Loss, eq. 11-14 of the paper.

    Per reference k, the attention rows of its correspondence points (or of all its tokens) are
    averaged and L1-normalised into a distribution $\\hat a^{(k)}$ over the target tokens
    (eq. 11-12). Then, for the K references of a sample that take part,

    $$
    \\mathcal{L}_{MD} = -\\frac{1}{K(K-1)}\\sum_{i \\neq j}
    \\operatorname{dist}(\\hat a^{(i)}, \\hat a^{(j)}),\\quad
    \\operatorname{dist} = \\tfrac12 D_{KL}(\\hat a^{(i)}\\|\\hat a^{(j)}) + \\tfrac12 D_{KL}(\\hat a^{(j)}\\|\\hat a^{(i)})
    $$

    (eq. 13-14; or the Jensen-Shannon divergence). It is minimised, so it pushes references to
    attend to different target regions. Absent references never take part; with
    ``aggregate="points"`` references without points take no part either. A sample with fewer
    than two references taking part adds nothing; the batch value is the mean over samples that
    contribute, and 0 when none does.

    Args:
        x: a `CaptureResult` captured with an aggregate, or a dense
            ``(B, N_ref_total, N_tgt)`` tensor holding A (the slow twin).
        corr: the correspondences.
        divergence: ``"sym_kl"`` (paper) or ``"jsd"`` (released).
        aggregate: ``"points"`` (paper: rows of annotated points) or ``"all"`` (released: rows of
            all tokens of each present reference). Default: the capture's, or ``"points"`` for a
            dense ``x``. Must match the capture's when given.
        eps: added inside the logs. Default: 1e-8 for ``"jsd"`` (released) and 0 for
            ``"sym_kl"``. With 0, probabilities inside the logs are clamped at the dtype's
            smallest normal number instead, which is exact unless a probability underflows and
            keeps the loss and its gradient finite when one does: an exact 0 (two references
            with disjoint supports) reads as that number, so the divergence is large and finite
            (float32: ``log`` of it is -87.3) instead of +inf.

    Returns:
        Scalar loss in float32 (float64 for float64 inputs), <= 0.

    Raises:
        ValueError: on a bad option, ``corr`` or ``x``; for a dense ``x``, also when it holds a
            NaN, inf or negative entry, or when a row of a present reference does not sum to 1
            within ``max(1e-3, 4·eps(dtype))``.

    Example:
        >>> corr = Correspondences.from_dicts([[{0: 0}, {0: 1}]], ref_tokens=[1, 1], tgt_tokens=2)
        >>> A = torch.tensor([[[0.8, 0.2], [0.2, 0.8]]])
        >>> mdl(A, corr)  # -(½·0.6·log 4 + ½·0.6·log 4)
        tensor(-0.8318)
        >>> mdl(A, corr, divergence="jsd", eps=0.0)
        tensor(-0.1927)
    """
    check_option("divergence", divergence, MDL_DIVERGENCES)
    check_option("aggregate", aggregate, AGGREGATES + (None,))
    eps = _DEFAULT_EPS[divergence] if eps is None else check_eps("eps", eps)
    check_inputs(x, corr)
    rows, used = ref_rows(x, corr, aggregate)
    present = corr.ref_present.to(rows.device)
    takes_part = present & (corr.num_points.to(rows.device) > 0) if used == "points" else present
    return _mdl_compute(rows, takes_part, divergence, eps)


class MDL(nn.Module):
    """Module form of `mdl` (same arguments and math).

    Example:
        >>> corr = Correspondences.from_dicts([[{0: 0}, {0: 1}]], ref_tokens=[1, 1], tgt_tokens=2)
        >>> MDL(divergence="jsd", aggregate="all")(torch.tensor([[[0.8, 0.2], [0.2, 0.8]]]), corr)
        tensor(-0.1927)
    """

    def __init__(self, divergence: str = "sym_kl", aggregate: str | None = None, eps: float | None = None) -> None:
        super().__init__()
        check_option("divergence", divergence, MDL_DIVERGENCES)
        check_option("aggregate", aggregate, AGGREGATES + (None,))
        self.divergence = divergence
        self.aggregate = aggregate
        self.eps = None if eps is None else check_eps("eps", eps)

    def forward(self, x: CaptureResult | torch.Tensor, corr: Correspondences) -> torch.Tensor:
        """See `mdl`."""
        return mdl(x, corr, divergence=self.divergence, aggregate=self.aggregate, eps=self.eps)

    def extra_repr(self) -> str:
        return f"divergence={self.divergence!r}, aggregate={self.aggregate!r}, eps={self.eps}"
