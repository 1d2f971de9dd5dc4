"""Stage 6: semantic point correspondences between each reference and the target.

Each reference is matched densely to the target with the project's extractors
(`mosaic_kit.features`) and filters (`mosaic_kit.correspondence`): every target cell inside *that
subject's* target mask is matched to its nearest reference cell (inside the reference mask when
there is one), optionally filtered (mutual / cycle) and agreed across extractors, mapped to token
pairs with the first pair per reference token kept, made disjoint across references (eq. 2), and
returned as pixel pairs at token centres. A pair whose target token centre lies outside its
subject's mask (or whose reference token centre lies outside the reference mask) is dropped, so
every pair is inside both masks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..correspondence import (
    Correspondences,
    TokenGrid,
    consensus,
    cycle_consistent,
    match_features,
    matches_to_correspondences,
    subsample,
)
from ..utils.checks import check_option
from ..correspondence.matching import MATCH_FILTERS

__all__ = ["SubjectPairs", "subject_pairs"]


@dataclass
class SubjectPairs:
    """The correspondences of one sample.

    Attributes:
        pairs: per reference, ``(P_k, 4)`` float pixel pairs ``(ref_x, ref_y, tgt_x, tgt_y)`` at
            token centres (reference frame ``ref_size``, target frame ``target_size``).
        corr: the same pairs as token `Correspondences` (batch 1).

    Examples:
        >>> out = subject_pairs(torch.rand(3, 32, 32), [torch.ones(32, 32, dtype=torch.bool)], [torch.rand(3, 32, 32)],
        ...                     [None], [torch.nn.Identity()], match_filter="none")
        >>> isinstance(out, SubjectPairs), out.pairs[0].shape[1], out.corr.num_refs
        (True, 4, 1)
    """

    pairs: list[torch.Tensor]
    corr: Correspondences


def _inside(mask: torch.Tensor | None, xy: torch.Tensor) -> torch.Tensor:
    if mask is None:
        return torch.ones(xy.shape[0], dtype=torch.bool)
    cols = xy[:, 0].floor().long().clamp(0, mask.shape[1] - 1)
    rows = xy[:, 1].floor().long().clamp(0, mask.shape[0] - 1)
    return mask[rows, cols]


@torch.no_grad()
def subject_pairs(
    target: torch.Tensor,
    target_masks: Sequence[torch.Tensor],
    references: Sequence[torch.Tensor],
    reference_masks: Sequence[torch.Tensor | None],
    extractors: Sequence[torch.nn.Module],
    *,
    match_filter: str = "mutual",
    cycle_radius: float = 1.0,
    consensus_radius: float = 0.0,
    disjoint: str = "confidence",
    max_points: int = 0,
) -> SubjectPairs:
    """Correspondences of K references to one target, each inside its subject's masks.

    Args:
        target: ``(3, H, W)`` float image in [0, 1] (H, W multiples of 16).
        target_masks: per reference, the subject's ``(H, W)`` bool mask in the target.
        references: K images ``(3, h, w)`` in [0, 1] (one size for all, multiples of 16).
        reference_masks: per reference, an ``(h, w)`` bool mask or None.
        extractors: feature extractors (`mosaic_kit.features`), each ``(B, 3, H, W) → (B, C, gh, gw)``.
        match_filter: one of `mosaic_kit.correspondence.MATCH_FILTERS`.
        cycle_radius: radius of the ``"cycle"`` filter, in cells.
        consensus_radius: agreement radius between extractors, in cells.
        disjoint: the eq. 2 policy (`mosaic_kit.correspondence.enforce_disjoint`).
        max_points: farthest-point subsample per reference (0: all).

    Returns:
        A `SubjectPairs`.

    Examples:
        >>> from mosaic_kit.features import DenseSIFT
        >>> image = torch.rand(3, 64, 64)
        >>> left = torch.zeros(64, 64, dtype=torch.bool); left[:, :32] = True
        >>> out = subject_pairs(image, [left, ~left], [image, image], [None, None], [DenseSIFT(grid_size=16, patch_size=16)])
        >>> [bool((p[:, 2] < 32).all()) for p in out.pairs], [bool((p[:, 2] >= 32).all()) for p in out.pairs]
        ([True, False], [False, True])
    """
    check_option("match_filter", match_filter, MATCH_FILTERS)
    if not isinstance(target, torch.Tensor) or target.ndim != 3 or target.shape[0] != 3:
        raise ValueError(f"Expected `target` of shape (3, H, W), but got {getattr(target, 'shape', type(target).__name__)}.")
    num_refs = len(references)
    if num_refs == 0 or len(target_masks) != num_refs or len(reference_masks) != num_refs:
        raise ValueError(f"Expected one target mask and one reference mask (or None) per reference ({num_refs}), but got "
                         f"{len(target_masks)} and {len(reference_masks)}.")
    if not extractors:
        raise ValueError("Expected at least one extractor in `extractors`, but got none.")
    height, width = target.shape[1:]
    for k, mask in enumerate(target_masks):
        if not isinstance(mask, torch.Tensor) or mask.shape != (height, width):
            raise ValueError(f"Expected `target_masks[{k}]` of shape ({height}, {width}), but got "
                             f"{getattr(mask, 'shape', type(mask).__name__)}.")
    ref_size = tuple(references[0].shape[1:])
    if any(tuple(r.shape) != (3, *ref_size) for r in references):
        raise ValueError(f"Expected every reference of shape (3, {ref_size[0]}, {ref_size[1]}), but got "
                         f"{[tuple(r.shape) for r in references]}.")
    tgt_grid, ref_grid = TokenGrid(height, width), TokenGrid(*ref_size)
    device = next((p.device for e in extractors for p in e.parameters()), torch.device("cpu"))
    target_features = [e(target[None].to(device)).cpu() for e in extractors]
    per_ref = []
    for k in range(num_refs):
        ref_features = [e(references[k][None].to(device)).cpu() for e in extractors]
        ref_mask = None if reference_masks[k] is None else reference_masks[k][None]
        candidates = []
        for tgt_feats, ref_feats in zip(target_features, ref_features):
            forward = match_features(tgt_feats, ref_feats, source_mask=target_masks[k][None], target_mask=ref_mask)
            if match_filter != "none":
                backward = match_features(ref_feats, tgt_feats, source_mask=ref_mask, target_mask=target_masks[k][None])
                forward = cycle_consistent(forward, backward, radius=0.0 if match_filter == "mutual" else cycle_radius)
            candidates.append(forward)
        per_ref.append(candidates[0] if len(candidates) == 1 else consensus(candidates, radius=consensus_radius))
    corr = matches_to_correspondences(per_ref, ref_grid, tgt_grid, disjoint=disjoint)
    if max_points:
        corr = subsample(corr, max_points, "farthest", target_grid=tgt_grid).compact()
    pairs = []
    point_mask = corr.point_mask.clone()
    for k in range(num_refs):
        keep = corr.point_mask[0, k]
        ref_xy = ref_grid.token_to_pixel(corr.ref_index[0, k][keep])
        tgt_xy = tgt_grid.token_to_pixel(corr.tgt_index[0, k][keep])
        inside = _inside(target_masks[k], tgt_xy) & _inside(reference_masks[k], ref_xy)
        pairs.append(torch.cat([ref_xy, tgt_xy], dim=1)[inside])
        slots = torch.nonzero(keep).flatten()
        point_mask[0, k, slots[~inside]] = False
    corr = dataclasses.replace(corr, point_mask=point_mask).compact()
    return SubjectPairs(pairs, corr)
