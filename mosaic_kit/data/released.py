"""Reading the released SemAlign-MS-Subjects200K layout.

The released data is a folder of parquet shards. Each row holds:

- an ``image`` with two 512-pixel panels side by side: the target at x 8…520 and the reference
  at x 528…1040, both at y 8…520;
- a ``description`` dict with ``item``, ``description_0`` (the target's caption) and
  ``description_1``.

Beside the shards, ``mask/<uid>.png`` holds the target's subject mask. The sample id is
``uid = sha256(f"{item}_{description_0}_{h}")`` in hex, where ``h`` is the first 8 hex digits of
the sha256 of the target panel saved as PNG.

This module reads images, captions, masks and ids. The released coordinate files are left to the
training data reader.

The examples below share a one-row data set built like this (the tests provide it as `root`):

>>> import tempfile, pyarrow, pyarrow.parquet
>>> root = Path(tempfile.mkdtemp())
>>> canvas, encoded = Image.new("RGB", (1048, 528), "white"), io.BytesIO()
>>> canvas.save(encoded, format="PNG")
>>> row = {"image": {"bytes": encoded.getvalue(), "path": None},
...        "description": {"item": "dog", "description_0": "a dog", "description_1": "the dog"}}
>>> pyarrow.parquet.write_table(pyarrow.Table.from_pylist([row]), root / "train-0.parquet")
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ._images import to_rgb

__all__ = [
    "REFERENCE_BOX",
    "TARGET_BOX",
    "ReleasedRow",
    "ReleasedSample",
    "count_released_rows",
    "decode_released_row",
    "iter_released_rows",
    "iter_released_samples",
    "released_shards",
    "released_uid",
    "split_panels",
]

TARGET_BOX = (8, 8, 520, 520)
"""``(left, top, right, bottom)`` of the target panel in a released image."""
REFERENCE_BOX = (528, 8, 1040, 520)
"""``(left, top, right, bottom)`` of the reference panel in a released image."""


@dataclass(frozen=True)
class ReleasedSample:
    """One row of the released data.

    Args:
        uid: the sample id (see `released_uid`).
        item: the subject's name.
        target_caption: ``description_0``.
        reference_caption: ``description_1`` (empty when absent).
        target: the 512×512 RGB target panel.
        reference: the 512×512 RGB reference panel.
        mask_path: ``<root>/mask/<uid>.png`` (it may not exist).
        shard: the parquet file the row comes from.
        row: the row's index within its shard.

    Example (the data set of the module docstring):
        >>> sample = next(iter_released_samples(root))
        >>> sample.item, sample.target_caption, sample.reference.size, sample.mask_path.name == f"{sample.uid}.png"
        ('dog', 'a dog', (512, 512), True)
    """

    uid: str
    item: str
    target_caption: str
    reference_caption: str
    target: Image.Image
    reference: Image.Image
    mask_path: Path
    shard: Path
    row: int


def split_panels(image: Image.Image) -> tuple[Image.Image, Image.Image]:
    """The ``(target, reference)`` RGB panels of a released side-by-side image.

    Example:
        >>> canvas = Image.new("RGB", (1048, 528), "white")
        >>> canvas.paste((255, 0, 0), TARGET_BOX)
        >>> target, reference = split_panels(canvas)
        >>> target.size, target.getpixel((0, 0)), reference.getpixel((0, 0))
        ((512, 512), (255, 0, 0), (255, 255, 255))
    """
    width, height = image.size
    if width < REFERENCE_BOX[2] or height < REFERENCE_BOX[3]:
        raise ValueError(
            f"Expected a released image of at least {REFERENCE_BOX[2]}×{REFERENCE_BOX[3]} pixels (W×H), "
            f"but got {width}×{height}."
        )
    image = to_rgb(image, "released image")  # 16-bit, palette, CMYK and alpha converted; see `to_rgb`
    return image.crop(TARGET_BOX), image.crop(REFERENCE_BOX)


def released_uid(item: str, description_0: str, target: Image.Image) -> str:
    """``sha256(f"{item}_{description_0}_{h}")`` in hex, where ``h`` is the first 8 hex digits of
    the sha256 of ``target`` saved as PNG (with PIL's defaults, as the released code does).

    Example:
        >>> uid = released_uid("dog", "a dog on grass", Image.new("RGB", (512, 512), "white"))
        >>> len(uid), uid == released_uid("dog", "a dog on grass", Image.new("RGB", (512, 512), "white"))
        (64, True)
    """
    buffer = io.BytesIO()
    target.save(buffer, format="PNG")
    short = hashlib.sha256(buffer.getvalue()).hexdigest()[:8]
    return hashlib.sha256(f"{item}_{description_0}_{short}".encode()).hexdigest()


def released_shards(root: str | Path) -> list[Path]:
    """The parquet shards under ``root`` (recursively), sorted by path.

    Example (the data set of the module docstring):
        >>> [shard.name for shard in released_shards(root)]
        ['train-0.parquet']
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"Expected `root` to be a folder of parquet shards, but {root} is not a folder.")
    shards = sorted(root.rglob("*.parquet"))
    if not shards:
        raise ValueError(f"Expected parquet shards under `root` = {root}, but found none.")
    return shards


