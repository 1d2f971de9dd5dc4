"""`Correspondences`: a batched, padded container of reference → target point pairs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import math

import torch

from ..utils.checks import check_int, check_int_list, check_int_pair, check_shape
from .grid import TokenGrid

__all__ = ["Correspondences"]

# A (B, K) nested list of per-reference point lists, each a list of (u, v, confidence).
_PointLists = list[list[list[tuple[int, int, float]]]]


def check_correspondences(name: str, value: object) -> Correspondences:
    """Raises `ValueError` naming ``name`` unless ``value`` is a `Correspondences` (private)."""
    if not isinstance(value, Correspondences):
        raise ValueError(f"Expected `{name}` to be a Correspondences, but got {type(value).__name__}.")
    return value


def _as_confidence(name: str, value: Any) -> float:
    """A finite real confidence (not a bool, a string or None) as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not (
        isinstance(value, torch.Tensor) and value.ndim == 0 and value.is_floating_point()
    ):
        raise ValueError(f"Expected `{name}` to be a finite real confidence, but got {value!r}.")
    as_float = float(value)
    if not math.isfinite(as_float):
        raise ValueError(f"Expected `{name}` to be a finite real confidence, but got {value!r}.")
    return as_float


def _as_tensor(name: str, value: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``torch.as_tensor(value)``, or a `ValueError` naming ``name`` when it is not numeric."""
    if isinstance(value, (str, bytes)):
        raise ValueError(f"Expected `{name}` to be a tensor or a list of numbers, but got {value!r}.")
    try:
        tensor = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"Expected `{name}` to be a tensor or a list of numbers, but got {type(value).__name__} ({error}).") from None
    if tensor.dtype == torch.bool or tensor.is_complex():
        raise ValueError(f"Expected `{name}` to hold real numbers, but got {tensor.dtype}.")
    return tensor if dtype is None else tensor.to(dtype)


def _as_token(name: str, value: Any) -> int:
    """An int token index from an int, an integer tensor/numpy scalar or a digit string (JSON keys)."""
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    if isinstance(value, bool):
        raise ValueError(f"Expected `{name}` to be an integer token index, but got {value!r}.")
    try:
        as_int = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"Expected `{name}` to be an integer token index, but got {value!r}.") from None
    if as_int != value and not isinstance(value, str):
        raise ValueError(f"Expected `{name}` to be an integer token index, but got {value!r}.")
    return as_int


@dataclass(frozen=True, eq=False)
class Correspondences:
    """Point pairs between K references and the target, for a batch of B samples.

    Each sample ``b`` and reference slot ``k`` holds up to ``P`` pairs ``(u, v)``: ``u`` indexes a
    token of reference ``k`` (local to that reference), ``v`` a token of the target. Slots are
    padded to a common ``P``; ``point_mask`` marks real pairs and ``ref_present`` marks real
    references (an absent reference is padding, e.g. a black placeholder image). All samples share
    the token layout: reference ``k`` has ``ref_tokens[k]`` tokens and the target ``tgt_tokens``.

    The global row of a reference token in the concatenated reference sequence is eq. 9 of the
    paper, $G(u^{(k)}) = \\sum_{i<k} N^{(i)} + u^{(k)}$ (see `global_rows`).

    Build one with `from_dicts` (the released per-sample format), `from_pixel_pairs`
    (pixel coordinates at any resolution) or directly from tensors.

    Args:
        ref_index: ``(B, K, P)`` long, local reference token ``u`` of each pair (any value where
            padded).
        tgt_index: ``(B, K, P)`` long, target token ``v`` of each pair.
        point_mask: ``(B, K, P)`` bool, True for real pairs.
        ref_present: ``(B, K)`` bool, True for real references. Absent references hold no points.
        ref_tokens: token count of each of the K reference slots.
        tgt_tokens: token count of the target.
        confidence: optional ``(B, K, P)`` float confidence of each pair (finite).

    Example:
        >>> corr = Correspondences.from_dicts(
        ...     [[{0: 5, 3: 7}, {1: 2}], [{2: 9}]], ref_tokens=[4, 4], tgt_tokens=16)
        >>> corr.batch_size, corr.num_refs, corr.max_points
        (2, 2, 2)
        >>> corr.ref_present
        tensor([[ True,  True],
                [ True, False]])
        >>> corr.global_rows[0, 1, 0]  # reference 1, point 0: offset 4 + u 1
        tensor(5)
        >>> corr.to_dicts()
        [[{0: 5, 3: 7}, {1: 2}], [{2: 9}]]
    """

    ref_index: torch.Tensor
    tgt_index: torch.Tensor
    point_mask: torch.Tensor
    ref_present: torch.Tensor
    ref_tokens: tuple[int, ...]
    tgt_tokens: int
    confidence: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if isinstance(self.ref_tokens, (str, bytes)) or not isinstance(self.ref_tokens, Sequence):
            raise ValueError(f"Expected `ref_tokens` to be a list of K token counts, but got {self.ref_tokens!r}.")
        ref_tokens = tuple(check_int("ref_tokens[k]", n, minimum=1) for n in self.ref_tokens)
        object.__setattr__(self, "ref_tokens", ref_tokens)
        object.__setattr__(self, "tgt_tokens", check_int("tgt_tokens", self.tgt_tokens, minimum=1))
        check_shape("ref_present", self.ref_present, [None, len(ref_tokens)], "(B, K)")
        batch, num_refs = self.ref_present.shape
        check_shape("ref_index", self.ref_index, [batch, num_refs, None], "(B, K, P)")
        points = self.ref_index.shape[2]
        for name in ("tgt_index", "point_mask") + (("confidence",) if self.confidence is not None else ()):
            check_shape(name, getattr(self, name), [batch, num_refs, points], "(B, K, P)")
        for name in ("ref_present", "point_mask"):
            if getattr(self, name).dtype != torch.bool:
                raise ValueError(f"Expected `{name}` to be bool, but got {getattr(self, name).dtype}.")
        for name in ("ref_index", "tgt_index"):
            if getattr(self, name).dtype != torch.long:
                raise ValueError(f"Expected `{name}` to be torch.long, but got {getattr(self, name).dtype}.")
        devices = {t.device for t in (self.ref_index, self.tgt_index, self.point_mask, self.ref_present)}
        if self.confidence is not None:
            devices.add(self.confidence.device)
        if len(devices) > 1:
            raise ValueError(f"Expected all tensors of `Correspondences` on one device, but got {sorted(map(str, devices))}.")
        if bool((self.point_mask & ~self.ref_present[..., None]).any()):
            raise ValueError("Expected no points in absent references (`point_mask` True where `ref_present` is False).")
        limits = torch.tensor(ref_tokens, device=self.ref_index.device).view(1, -1, 1)
        bad_u = self.point_mask & ((self.ref_index < 0) | (self.ref_index >= limits))
        if bool(bad_u.any()):
            b, k, p = (int(i) for i in bad_u.nonzero()[0])
            raise ValueError(
                f"Expected `ref_index` in [0, ref_tokens[k]) = [0, {ref_tokens[k]}) for reference {k}, "
                f"but got {int(self.ref_index[b, k, p])} (sample {b}, point {p})."
            )
        bad_v = self.point_mask & ((self.tgt_index < 0) | (self.tgt_index >= self.tgt_tokens))
        if bool(bad_v.any()):
            b, k, p = (int(i) for i in bad_v.nonzero()[0])
            raise ValueError(
                f"Expected `tgt_index` in [0, tgt_tokens) = [0, {self.tgt_tokens}), "
                f"but got {int(self.tgt_index[b, k, p])} (sample {b}, reference {k}, point {p})."
            )
        if self.confidence is not None:
            if not self.confidence.is_floating_point():
                raise ValueError(f"Expected `confidence` to be floating point, but got {self.confidence.dtype}.")
            if bool((~torch.isfinite(self.confidence) & self.point_mask).any()):
                raise ValueError("Expected `confidence` to be finite for every real point, but got NaN or inf.")

    # -- sizes and layout -------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        """B, the number of samples."""
        return self.ref_present.shape[0]

    @property
    def num_refs(self) -> int:
        """K, the number of reference slots (present or padded)."""
        return self.ref_present.shape[1]

    @property
    def max_points(self) -> int:
        """P, the padded number of points per reference."""
        return self.ref_index.shape[2]

    @property
    def device(self) -> torch.device:
        """The device of the tensors."""
        return self.ref_index.device

    @property
    def total_ref_tokens(self) -> int:
        """N_ref, the length of the concatenated reference sequence (``sum(ref_tokens)``)."""
        return sum(self.ref_tokens)

    @property
    def ref_offsets(self) -> tuple[int, ...]:
        """Offset of each reference in the concatenated sequence, eq. 9: ``sum(ref_tokens[:k])``."""
        offsets, total = [], 0
        for n in self.ref_tokens:
            offsets.append(total)
            total += n
        return tuple(offsets)

    @property
    def global_rows(self) -> torch.Tensor:
        """``(B, K, P)`` long: the row ``G(u) = offset_k + u`` of each pair (eq. 9)."""
        offsets = torch.tensor(self.ref_offsets, device=self.device, dtype=torch.long)
        return self.ref_index + offsets.view(1, -1, 1)

    @property
    def num_points(self) -> torch.Tensor:
        """``(B, K)`` long: real points per reference."""
        return self.point_mask.sum(-1)

    # -- transforms -------------------------------------------------------------------------------
    def to(self, device: torch.device | str) -> Correspondences:
        """A copy with every tensor on ``device``."""
        moved = {
            name: getattr(self, name).to(device)
            for name in ("ref_index", "tgt_index", "point_mask", "ref_present")
        }
        confidence = None if self.confidence is None else self.confidence.to(device)
        return replace(self, confidence=confidence, **moved)

    def with_point_mask(self, point_mask: torch.Tensor) -> Correspondences:
        """A copy keeping only the points where both ``point_mask`` and `point_mask` hold."""
        check_shape("point_mask", point_mask, list(self.point_mask.shape), "(B, K, P)")
        return replace(self, point_mask=self.point_mask & point_mask.to(self.device, torch.bool))

    def compact(self) -> Correspondences:
        """A copy with real points moved first (order kept) and ``P`` trimmed to the largest count."""
        order = torch.sort((~self.point_mask).to(torch.uint8), dim=-1, stable=True).indices
        keep = int(self.num_points.max()) if self.point_mask.numel() else 0
        return self._gather_points(order[..., :keep])

    def _gather_points(self, order: torch.Tensor, valid: torch.Tensor | None = None) -> Correspondences:
        """The points at ``order`` ``(B, K, P')`` along the point axis, masked by ``valid``."""
        def take(t: torch.Tensor) -> torch.Tensor:
            return t.gather(-1, order)

        mask = take(self.point_mask)
        return replace(
            self,
            ref_index=take(self.ref_index),
            tgt_index=take(self.tgt_index),
            point_mask=mask if valid is None else mask & valid,
            confidence=None if self.confidence is None else take(self.confidence),
        )

    # -- constructors -----------------------------------------------------------------------------
    @classmethod
    def _from_point_lists(
        cls,
        point_lists: _PointLists,
        ref_tokens: Sequence[int],
        tgt_tokens: int,
        with_confidence: bool,
    ) -> Correspondences:
        num_refs = len(ref_tokens)
        batch = len(point_lists)
        points = max((len(pts) for sample in point_lists for pts in sample), default=0)
        ref_index = torch.zeros(batch, num_refs, points, dtype=torch.long)
        tgt_index = torch.zeros(batch, num_refs, points, dtype=torch.long)
        confidence = torch.zeros(batch, num_refs, points, dtype=torch.float32)
        point_mask = torch.zeros(batch, num_refs, points, dtype=torch.bool)
        ref_present = torch.zeros(batch, num_refs, dtype=torch.bool)
        for b, sample in enumerate(point_lists):
            for k, pts in enumerate(sample):
                ref_present[b, k] = True
                if pts:
                    table = torch.tensor(pts, dtype=torch.float64)
                    n = len(pts)
                    ref_index[b, k, :n] = table[:, 0].long()
                    tgt_index[b, k, :n] = table[:, 1].long()
                    confidence[b, k, :n] = table[:, 2].float()
                    point_mask[b, k, :n] = True
        return cls(
            ref_index=ref_index,
            tgt_index=tgt_index,
            point_mask=point_mask,
            ref_present=ref_present,
            ref_tokens=tuple(ref_tokens),
            tgt_tokens=tgt_tokens,
            confidence=confidence if with_confidence else None,
        )

    @classmethod
    def from_dicts(
        cls,
        samples: Sequence[Sequence[Mapping[Any, Any]]],
        ref_tokens: Sequence[int],
        tgt_tokens: int,
        confidences: Sequence[Sequence[Mapping[Any, float]]] | None = None,
    ) -> Correspondences:
        """Builds a batch from the released per-sample format.

        Args:
            samples: a list over the batch of lists over references of dicts
                ``{ref_token: tgt_token}``. A sample whose list is shorter than K has its remaining
                references absent (padding); an empty dict is a present reference with no points.
                Keys may be ints or digit strings (as after a JSON round trip).
            ref_tokens: ``[n_1, ..., n_K]``, the token count of each reference slot.
            tgt_tokens: N, the token count of the target.
            confidences: optional, same nesting as ``samples``, dicts ``{ref_token: confidence}``
                covering every pair.

        Returns:
            The batch, points in dict order.

        Example:
            >>> corr = Correspondences.from_dicts([[{"0": 5}, {}], []], ref_tokens=[2, 3], tgt_tokens=8)
            >>> corr.ref_present.tolist(), corr.num_points.tolist()
            ([[True, True], [False, False]], [[1, 0], [0, 0]])
        """
        ref_tokens = check_int_list("ref_tokens", ref_tokens, minimum=1)
        tgt_tokens = check_int("tgt_tokens", tgt_tokens, minimum=1)
        if isinstance(samples, Mapping) or not isinstance(samples, Sequence):
            raise ValueError(f"Expected `samples` to be a list over the batch, but got {type(samples).__name__}.")
        if confidences is not None and (
            isinstance(confidences, (Mapping, str, bytes, torch.Tensor)) or not isinstance(confidences, Sequence)
        ):
            raise ValueError(
                "Expected `confidences` to mirror `samples` (a list over samples of lists over references of "
                f"{{ref_token: confidence}} dicts), but got {type(confidences).__name__}."
            )
        if confidences is not None and len(confidences) != len(samples):
            raise ValueError(
                f"Expected `confidences` with one entry per sample ({len(samples)}), but got {len(confidences)}."
            )
        point_lists: _PointLists = []
        for b, sample in enumerate(samples):
            if isinstance(sample, Mapping) or not isinstance(sample, Sequence):
                raise ValueError(
                    f"Expected `samples[{b}]` to be a list over references, but got {type(sample).__name__}."
                )
            if len(sample) > len(ref_tokens):
                raise ValueError(
                    f"Expected `samples[{b}]` to hold at most K = len(ref_tokens) = {len(ref_tokens)} references, "
                    f"but got {len(sample)}."
                )
            per_ref = []
            for k, mapping in enumerate(sample):
                if not isinstance(mapping, Mapping):
                    raise ValueError(
                        f"Expected `samples[{b}][{k}]` to be a dict {{ref_token: tgt_token}}, "
                        f"but got {type(mapping).__name__}."
                    )
                conf_map = None
                if confidences is not None:
                    conf_sample = confidences[b]
                    if (
                        isinstance(conf_sample, (Mapping, str, bytes)) or not isinstance(conf_sample, Sequence)
                        or len(conf_sample) != len(sample) or not isinstance(conf_sample[k], Mapping)
                    ):
                        raise ValueError(
                            f"Expected `confidences[{b}]` to mirror `samples[{b}]` (a list of {len(sample)} dicts "
                            f"{{ref_token: confidence}}), but got {conf_sample!r}."
                        )
                    conf_map = {
                        _as_token(f"confidences[{b}][{k}] key", u): _as_confidence(f"confidences[{b}][{k}][{u!r}]", c)
                        for u, c in conf_sample[k].items()
                    }
                pts = []
                for u_raw, v_raw in mapping.items():
                    u = _as_token(f"samples[{b}][{k}] key", u_raw)
                    v = _as_token(f"samples[{b}][{k}][{u_raw!r}]", v_raw)
                    if not 0 <= u < ref_tokens[k]:
                        raise ValueError(
                            f"Expected reference tokens of `samples[{b}][{k}]` in [0, ref_tokens[{k}]) = "
                            f"[0, {ref_tokens[k]}), but got {u}."
                        )
                    if not 0 <= v < tgt_tokens:
                        raise ValueError(
                            f"Expected target tokens of `samples[{b}][{k}]` in [0, tgt_tokens) = [0, {tgt_tokens}), "
                            f"but got {v} (reference token {u})."
                        )
                    if conf_map is not None and u not in conf_map:
                        raise ValueError(f"Expected `confidences[{b}][{k}]` to hold reference token {u}, but it is missing.")
                    pts.append((u, v, conf_map[u] if conf_map is not None else 1.0))
                per_ref.append(pts)
            point_lists.append(per_ref)
        return cls._from_point_lists(point_lists, ref_tokens, tgt_tokens, with_confidence=confidences is not None)

    @classmethod
    def from_pixel_pairs(
        cls,
        samples: Sequence[Sequence[Sequence[torch.Tensor]]],
        ref_grids: TokenGrid | Sequence[TokenGrid],
        tgt_grid: TokenGrid,
        ref_image_sizes: Sequence[tuple[int, int]] | None = None,
        tgt_image_size: tuple[int, int] | None = None,
        first_per_ref_token: bool = True,
    ) -> Correspondences:
        """Builds a batch from pixel-coordinate pairs, mapped through the token grids.

        Args:
            samples: a list over the batch of lists over references (shorter lists leave the
                remaining references absent) of ``(ref_xy, tgt_xy)`` or
                ``(ref_xy, tgt_xy, confidence)``: ``(P, 2)`` float ``(x, y)`` pixel points and an
                optional ``(P,)`` confidence.
            ref_grids: the token grid of every reference (one grid for all, or K grids).
            tgt_grid: the token grid of the target.
            ref_image_sizes: ``(H, W)`` frame of each reference's points when it differs from its
                grid (e.g. a 64×64 feature grid); default: the grid's own size.
            tgt_image_size: ``(H, W)`` frame of the target points; default: the grid's size.
            first_per_ref_token: keep only the first pair of each reference token, as the
                released data pipeline does (several pixels fall into one token).

        Returns:
            The batch; confidences are kept when every pair list carries one.

        Example:
            >>> grid = TokenGrid(64, 64)  # 4×4 tokens
            >>> ref_xy = torch.tensor([[1.0, 1.0], [3.0, 2.0], [40.0, 20.0]])
            >>> tgt_xy = torch.tensor([[17.0, 1.0], [60.0, 60.0], [0.0, 63.0]])
            >>> corr = Correspondences.from_pixel_pairs([[(ref_xy, tgt_xy)]], grid, grid)
            >>> corr.to_dicts()  # the second pair shares reference token 0 with the first
            [[{0: 1, 6: 12}]]
        """
        if isinstance(samples, torch.Tensor) or not isinstance(samples, Sequence):
            raise ValueError(f"Expected `samples` to be a list over the batch, but got {type(samples).__name__}.")
        for b, sample in enumerate(samples):
            if isinstance(sample, (Mapping, str, bytes, torch.Tensor)) or not isinstance(sample, Sequence):
                raise ValueError(
                    f"Expected `samples[{b}]` to be a list over references of (ref_xy, tgt_xy[, confidence]), "
                    f"but got {type(sample).__name__}."
                )
            for k, pair in enumerate(sample):
                if isinstance(pair, (Mapping, str, bytes)) or not isinstance(pair, (Sequence, torch.Tensor)):
                    raise ValueError(
                        f"Expected `samples[{b}][{k}]` = (ref_xy, tgt_xy[, confidence]), but got {type(pair).__name__}."
                    )
        num_refs = max((len(s) for s in samples), default=0)
        if isinstance(ref_grids, TokenGrid):
            ref_grids = [ref_grids] * max(num_refs, 1)
        ref_grids = list(ref_grids)
        if not ref_grids or not all(isinstance(g, TokenGrid) for g in ref_grids):
            raise ValueError("Expected `ref_grids` to be a TokenGrid or a non-empty list of TokenGrid.")
        if num_refs > len(ref_grids):
            raise ValueError(
                f"Expected at most len(ref_grids) = {len(ref_grids)} references per sample, but got {num_refs}."
            )
        if tgt_image_size is not None:
            tgt_image_size = check_int_pair("tgt_image_size", tgt_image_size)
        if not isinstance(tgt_grid, TokenGrid):
            raise ValueError(f"Expected `tgt_grid` to be a TokenGrid, but got {type(tgt_grid).__name__}.")
        if ref_image_sizes is not None and (
            isinstance(ref_image_sizes, (str, bytes)) or not isinstance(ref_image_sizes, Sequence)
        ):
            raise ValueError(f"Expected `ref_image_sizes` to be a list of (H, W), but got {ref_image_sizes!r}.")
        if ref_image_sizes is not None and len(ref_image_sizes) != len(ref_grids):
            raise ValueError(
                f"Expected `ref_image_sizes` with one (H, W) per reference ({len(ref_grids)}), "
                f"but got {len(ref_image_sizes)}."
            )
        with_confidence = all(len(pair) == 3 for s in samples for pair in s) and num_refs > 0
        point_lists: _PointLists = []
        for b, sample in enumerate(samples):
            per_ref = []
            for k, pair in enumerate(sample):
                if len(pair) not in (2, 3):
                    raise ValueError(
                        f"Expected `samples[{b}][{k}]` = (ref_xy, tgt_xy[, confidence]), but got {len(pair)} items."
                    )
                ref_xy = _as_tensor(f"samples[{b}][{k}] ref_xy", pair[0])
                tgt_xy = _as_tensor(f"samples[{b}][{k}] tgt_xy", pair[1])
                check_shape(f"samples[{b}][{k}] ref_xy", ref_xy, [None, 2], "(P, 2)")
                check_shape(f"samples[{b}][{k}] tgt_xy", tgt_xy, [ref_xy.shape[0], 2], "(P, 2)")
                conf = (
                    torch.ones(ref_xy.shape[0]) if len(pair) == 2
                    else _as_tensor(f"samples[{b}][{k}] confidence", pair[2], dtype=torch.float32)
                )
                check_shape(f"samples[{b}][{k}] confidence", conf, [ref_xy.shape[0]], "(P,)")
                if not bool(torch.isfinite(conf).all()):
                    raise ValueError(f"Expected `samples[{b}][{k}] confidence` to be finite, but got {conf.tolist()}.")
                size = None if ref_image_sizes is None else check_int_pair(f"ref_image_sizes[{k}]", ref_image_sizes[k])
                u = ref_grids[k].pixel_to_token(ref_xy, image_size=size)
                v = tgt_grid.pixel_to_token(tgt_xy, image_size=tgt_image_size)
                pts = list(zip(u.tolist(), v.tolist(), conf.tolist()))
                if first_per_ref_token:
                    seen: dict[int, tuple[int, int, float]] = {}
                    for pt in pts:
                        seen.setdefault(pt[0], pt)
                    pts = list(seen.values())
                per_ref.append(pts)
            point_lists.append(per_ref)
        ref_tokens = [g.num_tokens for g in ref_grids]
        return cls._from_point_lists(point_lists, ref_tokens, tgt_grid.num_tokens, with_confidence)

    def to_dicts(self) -> list[list[dict[int, int]]]:
        """Converts back to the released per-sample format (see `from_dicts`).

        Trailing absent references are dropped from each sample's list.

        Raises:
            ValueError: if an absent reference comes before a present one, or a reference token
                has two pairs (neither can be written in the released format).
        """
        present = self.ref_present.cpu().tolist()
        mask = self.point_mask.cpu()
        u_all, v_all = self.ref_index.cpu(), self.tgt_index.cpu()
        out: list[list[dict[int, int]]] = []
        for b in range(self.batch_size):
            count = max((k + 1 for k in range(self.num_refs) if present[b][k]), default=0)
            if not all(present[b][:count]):
                raise ValueError(
                    f"Expected absent references only after present ones for the released format, "
                    f"but sample {b} has presence {present[b]}."
                )
            refs = []
            for k in range(count):
                sel = mask[b, k]
                pairs: dict[int, int] = {}
                for u, v in zip(u_all[b, k][sel].tolist(), v_all[b, k][sel].tolist()):
                    if u in pairs:
                        raise ValueError(
                            f"Expected one pair per reference token for the released format, but sample {b}, "
                            f"reference {k} maps token {u} to both {pairs[u]} and {v}."
                        )
                    pairs[u] = v
                refs.append(pairs)
            out.append(refs)
        return out
