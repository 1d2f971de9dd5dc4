"""Dense matching between feature maps, filters, and conversion to token correspondences.

The released data's correspondences are the dense nearest neighbours of feature maps on a 64×64
grid: for each cell of the *target* image, its most similar cell of the *reference* image, kept
where two extractors agree and inside the subject mask, then mapped to reference-token →
target-token pairs. This module provides each step:

- `match_features`: cosine nearest neighbour of every source cell among the target cells,
  chunked over source rows (a 64×64 against 64×64 match is a few milliseconds on a CPU);
- filters: `mutual_nearest`, `cycle_consistent`, `consensus` (several extractors agree),
  `filter_by_mask`, `filter_by_score`; each returns the same matches with a narrower ``valid``;
- `matches_to_correspondences`: matches of K references → a `Correspondences` batch on the
  token grids of any reference and target resolution, with eq. 2 enforced.

Grids are row-major: source cell ``s = row * ws + col``; cell centres are ``(col + 0.5, row + 0.5)``
in grid units (the `TokenGrid` convention).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from ..utils.checks import check_floating, check_option, check_shape, compute_dtype
from .batch import Correspondences
from .disjoint import DISJOINT_POLICIES, enforce_disjoint
from .grid import TokenGrid

__all__ = [
    "MATCH_DIRECTIONS",
    "MATCH_FILTERS",
    "correspondences_from_features",
    "DenseMatches",
    "consensus",
    "cycle_consistent",
    "filter_by_mask",
    "filter_by_score",
    "match_features",
    "matches_to_correspondences",
    "mutual_nearest",
]

MATCH_DIRECTIONS = ("target_to_reference", "reference_to_target")
"""Which image the matches start from in `matches_to_correspondences`."""

MATCH_FILTERS = ("none", "mutual", "cycle")
"""Per-extractor filters of `correspondences_from_features`."""


def _cell_centres(index: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """``(..., 2)`` float ``(x, y)`` centres of row-major cell indices on a grid of ``shape``."""
    cols = shape[1]
    return torch.stack(((index % cols).float() + 0.5, torch.div(index, cols, rounding_mode="floor").float() + 0.5), -1)


@dataclass(frozen=True, eq=False)
class DenseMatches:
    """For every cell of a source grid, its matched cell on a target grid.

    Args:
        index: ``(B, hs*ws)`` long, the row-major target cell matched to each source cell.
        score: ``(B, hs*ws)`` float, the match's confidence (cosine similarity for
            `match_features`).
        valid: ``(B, hs*ws)`` bool, False for matches removed by a mask or filter.
        source_shape: ``(hs, ws)`` of the source grid.
        target_shape: ``(ht, wt)`` of the target grid.

    Example:
        >>> m = match_features(torch.eye(4).view(1, 4, 2, 2), torch.eye(4).view(1, 4, 2, 2))
        >>> m.index.tolist(), m.source_points()[0, 1].tolist(), m.target_points()[0, 1].tolist()
        ([[0, 1, 2, 3]], [1.5, 0.5], [1.5, 0.5])
    """

    index: torch.Tensor
    score: torch.Tensor
    valid: torch.Tensor
    source_shape: tuple[int, int]
    target_shape: tuple[int, int]

    def __post_init__(self) -> None:
        hs, ws = self.source_shape
        check_shape("index", self.index, [None, hs * ws], "(B, hs*ws)")
        batch = self.index.shape[0]
        check_shape("score", self.score, [batch, hs * ws], "(B, hs*ws)")
        check_shape("valid", self.valid, [batch, hs * ws], "(B, hs*ws)")
        if self.valid.dtype != torch.bool or self.index.dtype != torch.long:
            raise ValueError(
                f"Expected `index` long and `valid` bool, but got {self.index.dtype} and {self.valid.dtype}."
            )

    @property
    def batch_size(self) -> int:
        """B."""
        return self.index.shape[0]

    def source_points(self) -> torch.Tensor:
        """``(B, hs*ws, 2)`` float ``(x, y)`` centres of the source cells, in source-grid units."""
        cells = torch.arange(self.index.shape[1], device=self.index.device)
        return _cell_centres(cells, self.source_shape).expand(self.batch_size, -1, -1)

    def target_points(self) -> torch.Tensor:
        """``(B, hs*ws, 2)`` float ``(x, y)`` centres of the matched target cells, in target-grid units."""
        return _cell_centres(self.index, self.target_shape)

    def with_valid(self, keep: torch.Tensor) -> DenseMatches:
        """A copy keeping only the matches where ``keep`` ``(B, hs*ws)`` and :attr:`valid` hold."""
        check_shape("keep", keep, list(self.valid.shape), "(B, hs*ws)")
        return replace(self, valid=self.valid & keep.to(torch.bool))


def _features(name: str, feats: torch.Tensor) -> torch.Tensor:
    check_shape(name, feats, [None, None, None, None], "(B, C, h, w)")
    check_floating(name, feats)
    return feats


def _mask_on_grid(
    name: str, mask: torch.Tensor, batch: int, shape: tuple[int, int], device: torch.device
) -> torch.Tensor:
    """A ``(B, H, W)`` mask of any resolution read at the cell centres of ``shape``: ``(B, h*w)``
    on ``device``."""
    check_shape(name, mask, [batch, None, None], "(B, H, W)")
    mask = mask.to(device=device, dtype=torch.bool)
    height, width = mask.shape[1:]
    rows = ((torch.arange(shape[0], device=mask.device) + 0.5) * height / shape[0]).long().clamp_max(height - 1)
    cols = ((torch.arange(shape[1], device=mask.device) + 0.5) * width / shape[1]).long().clamp_max(width - 1)
    return mask[:, rows][:, :, cols].flatten(1)


def match_features(
    source: torch.Tensor,
    target: torch.Tensor,
    source_mask: torch.Tensor | None = None,
    target_mask: torch.Tensor | None = None,
    max_chunk_elements: int = 2**22,
) -> DenseMatches:
    """Cosine nearest neighbour of every source cell among the target cells.

    Args:
        source: ``(B, C, hs, ws)`` float features.
        target: ``(B, C, ht, wt)`` float features (same B and C).
        source_mask: optional ``(B, H, W)`` bool mask (any resolution, read at cell centres);
            source cells outside it are invalid.
        target_mask: optional ``(B, H, W)`` bool mask; only target cells inside it are candidates
            (a sample whose mask is empty has no valid match).
        max_chunk_elements: most similarities computed at once (``B·rows·ht·wt``).

    Returns:
        The matches; ``score`` is the cosine similarity.

    Example:
        >>> source = torch.randn(2, 16, 8, 8)
        >>> m = match_features(source, source.flip(-1))  # the target is mirrored left-right
        >>> bool((m.target_points()[..., 0] == 8 - m.source_points()[..., 0]).all())
        True
    """
    source, target = _features("source", source), _features("target", target)
    batch, channels, hs, ws = source.shape
    check_shape("target", target, [batch, channels, None, None], "(B, C, ht, wt)")
    ht, wt = target.shape[2:]
    dtype = compute_dtype(source.dtype)
    src = F.normalize(source.to(dtype).flatten(2), dim=1).transpose(1, 2)  # (B, Ns, C)
    tgt = F.normalize(target.to(dtype).flatten(2), dim=1)  # (B, C, Nt)
    candidates = None if target_mask is None else _mask_on_grid("target_mask", target_mask, batch, (ht, wt), source.device)
    num_source, num_target = hs * ws, ht * wt
    rows = max(1, max_chunk_elements // max(1, batch * num_target))
    index = torch.empty(batch, num_source, dtype=torch.long, device=source.device)
    score = torch.empty(batch, num_source, dtype=dtype, device=source.device)
    for start in range(0, num_source, rows):
        sim = torch.bmm(src[:, start : start + rows], tgt)  # (B, c, Nt)
        if candidates is not None:
            sim = sim.masked_fill(~candidates[:, None], float("-inf"))
        best = sim.max(dim=-1)
        score[:, start : start + rows] = best.values
        index[:, start : start + rows] = best.indices
    valid = torch.isfinite(score)
    if source_mask is not None:
        valid &= _mask_on_grid("source_mask", source_mask, batch, (hs, ws), source.device)
    score = torch.where(valid, score, 0.0)
    return DenseMatches(index, score, valid, (hs, ws), (ht, wt))


def _check_pair(forward: DenseMatches, backward: DenseMatches) -> None:
    if (forward.source_shape, forward.target_shape) != (backward.target_shape, backward.source_shape):
        raise ValueError(
            f"Expected `backward` to match the target grid back to the source grid, i.e. shapes "
            f"{forward.target_shape} → {forward.source_shape}, but got {backward.source_shape} → {backward.target_shape}."
        )
    if forward.batch_size != backward.batch_size:
        raise ValueError(f"Expected `backward` with batch size {forward.batch_size}, but got {backward.batch_size}.")


def cycle_consistent(forward: DenseMatches, backward: DenseMatches, radius: float = 1.0) -> DenseMatches:
    """Keeps the source cells whose round trip ``s → forward(s) → backward(forward(s))`` lands
    within ``radius`` cells (Euclidean, on the source grid) of ``s``.

    Args:
        forward: source → target matches.
        backward: target → source matches.
        radius: tolerance in source cells; 0 keeps exact round trips (mutual nearest neighbours).

    Returns:
        ``forward`` with a narrower ``valid``.

    Example:
        >>> f = DenseMatches(torch.tensor([[1, 0, 0]]), torch.ones(1, 3), torch.ones(1, 3, dtype=torch.bool), (1, 3), (1, 2))
        >>> b = DenseMatches(torch.tensor([[1, 2]]), torch.ones(1, 2), torch.ones(1, 2, dtype=torch.bool), (1, 2), (1, 3))
        >>> # round trips: 0 → 1 → 2 (2 cells off), 1 → 0 → 1 (exact), 2 → 0 → 1 (1 cell off)
        >>> cycle_consistent(f, b, radius=0).valid.tolist(), cycle_consistent(f, b, radius=1).valid.tolist()
        ([[False, True, False]], [[False, True, True]])
    """
    _check_pair(forward, backward)
    if not (isinstance(radius, (int, float)) and not isinstance(radius, bool) and radius >= 0):
        raise ValueError(f"Expected `radius` to be a number >= 0, but got {radius!r}.")
    back = backward.index.gather(1, forward.index)
    back_valid = backward.valid.gather(1, forward.index)
    cells = torch.arange(forward.index.shape[1], device=forward.index.device).expand_as(back)
    distance = (_cell_centres(back, forward.source_shape) - _cell_centres(cells, forward.source_shape)).norm(dim=-1)
    return forward.with_valid(back_valid & (distance <= radius + 1e-6))


def mutual_nearest(forward: DenseMatches, backward: DenseMatches) -> DenseMatches:
    """Keeps the mutual nearest neighbours: ``backward(forward(s)) == s``.

    Example:
        >>> f = DenseMatches(torch.tensor([[1, 0, 0]]), torch.ones(1, 3), torch.ones(1, 3, dtype=torch.bool), (1, 3), (1, 2))
        >>> b = DenseMatches(torch.tensor([[1, 2]]), torch.ones(1, 2), torch.ones(1, 2, dtype=torch.bool), (1, 2), (1, 3))
        >>> mutual_nearest(f, b).valid.tolist()
        [[False, True, False]]
    """
    return cycle_consistent(forward, backward, radius=0)


def consensus(matches: Sequence[DenseMatches], radius: float = 0.0) -> DenseMatches:
    """Keeps the source cells where every matching agrees (within ``radius`` target cells of the
    first one's match) and is valid; the score is the mean of their scores.

    This is how the released data combines DIFT and GeoAware matches (``radius=0``).

    Args:
        matches: two or more matchings of the same grids (e.g. one per feature extractor).
        radius: tolerance in target cells (Euclidean).

    Returns:
        The first matching's indices, with the mean score and a narrower ``valid``.

    Example:
        >>> ok = torch.ones(1, 2, dtype=torch.bool)
        >>> a = DenseMatches(torch.tensor([[0, 3]]), torch.tensor([[0.9, 0.5]]), ok, (1, 2), (2, 2))
        >>> b = DenseMatches(torch.tensor([[0, 1]]), torch.tensor([[0.7, 0.5]]), ok, (1, 2), (2, 2))
        >>> out = consensus([a, b])
        >>> out.valid.tolist(), [round(x, 4) for x in out.score[0].tolist()]
        ([[True, False]], [0.8, 0.0])
    """
    if isinstance(matches, DenseMatches) or len(matches) < 2:
        raise ValueError("Expected `matches` to be a list of at least two DenseMatches.")
    first = matches[0]
    for i, other in enumerate(matches[1:], start=1):
        if (other.source_shape, other.target_shape, other.batch_size) != (first.source_shape, first.target_shape, first.batch_size):
            raise ValueError(
                f"Expected `matches[{i}]` on the grids of `matches[0]` ({first.source_shape} → {first.target_shape}, "
                f"B={first.batch_size}), but got {other.source_shape} → {other.target_shape}, B={other.batch_size}."
            )
    if not (isinstance(radius, (int, float)) and not isinstance(radius, bool) and radius >= 0):
        raise ValueError(f"Expected `radius` to be a number >= 0, but got {radius!r}.")
    keep = first.valid.clone()
    points = first.target_points()
    for other in matches[1:]:
        keep &= other.valid & ((other.target_points() - points).norm(dim=-1) <= radius + 1e-6)
    score = torch.stack([m.score for m in matches]).mean(0)
    return replace(first, score=torch.where(keep, score, 0.0), valid=keep)


def filter_by_mask(
    matches: DenseMatches, source_mask: torch.Tensor | None = None, target_mask: torch.Tensor | None = None
) -> DenseMatches:
    """Keeps the matches whose source cell lies in ``source_mask`` and whose matched target cell
    lies in ``target_mask`` (``(B, H, W)`` bool masks of any resolution, read at cell centres).

    Example:
        >>> ok = torch.ones(1, 2, dtype=torch.bool)
        >>> m = DenseMatches(torch.tensor([[0, 3]]), torch.ones(1, 2), ok, (1, 2), (2, 2))
        >>> filter_by_mask(m, target_mask=torch.tensor([[[True, False], [False, False]]])).valid.tolist()
        [[True, False]]
    """
    keep = torch.ones_like(matches.valid)
    if source_mask is not None:
        keep &= _mask_on_grid("source_mask", source_mask, matches.batch_size, matches.source_shape, keep.device)
    if target_mask is not None:
        on_grid = _mask_on_grid("target_mask", target_mask, matches.batch_size, matches.target_shape, keep.device)
        keep &= on_grid.gather(1, matches.index)
    return matches.with_valid(keep)


def filter_by_score(matches: DenseMatches, min_score: float) -> DenseMatches:
    """Keeps the matches with ``score >= min_score``.

    Example:
        >>> ok = torch.ones(1, 2, dtype=torch.bool)
        >>> m = DenseMatches(torch.tensor([[0, 1]]), torch.tensor([[0.9, 0.2]]), ok, (1, 2), (1, 2))
        >>> filter_by_score(m, 0.5).valid.tolist()
        [[True, False]]
    """
    if isinstance(min_score, bool) or not isinstance(min_score, (int, float)):
        raise ValueError(f"Expected `min_score` to be a number, but got {min_score!r}.")
    return matches.with_valid(matches.score >= min_score)


def matches_to_correspondences(
    matches: Sequence[DenseMatches],
    ref_grids: TokenGrid | Sequence[TokenGrid],
    tgt_grid: TokenGrid,
    direction: str = "target_to_reference",
    ref_present: torch.Tensor | None = None,
    disjoint: str = "confidence",
) -> Correspondences:
    """Converts dense matches of K references into a `Correspondences` batch.

    Each valid match is a pair of cell centres; they are mapped onto the token grids (any
    resolution: the feature grid is the frame the points are given in), the first pair of each
    reference token is kept (in source-cell order, as the released pipeline does), and eq. 2 is
    enforced with ``disjoint``. The match score becomes the pair's confidence.

    Args:
        matches: one `DenseMatches` per reference slot, each of batch B. With
            ``"target_to_reference"`` (released) the source grid is the target image's and the
            target grid the reference's; with ``"reference_to_target"`` the other way round.
        ref_grids: the reference token grid(s).
        tgt_grid: the target token grid.
        direction: one of `MATCH_DIRECTIONS`.
        ref_present: optional ``(B, K)`` bool; absent references get no points.
        disjoint: a policy of `enforce_disjoint` (``"confidence"`` keeps the most similar
            reference on a contested target token).

    Returns:
        The batch, with confidences.

    Example:
        >>> feats = torch.randn(1, 8, 4, 4)
        >>> m = match_features(feats, feats)  # identity matches on a 4×4 grid
        >>> corr = matches_to_correspondences([m], TokenGrid(32, 32), TokenGrid(32, 32))
        >>> corr.to_dicts()  # each 2×2 block of cells falls into one token
        [[{0: 0, 1: 1, 2: 2, 3: 3}]]
    """
    check_option("direction", direction, MATCH_DIRECTIONS)
    check_option("disjoint", disjoint, DISJOINT_POLICIES)
    if isinstance(matches, DenseMatches) or not matches:
        raise ValueError("Expected `matches` to be a non-empty list of DenseMatches, one per reference.")
    batch = matches[0].batch_size
    if any(m.batch_size != batch for m in matches):
        raise ValueError(f"Expected every DenseMatches with batch size {batch}, but got {[m.batch_size for m in matches]}.")
    if ref_present is not None:
        check_shape("ref_present", ref_present, [batch, len(matches)], "(B, K)")
    ref_first = direction == "reference_to_target"
    if isinstance(ref_grids, TokenGrid):
        ref_grids = [ref_grids] * len(matches)
    if len(ref_grids) != len(matches):
        raise ValueError(f"Expected one reference grid per matching ({len(matches)}), but got {len(ref_grids)}.")
    samples = []
    ref_frames = []
    for m in matches:
        ref_frames.append(m.source_shape if ref_first else m.target_shape)
    tgt_frames = {m.target_shape if ref_first else m.source_shape for m in matches}
    if len(tgt_frames) != 1:
        raise ValueError(f"Expected every matching on one target grid, but got {sorted(tgt_frames)}.")
    points = [(m.source_points(), m.target_points()) for m in matches]  # once per matching, not per sample
    for b in range(batch):
        per_ref = []
        for k, m in enumerate(matches):
            if ref_present is not None and not bool(ref_present[b, k]):
                break  # absent references come last (checked below)
            keep = m.valid[b]
            src, dst = points[k][0][b][keep], points[k][1][b][keep]
            ref_xy, tgt_xy = (src, dst) if ref_first else (dst, src)
            per_ref.append((ref_xy, tgt_xy, m.score[b][keep].float()))
        samples.append(per_ref)
    if ref_present is not None:
        present = ref_present.to(torch.bool).cpu()
        contiguous = torch.cummin(present.to(torch.int8), dim=1).values.bool()
        if not torch.equal(contiguous, present):
            raise ValueError("Expected `ref_present` with absent references only after present ones in each sample.")
    corr = Correspondences.from_pixel_pairs(
        samples,
        ref_grids,
        tgt_grid,
        ref_image_sizes=ref_frames,
        tgt_image_size=tgt_frames.pop(),
    )
    if corr.confidence is None:  # no sample had a reference: keep the layout with unit confidences
        corr = replace(corr, confidence=torch.ones(corr.point_mask.shape))
    return enforce_disjoint(corr, disjoint)


def correspondences_from_features(
    target_features: Sequence[torch.Tensor],
    reference_features: Sequence[Sequence[torch.Tensor]],
    ref_grids: TokenGrid | Sequence[TokenGrid],
    tgt_grid: TokenGrid,
    target_mask: torch.Tensor | None = None,
    reference_masks: Sequence[torch.Tensor | None] | None = None,
    ref_present: torch.Tensor | None = None,
    match_filter: str = "none",
    cycle_radius: float = 1.0,
    consensus_radius: float = 0.0,
    disjoint: str = "confidence",
) -> tuple[Correspondences, list[DenseMatches]]:
    """Builds correspondences from dense features the way the released data was built.

    For each reference: every target cell is matched to its nearest reference cell (cosine), with
    each extractor; candidates are restricted to the reference's mask and source cells to the
    target's mask; an optional per-extractor filter (mutual nearest neighbours or cycle
    consistency) is applied; with several extractors only the cells where all agree are kept
    (`consensus`); then `matches_to_correspondences` maps them to tokens and enforces eq. 2.

    Args:
        target_features: per extractor, ``(B, C_e, h_e, w_e)`` features of the targets.
        reference_features: per extractor, per reference slot, ``(B, C_e, h, w)`` features (every
            extractor may use its own grid; with several, they must share the grids for consensus).
        ref_grids: reference token grid(s).
        tgt_grid: target token grid.
        target_mask: optional ``(B, H, W)`` bool subject mask of the targets (any resolution).
        reference_masks: optional, per reference slot, ``(B, H, W)`` bool masks or None.
        ref_present: optional ``(B, K)`` bool.
        match_filter: one of `MATCH_FILTERS`.
        cycle_radius: radius of ``"cycle"`` in cells.
        consensus_radius: agreement radius between extractors, in reference cells.
        disjoint: eq. 2 policy (see `enforce_disjoint`).

    Returns:
        The correspondences and, per reference, the final matches (for drawings and statistics).

    Example:
        >>> feats = torch.randn(1, 8, 4, 4)
        >>> corr, matches = correspondences_from_features([feats], [[feats]], TokenGrid(32, 32), TokenGrid(32, 32))
        >>> corr.to_dicts(), int(matches[0].valid.sum())
        ([[{0: 0, 1: 1, 2: 2, 3: 3}]], 16)
    """
    check_option("match_filter", match_filter, MATCH_FILTERS)
    if isinstance(target_features, torch.Tensor) or not target_features:
        raise ValueError("Expected `target_features` to be a non-empty list with one tensor per extractor.")
    if len(reference_features) != len(target_features):
        raise ValueError(
            f"Expected `reference_features` with one list per extractor ({len(target_features)}), "
            f"but got {len(reference_features)}."
        )
    num_refs = len(reference_features[0])
    if num_refs == 0 or any(len(per_ref) != num_refs for per_ref in reference_features):
        raise ValueError("Expected every extractor's `reference_features` to hold the same K >= 1 references.")
    if reference_masks is not None and len(reference_masks) != num_refs:
        raise ValueError(f"Expected `reference_masks` with one entry per reference ({num_refs}), but got {len(reference_masks)}.")
    per_ref_matches = []
    for k in range(num_refs):
        ref_mask = None if reference_masks is None else reference_masks[k]
        candidates = []
        for tgt_feats, ref_feats in zip(target_features, reference_features):
            forward = match_features(tgt_feats, ref_feats[k], source_mask=target_mask, target_mask=ref_mask)
            if match_filter != "none":
                backward = match_features(ref_feats[k], tgt_feats, source_mask=ref_mask, target_mask=target_mask)
                radius = 0.0 if match_filter == "mutual" else cycle_radius
                forward = cycle_consistent(forward, backward, radius=radius)
            candidates.append(forward)
        if len(candidates) > 1:
            shapes = {(m.source_shape, m.target_shape) for m in candidates}
            if len(shapes) != 1:
                raise ValueError(f"Expected every extractor on the same grids for consensus, but got {sorted(shapes)}.")
        per_ref_matches.append(candidates[0] if len(candidates) == 1 else consensus(candidates, radius=consensus_radius))
    corr = matches_to_correspondences(
        per_ref_matches, ref_grids, tgt_grid, direction="target_to_reference", ref_present=ref_present, disjoint=disjoint
    )
    return corr, per_ref_matches