def _parquet():
    try:
        import pyarrow.parquet as pq
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("Reading the released layout needs pyarrow: pip install 'mosaic_kit[data]'.") from error
    return pq


def _read_errors() -> tuple[type[BaseException], ...]:
    """The errors pyarrow raises on a truncated or corrupt file."""
    import pyarrow

    return (OSError, ValueError, pyarrow.ArrowException)


def _shard_error(shard: Path, error: Exception, where: str = "") -> ValueError:
    return ValueError(
        f"{shard}{where}: expected a readable parquet shard, but it cannot be read (truncated or corrupt?): "
        f"{type(error).__name__}: {error}"
    )


def _open_shard(shard: Path):
    """``pyarrow.parquet.ParquetFile`` of a shard; a truncated or corrupt one raises a `ValueError`
    naming it (pyarrow's own error, e.g. "Parquet magic bytes not found", does not)."""
    pq = _parquet()
    try:
        return pq.ParquetFile(shard)
    except _read_errors() as error:
        raise _shard_error(shard, error) from None


def count_released_rows(root: str | Path) -> int:
    """The number of rows in all shards (from the parquet metadata; no image is decoded).

    Raises:
        ValueError: naming the shard, when one is truncated or corrupt (its footer cannot be read).

    Example (the data set of the module docstring):
        >>> count_released_rows(root)
        1
    """
    return sum(_open_shard(shard).metadata.num_rows for shard in released_shards(root))


def _image_bytes(value) -> bytes:
    if isinstance(value, dict):  # the datasets Image feature: {"bytes": ..., "path": ...}
        value = value.get("bytes")
    if not isinstance(value, (bytes, bytearray)):
        raise ValueError(f"Expected the `image` column to hold encoded image bytes, but got {type(value).__name__}.")
    return bytes(value)


def _description(value) -> dict:
    if isinstance(value, str):
        value = json.loads(value)
    if not isinstance(value, dict) or not all(isinstance(value.get(key), str) for key in ("item", "description_0")):
        raise ValueError(f"Expected `description` with string 'item' and 'description_0', but got {value!r}.")
    return value


@dataclass(frozen=True)
class ReleasedRow:
    """One undecoded row: where it is, its encoded image and its description.

    Example (the data set of the module docstring):
        >>> row = next(iter_released_rows(root))
        >>> row.shard.name, row.row, row.description["item"]
        ('train-0.parquet', 0, 'dog')
    """

    shard: Path
    row: int
    image: object
    description: object


def iter_released_rows(root: str | Path, batch_size: int = 32) -> Iterator[ReleasedRow]:
    """Yields the undecoded rows of every shard under ``root`` in order (shards sorted by path).

    Raises:
        ValueError: naming the shard, when one is truncated or corrupt.

    Example (the data set of the module docstring):
        >>> [(row.row, row.description["description_0"]) for row in iter_released_rows(root)]
        [(0, 'a dog')]
    """
    for shard in released_shards(root):
        row = 0
        batches = _open_shard(shard).iter_batches(batch_size=batch_size, columns=["image", "description"])
        while True:
            try:
                batch = next(batches, None)
            except _read_errors() as error:
                raise _shard_error(shard, error, f" (after row {row})") from None
            if batch is None:
                break
            for image, description in zip(batch.column("image").to_pylist(), batch.column("description").to_pylist()):
                yield ReleasedRow(shard, row, image, description)
                row += 1


def decode_released_row(row: ReleasedRow, root: str | Path) -> ReleasedSample:
    """Decodes a row: panels, captions, uid and mask path.

    Raises:
        ValueError: naming the shard and row, when the image or the description is malformed.

    Example (the data set of the module docstring):
        >>> sample = decode_released_row(next(iter_released_rows(root)), root)
        >>> sample.uid == released_uid("dog", "a dog", sample.target)
        True
    """
    try:
        description = _description(row.description)
        with Image.open(io.BytesIO(_image_bytes(row.image))) as image:
            target, reference = split_panels(image)
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(f"{row.shard} row {row.row}: {error}") from error
    uid = released_uid(description["item"], description["description_0"], target)
    return ReleasedSample(
        uid=uid,
        item=description["item"],
        target_caption=description["description_0"],
        reference_caption=description.get("description_1") or "",
        target=target,
        reference=reference,
        mask_path=Path(root) / "mask" / f"{uid}.png",
        shard=row.shard,
        row=row.row,
    )


def iter_released_samples(root: str | Path, batch_size: int = 32) -> Iterator[ReleasedSample]:
    """Yields the decoded samples of every shard under ``root`` in order; stops with ValueError
    at the first malformed row (use `iter_released_rows` and `decode_released_row` to skip
    bad rows instead).

    Example (the data set of the module docstring):
        >>> [sample.item for sample in iter_released_samples(root)]
        ['dog']
    """
    for row in iter_released_rows(root, batch_size):
        yield decode_released_row(row, root)
