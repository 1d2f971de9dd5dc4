"""Bad data: a typed exception, a tally, and deterministic skipping.

Datasets in `mosaic_kit.data` never catch a broken sample and return a random other one (that
would change what a seeded run sees and break exact resume). Instead they raise `BadSample`
with a kind from `BAD_SAMPLE_KINDS`, the sample's id and a reason. Whoever iterates decides:
`skip_bad` and `SkippingLoader` skip it, count it in a `BadDataTally` and log it with its id; any
other exception propagates, because it is a bug rather than bad data.

Example:
    >>> tally = BadDataTally()
    >>> tally.record(BadSample("empty_mask", "dog_0", "mask/dog_0.png has no pixel set"))
    >>> tally.counts, tally.total
    ({'empty_mask': 1}, 1)
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

__all__ = ["BAD_SAMPLE_KINDS", "BadDataTally", "BadSample", "skip_bad"]

log = logging.getLogger("mosaic_kit.data")

BAD_SAMPLE_KINDS = (
    "unreadable_image",
    "missing_mask",
    "empty_mask",
    "missing_coordinates",
    "malformed_coordinates",
    "malformed_row",
)
"""The kinds of bad data:

- ``"unreadable_image"``: an image or mask file (or a parquet row's image) is missing or cannot be
  decoded;
- ``"missing_mask"``: a required subject mask does not exist;
- ``"empty_mask"``: a subject mask has no pixel set;
- ``"missing_coordinates"``: a coordinate or correspondence file does not exist;
- ``"malformed_coordinates"``: a coordinate or correspondence file has the wrong shape, dtype or
  values (out of range, not finite);
- ``"malformed_row"``: a row's other fields (e.g. the released ``description``) are malformed.
"""


class BadSample(Exception):
    """A sample that cannot be used: raised by the datasets of `mosaic_kit.data`.

    Args:
        kind: one of `BAD_SAMPLE_KINDS`.
        sample_id: the sample's id (for the released layout, ``"<shard>:<row>"`` when the row
            cannot be decoded far enough to know its uid).
        reason: what is wrong, naming the file where there is one.

    Example:
        >>> bad = BadSample("missing_mask", "a1b2", "no file mask/a1b2.png")
        >>> bad.kind, bad.sample_id, str(bad)
        ('missing_mask', 'a1b2', 'a1b2 (missing_mask): no file mask/a1b2.png')
    """

    def __init__(self, kind: str, sample_id: str, reason: str) -> None:
        if kind not in BAD_SAMPLE_KINDS:
            raise ValueError(f"Expected `kind` to be one of {list(BAD_SAMPLE_KINDS)}, but got {kind!r}.")
        super().__init__(kind, sample_id, reason)  # args kept: the exception pickles (DataLoader workers)
        self.kind = kind
        self.sample_id = str(sample_id)
        self.reason = str(reason)

    def __str__(self) -> str:
        return f"{self.sample_id} ({self.kind}): {self.reason}"


@dataclass
class BadDataTally:
    """Counts of skipped samples per kind, with their ids (in the order they were met).

    Attributes:
        counts: ``{kind: count}`` for the kinds met so far.
        ids: ``{kind: [sample_id, ...]}``.

    Example:
        >>> tally = BadDataTally()
        >>> for bad in (BadSample("empty_mask", "a", "empty"), BadSample("missing_mask", "b", "gone"),
        ...             BadSample("empty_mask", "c", "empty")):
        ...     tally.record(bad)
        >>> print(tally.summary())
        bad data skipped: 3
          empty_mask: 2 (a, c)
          missing_mask: 1 (b)
        >>> BadDataTally.from_state_dict(tally.state_dict()) == tally
        True
    """

    counts: dict[str, int] = field(default_factory=dict)
    ids: dict[str, list[str]] = field(default_factory=dict)

    def record(self, bad: BadSample) -> None:
        """Counts ``bad`` under its kind and keeps its id.

        Args:
            bad: the skipped sample's exception.

        Returns:
            None.

        Example:
            >>> tally = BadDataTally()
            >>> tally.record(BadSample("missing_coordinates", "x", "no coord/dift/x_ref0.pt"))
            >>> tally.ids
            {'missing_coordinates': ['x']}
        """
        if not isinstance(bad, BadSample):
            raise ValueError(f"Expected `bad` to be a BadSample, but got {type(bad).__name__}.")
        self.counts[bad.kind] = self.counts.get(bad.kind, 0) + 1
        self.ids.setdefault(bad.kind, []).append(bad.sample_id)

    @property
    def total(self) -> int:
        """All skipped samples."""
        return sum(self.counts.values())

    def merge(self, other: BadDataTally) -> BadDataTally:
        """A new tally with the counts and ids of both (e.g. gathered from several processes).

        Args:
            other: another tally.

        Returns:
            The combined tally (``self``'s ids first).

        Example:
            >>> a, b = BadDataTally({"empty_mask": 1}, {"empty_mask": ["x"]}), BadDataTally({"empty_mask": 1}, {"empty_mask": ["y"]})
            >>> a.merge(b).ids
            {'empty_mask': ['x', 'y']}
        """
        if not isinstance(other, BadDataTally):
            raise ValueError(f"Expected `other` to be a BadDataTally, but got {type(other).__name__}.")
        merged = BadDataTally.from_state_dict(self.state_dict())
        for kind, count in other.counts.items():
            merged.counts[kind] = merged.counts.get(kind, 0) + count
            merged.ids.setdefault(kind, []).extend(other.ids.get(kind, []))
        return merged

    def summary(self, max_ids: int = 10) -> str:
        """A printable report: the total, then per kind its count and up to ``max_ids`` ids.

        Args:
            max_ids: ids listed per kind (the rest are counted as ``+N more``).

        Returns:
            The report, one line per kind.

        Example:
            >>> print(BadDataTally().summary())
            bad data skipped: 0
        """
        lines = [f"bad data skipped: {self.total}"]
        for kind in sorted(self.counts):
            ids = self.ids.get(kind, [])
            listed = ", ".join(ids[:max_ids]) + (f", +{len(ids) - max_ids} more" if len(ids) > max_ids else "")
            lines.append(f"  {kind}: {self.counts[kind]} ({listed})")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def state_dict(self) -> dict[str, Any]:
        """A plain-data copy (for checkpoints).

        Returns:
            ``{"counts": {...}, "ids": {...}}``.

        Example:
            >>> BadDataTally().state_dict()
            {'counts': {}, 'ids': {}}
        """
        return {"counts": dict(self.counts), "ids": {kind: list(ids) for kind, ids in self.ids.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores the counts and ids of `state_dict`.

        Args:
            state: what `state_dict` returned.

        Returns:
            None.

        Example:
            >>> tally = BadDataTally()
            >>> tally.load_state_dict({"counts": {"empty_mask": 1}, "ids": {"empty_mask": ["a"]}})
            >>> tally.total
            1
        """
        if not isinstance(state, dict) or set(state) != {"counts", "ids"}:
            raise ValueError(f"Expected `state` with keys ['counts', 'ids'], but got {state!r}.")
        self.counts = {str(k): int(v) for k, v in state["counts"].items()}
        self.ids = {str(k): [str(i) for i in v] for k, v in state["ids"].items()}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> BadDataTally:
        """A tally restored from `state_dict`.

        Args:
            state: what `state_dict` returned.

        Returns:
            The tally.

        Example:
            >>> BadDataTally.from_state_dict({"counts": {}, "ids": {}}).total
            0
        """
        tally = cls()
        tally.load_state_dict(state)
        return tally


def skip_bad(dataset: Any, order: Iterable[int], tally: BadDataTally | None = None) -> Iterator[tuple[int, Any]]:
    """Yields ``(index, sample)`` for the good samples of ``dataset`` in ``order``.

    A `BadSample` is counted in ``tally``, logged with its id (logger ``mosaic_kit.data``) and
    skipped; nothing takes its place, so the same order always yields the same samples. Any other
    exception propagates.

    Args:
        dataset: a map-style dataset (``dataset[index]``).
        order: the indices to read, in order.
        tally: where skipped samples are counted (optional).

    Returns:
        An iterator of ``(index, sample)``.

    Example:
        >>> class Data:
        ...     def __getitem__(self, index):
        ...         if index == 1:
        ...             raise BadSample("unreadable_image", f"s{index}", "truncated file")
        ...         return f"s{index}"
        >>> tally = BadDataTally()
        >>> list(skip_bad(Data(), [2, 1, 0], tally)), tally.counts
        ([(2, 's2'), (0, 's0')], {'unreadable_image': 1})
    """
    for index in order:
        try:
            sample = dataset[index]
        except BadSample as bad:
            if tally is not None:
                tally.record(bad)
            log.warning("skipping bad sample %s", bad)
            continue
        yield index, sample
