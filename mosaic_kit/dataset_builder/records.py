"""Per-item records of the data-building stages, their storage and the shard assignment.

Every stage writes one JSON record per item under ``<out>/<stage>/<id>.json`` (atomically: a
killed run leaves either the whole record or none), after the item's other files (images, masks).
A record on disk means the item is finished for that stage, so a rerun skips it.
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..utils.atomic import write_text_atomic  # re-exported: the one atomic writer

__all__ = ["STAGES", "StageStore", "in_shard", "item_seed", "parse_shard", "read_text_utf8", "reject_reason_key",
           "write_text_atomic"]

STAGES = ("prompts", "images", "subjects", "filter", "references", "correspondences")
"""The stages in the order they run (the filter needs the subjects' detections)."""


def read_text_utf8(path: str | Path) -> str:
    """The text of a UTF-8 file (a leading byte-order mark dropped), whatever the machine's locale.

    Args:
        path: the file.

    Returns:
        Its text.

    Raises:
        ValueError: naming the file, and the line, column and byte offset of the first byte that
            is not valid UTF-8; or naming the file when it cannot be read.

    Examples:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "prompts.jsonl"
        >>> _ = path.write_bytes(b'{"prompt": "a dog"}\\n{"prompt": "caf\\xe9"}\\n')
        >>> read_text_utf8(path)
        Traceback (most recent call last):
        ...
        ValueError: ...prompts.jsonl: expected UTF-8 text, but byte 0xe9 at line 2, column 16 (byte offset 35) is not valid UTF-8; re-save the file as UTF-8.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ValueError(f"{path}: expected a readable text file, but {type(error).__name__}: {error}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line_start = data.rfind(b"\n", 0, error.start) + 1
        line = data.count(b"\n", 0, error.start) + 1
        column = len(data[line_start:error.start].decode("utf-8", errors="replace")) + 1
        raise ValueError(f"{path}: expected UTF-8 text, but byte 0x{data[error.start]:02x} at line {line}, column "
                         f"{column} (byte offset {error.start}) is not valid UTF-8; re-save the file as UTF-8.") from None
    return text.removeprefix("\ufeff")


def in_shard(item_id: str, shard: int, num_shards: int) -> bool:
    """Whether ``item_id`` belongs to shard ``shard`` of ``num_shards``.

    The assignment is a stable hash (CRC-32) of the id, so it does not depend on the order or the
    number of items, and the ``num_shards`` shards partition every set of ids.

    Args:
        item_id: the item's id.
        shard: this shard, ``0 <= shard < num_shards``.
        num_shards: the number of shards, ``>= 1``.

    Returns:
        True for exactly one ``shard`` per id.

    Examples:
        >>> [sum(in_shard(f"p{i:06d}", s, 3) for s in range(3)) for i in range(4)]
        [1, 1, 1, 1]
    """
    if isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1:
        raise ValueError(f"Expected `num_shards` to be an int >= 1, but got {num_shards!r}.")
    if isinstance(shard, bool) or not isinstance(shard, int) or not 0 <= shard < num_shards:
        raise ValueError(f"Expected `shard` to be an int in [0, {num_shards}), but got {shard!r}.")
    return zlib.crc32(item_id.encode()) % num_shards == shard


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` → ``(i, n)``, this shard and the number of shards.

    Raises:
        ValueError: unless ``0 <= i < n``.

    Examples:
        >>> parse_shard("2/8")
        (2, 8)
        >>> parse_shard("8/8")
        Traceback (most recent call last):
        ...
        ValueError: Expected a shard 'i/n' with 0 <= i < n, but got '8/8'.
    """
    match = re.fullmatch(r"(\d+)/(\d+)", str(text).strip())
    if not match or not 0 <= int(match.group(1)) < int(match.group(2)):
        raise ValueError(f"Expected a shard 'i/n' with 0 <= i < n, but got {text!r}.")
    return int(match.group(1)), int(match.group(2))


def item_seed(seed: int, item_id: str) -> int:
    """The seed of one item: a stable function of the run's seed and the item's id (not of the
    shard, the batch or the order), below ``2**31``.

    Examples:
        >>> item_seed(0, "p000001") == item_seed(0, "p000001") != item_seed(1, "p000001")
        True
    """
    return zlib.crc32(f"{seed}:{item_id}".encode()) & 0x7FFFFFFF


def reject_reason_key(reason: str) -> str:
    """The summary key of a rejection reason: the part before the first ``:``
    (``"subject_missing: dog"`` → ``"subject_missing"``).

    Examples:
        >>> reject_reason_key("subject_missing: dog")
        'subject_missing'
    """
    return reason.split(":", 1)[0].strip()


class StageStore:
    """The records of one stage: ``<root>/<stage>/<id>.json`` plus the stage's other files.

    Args:
        root: the run's output folder.
        stage: one of `STAGES`.

    Examples:
        >>> import tempfile
        >>> store = StageStore(tempfile.mkdtemp(), "images")
        >>> store.done("p0"), store.write("p0", {"id": "p0", "seed": 3}), store.done("p0"), store.read("p0")["seed"]
        (False, None, True, 3)
        >>> list(store.ids())
        ['p0']
    """

    def __init__(self, root: str | Path, stage: str) -> None:
        if stage not in STAGES:
            raise ValueError(f"Expected `stage` to be one of {list(STAGES)}, but got {stage!r}.")
        self.root = Path(root)
        self.stage = stage
        self.folder = self.root / stage

    def path(self, item_id: str) -> Path:
        """The record's path."""
        return self.folder / f"{item_id}.json"

    def done(self, item_id: str) -> bool:
        """Whether the item's record exists (the item is finished for this stage)."""
        return self.path(item_id).is_file()

    def write(self, item_id: str, record: dict[str, Any]) -> None:
        """Writes the record atomically (write the item's other files first)."""
        write_text_atomic(self.path(item_id), json.dumps(record, indent=1, sort_keys=True))

    def read(self, item_id: str) -> dict[str, Any]:
        """The item's record; raises FileNotFoundError naming the stage when it has none."""
        path = self.path(item_id)
        if not path.is_file():
            raise FileNotFoundError(f"no {self.stage} record for item {item_id!r} ({path}); run that stage first")
        return json.loads(path.read_text(encoding="utf-8"))

    def ids(self) -> Iterator[str]:
        """The ids with a record, sorted."""
        if not self.folder.is_dir():
            return iter(())
        return iter(sorted(p.stem for p in self.folder.glob("*.json") if not p.name.startswith(".")))
