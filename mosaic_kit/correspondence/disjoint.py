"""Correspondence disjointness across references (eq. 2 of the paper).

Eq. 2 asks that no target token be claimed by two references of the same sample:
$\\mathcal{V}^{(i,k_1)} \\cap \\mathcal{V}^{(i,k_2)} = \\emptyset$ for $k_1 \\neq k_2$.
Several points of one reference may share a target token; that is not a conflict.
"""

from __future__ import annotations

import torch

from ..utils.checks import check_option
from .batch import Correspondences, check_correspondences

__all__ = ["DISJOINT_POLICIES", "contested_tokens", "enforce_disjoint", "find_conflicts", "is_disjoint"]

DISJOINT_POLICIES = ("drop", "first", "confidence", "strict")
"""Policies of `enforce_disjoint`."""


def _claims(corr: Correspondences) -> torch.Tensor:
    """``(B, K, N_tgt)`` bool: reference k of sample b has a point on target token v."""
    counts = torch.zeros(corr.batch_size, corr.num_refs, corr.tgt_tokens, dtype=torch.int32, device=corr.device)
    counts.scatter_add_(2, corr.tgt_index.clamp(0, corr.tgt_tokens - 1), corr.point_mask.to(torch.int32))
    return counts > 0


def _gather_tokens(per_token: torch.Tensor, corr: Correspondences) -> torch.Tensor:
    """Reads a ``(B, N_tgt)`` table at every point's target token: ``(B, K, P)``."""
    index = corr.tgt_index.clamp(0, corr.tgt_tokens - 1).flatten(1)
    return per_token.gather(1, index).view_as(corr.tgt_index)


def find_conflicts(corr: Correspondences) -> torch.Tensor:
    """Points whose target token is claimed by more than one reference of their sample.

    Args:
        corr: the correspondences.

    Returns:
        ``(B, K, P)`` bool, True for real points on a contested target token.

    Example:
        >>> corr = Correspondences.from_dicts([[{0: 3, 1: 4}, {0: 3}]], ref_tokens=[4, 4], tgt_tokens=8)
        >>> find_conflicts(corr)
        tensor([[[ True, False],
                 [ True, False]]])
    """
    check_correspondences("corr", corr)
    contested = _claims(corr).sum(1) >= 2
    return _gather_tokens(contested, corr) & corr.point_mask


def is_disjoint(corr: Correspondences) -> torch.Tensor:
    """``(B,)`` bool: True for samples that satisfy eq. 2.

    Example:
        >>> corr = Correspondences.from_dicts([[{0: 3}, {0: 3}], [{0: 3}, {0: 4}]], ref_tokens=[2, 2], tgt_tokens=8)
        >>> is_disjoint(corr)
        tensor([False,  True])
    """
    return ~find_conflicts(corr).flatten(1).any(1)


def contested_tokens(corr: Correspondences) -> list[list[int]]:
    """The contested target tokens of every sample, sorted (empty lists where eq. 2 holds).

    Example:
        >>> corr = Correspondences.from_dicts([[{0: 3, 1: 6}, {0: 6, 1: 3}], [{0: 1}]], ref_tokens=[2, 2], tgt_tokens=8)
        >>> contested_tokens(corr)
        [[3, 6], []]
    """
    check_correspondences("corr", corr)
    contested = (_claims(corr).sum(1) >= 2).cpu()
    return [row.nonzero().flatten().tolist() for row in contested]


def enforce_disjoint(corr: Correspondences, policy: str = "drop") -> Correspondences:
    """Makes every sample satisfy eq. 2 by removing the claims on contested target tokens.

    Policies:

    - ``"drop"``: remove every claim on a contested target token;
    - ``"first"``: the lowest reference index that claims a token keeps it;
    - ``"confidence"``: the reference with the highest confidence on the token keeps it (ties go
      to the lower index); needs `confidence`;
    - ``"strict"``: change nothing and raise if any token is contested.

    Removed points are masked out (``P`` is kept; call `compact` to trim). A batch with no
    reference slot (K = 0) or no point slot (P = 0) has nothing to contest and is returned as it
    is under every policy (``"confidence"`` still needs confidences).

    Args:
        corr: the correspondences.
        policy: one of `DISJOINT_POLICIES`.

    Returns:
        The correspondences with eq. 2 satisfied.

    Raises:
        ValueError: when ``corr`` is not a `Correspondences`; on an unknown policy; with
            ``"confidence"`` and no confidences; with ``"strict"`` when a token is contested (the
            message names the tokens).

    Example:
        >>> corr = Correspondences.from_dicts([[{0: 3, 1: 4}, {0: 3, 2: 5}]], ref_tokens=[4, 4], tgt_tokens=8)
        >>> enforce_disjoint(corr, "drop").to_dicts()
        [[{1: 4}, {2: 5}]]
        >>> enforce_disjoint(corr, "first").to_dicts()
        [[{0: 3, 1: 4}, {2: 5}]]
    """
    check_correspondences("corr", corr)
    check_option("policy", policy, DISJOINT_POLICIES)
    if policy == "confidence" and corr.confidence is None:
        raise ValueError("Expected `corr.confidence` for policy 'confidence', but got None.")
    if corr.num_refs == 0 or corr.max_points == 0:
        return corr  # nothing to contest (argmax over zero references is undefined)
    conflicts = find_conflicts(corr)
    if policy == "strict":
        if bool(conflicts.any()):
            tokens = contested_tokens(corr)
            described = "; ".join(f"sample {b}: {t}" for b, t in enumerate(tokens) if t)
            raise ValueError(
                f"Expected disjoint target tokens across the references of each sample (eq. 2), "
                f"but these target tokens are claimed by several references: {described}."
            )
        return corr
    if policy == "drop":
        return corr.with_point_mask(~conflicts)

    if policy == "first":
        # argmax returns the first maximal index, i.e. the lowest claiming reference.
        score = _claims(corr).to(torch.int8)
    else:
        score = torch.full(
            (corr.batch_size, corr.num_refs, corr.tgt_tokens), float("-inf"),
            dtype=corr.confidence.dtype, device=corr.device,
        )
        masked_conf = corr.confidence.masked_fill(~corr.point_mask, float("-inf"))
        score.scatter_reduce_(2, corr.tgt_index.clamp(0, corr.tgt_tokens - 1), masked_conf, reduce="amax")
    winner = score.argmax(1)  # (B, N_tgt)
    ref_ids = torch.arange(corr.num_refs, device=corr.device).view(1, -1, 1)
    keeps_token = _gather_tokens(winner, corr) == ref_ids
    return corr.with_point_mask(~conflicts | keeps_token)
