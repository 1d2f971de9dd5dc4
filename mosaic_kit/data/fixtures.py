"""Tiny data sets written on the fly, for tests, examples and trying the readers without data.

- `make_released_fixture`: a folder in the released SemAlign-MS layout (parquet shard,
  ``mask/<uid>.png``, ``coord/dift`` and ``coord/geoaware`` files);
- `make_manifest_fixture`: image files and a JSONL manifest (`mosaic_kit.data.manifest`).

Needs pyarrow for the released layout (``mosaic_kit[data]``).
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from ..utils.checks import check_int
from .released import REFERENCE_BOX, TARGET_BOX, _parquet, released_uid

__all__ = ["DEFAULT_SUBJECTS", "fixture_coordinates", "make_manifest_fixture", "make_released_fixture"]

DEFAULT_SUBJECTS = (("dog", "a dog on the grass"), ("cat", "a cat on a sofa"), ("teapot", "a teapot on a table"))
"""``(item, description_0)`` of the fixture rows."""

_PALETTE = ((200, 60, 40), (40, 120, 200), (60, 170, 70), (220, 180, 40), (150, 70, 170), (240, 120, 170))


def fixture_coordinates(grid: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixture's DIFT and GeoAware coordinate tensors (layout ``(grid, grid, 2)``, ``(ry, rx)``).

    The fixture's reference panel is the target panel mirrored left-right, so both extractors map
    target cell ``(ty, tx)`` to reference cell ``(ty, grid - 1 - tx)``, except that GeoAware
    names ``(ty, (grid - tx) % grid)`` (one cell off) on the cells where ``(ty + 2 * tx) % 7 == 0``.

    Args:
        grid: cells per side.

    Returns:
        ``(dift, geoaware)``, two ``(grid, grid, 2)`` int16 tensors.

    Examples:
        >>> dift, geo = fixture_coordinates(8)
        >>> dift[0, 0].tolist(), geo[0, 0].tolist(), dift[0, 1].tolist() == geo[0, 1].tolist()
        ([0, 7], [0, 0], True)
    """
    grid = check_int("grid", grid, minimum=2)
    ty, tx = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    dift = torch.stack((ty, grid - 1 - tx), -1)
    disagree = (ty + 2 * tx) % 7 == 0
    geo = torch.stack((ty, torch.where(disagree, (grid - tx) % grid, grid - 1 - tx)), -1)
    return dift.to(torch.int16), geo.to(torch.int16)


def _subject_box(index: int) -> tuple[int, int, int, int]:
    left, top = 64 + (index * 56) % 160, 96 + (index * 40) % 120
    return left, top, left + 256, top + 224


def _panels(index: int) -> tuple[Image.Image, Image.Image, Image.Image]:
    """Target panel, reference panel (the target mirrored) and the target's subject mask."""
    target = Image.new("RGB", (512, 512), (235, 232, 215 - (index * 23) % 90))
    draw = ImageDraw.Draw(target)
    box = _subject_box(index)
    colour = _PALETTE[index % len(_PALETTE)]
    draw.ellipse(box, fill=colour)
    draw.rectangle((box[0] + 60, box[1] + 50, box[0] + 110, box[1] + 100), fill=(20, 20, 20))  # an asymmetric mark
    mask = Image.new("L", (512, 512), 0)
    ImageDraw.Draw(mask).ellipse(box, fill=255)
    return target, target.transpose(Image.Transpose.FLIP_LEFT_RIGHT), mask


def make_released_fixture(
    root: str | Path,
    subjects: Sequence[tuple[str, str]] = DEFAULT_SUBJECTS,
    grid: int = 64,
    rows_per_shard: int | None = None,
) -> list[str]:
    """Writes a tiny data set in the released layout and returns the uids, in row order.

    Row ``i`` shows subject ``i`` (an ellipse with a dark mark) on the 512×512 target panel and the
    same panel mirrored left-right as the reference; ``mask/<uid>.png`` is the ellipse, and the
    coordinate files hold `fixture_coordinates`. Shards are ``train-00000.parquet``, ...

    Args:
        root: the folder to write into (created if needed).
        subjects: ``(item, description_0)`` per row; ``description_1`` is ``"<item> alone"``.
        grid: side of the coordinate grids.
        rows_per_shard: rows per shard (default: all rows in one shard).

    Returns:
        The uids of the rows.

    Examples:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> uids = make_released_fixture(root, [("dog", "a dog"), ("cat", "a cat")])
        >>> len(uids), sorted(p.name for p in root.iterdir())
        (2, ['coord', 'mask', 'train-00000.parquet'])
    """
    pa, pq = _parquet_modules()
    root = Path(root)
    for folder in ("mask", "coord/dift", "coord/geoaware"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    if not subjects:
        raise ValueError("Expected `subjects` to hold at least one (item, description_0) pair, but got none.")
    dift, geo = fixture_coordinates(grid)
    records, uids = [], []
    for index, (item, caption) in enumerate(subjects):
        target, reference, mask = _panels(index)
        canvas = Image.new("RGB", (1048, 528), "white")
        canvas.paste(target, TARGET_BOX[:2])
        canvas.paste(reference, REFERENCE_BOX[:2])
        encoded = io.BytesIO()
        canvas.save(encoded, format="PNG")
        uid = released_uid(item, caption, target)
        mask.save(root / "mask" / f"{uid}.png")
        torch.save(dift.clone(), root / "coord" / "dift" / f"{uid}_ref0.pt")
        torch.save(geo.clone(), root / "coord" / "geoaware" / f"{uid}_ref0.pt")
        records.append({"image": {"bytes": encoded.getvalue(), "path": None},
                        "description": {"item": item, "description_0": caption, "description_1": f"{item} alone"}})
        uids.append(uid)
    per_shard = len(records) if rows_per_shard is None else check_int("rows_per_shard", rows_per_shard, minimum=1)
    for shard, start in enumerate(range(0, len(records), per_shard)):
        pq.write_table(pa.Table.from_pylist(records[start:start + per_shard]), root / f"train-{shard:05d}.parquet")
    return uids


def _parquet_modules():
    pq = _parquet()
    import pyarrow as pa

    return pa, pq


def make_manifest_fixture(
    root: str | Path,
    subjects: Sequence[str] = ("dog", "cat", "teapot"),
    size: int = 128,
) -> Path:
    """Writes images, masks, a correspondence file and ``manifest.jsonl``; returns the manifest.

    One line per subject ``s_i`` (id ``s_i``, caption ``"a photo of s_i"``): the target
    ``images/<s>_target.png`` (an ellipse on a plain background, ``size``×``size``), one reference
    ``images/<s>_ref.png`` (the target mirrored left-right, ``size // 2`` square), masks for both,
    and as correspondences the ellipse's centre and two points beside it. The first line gives
    them inline, the others in ``pairs/<s>.json``.

    Args:
        root: the folder to write into.
        subjects: one name per line.
        size: the targets' side in pixels.

    Returns:
        The manifest's path.

    Examples:
        >>> import tempfile
        >>> path = make_manifest_fixture(Path(tempfile.mkdtemp()), ["dog"])
        >>> json.loads(path.read_text())["correspondences"][0][0]
        [32.0, 32.0, 64.0, 64.0]
    """
    root = Path(root)
    size = check_int("size", size, minimum=16)
    for folder in ("images", "masks", "pairs"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    lines = []
    for index, name in enumerate(subjects):
        target, _, mask = _panels(index)
        # A centred subject, so the mirrored reference maps x to size - x.
        target = Image.new("RGB", (512, 512), target.getpixel((0, 0)))
        mask = Image.new("L", (512, 512), 0)
        box = (128, 128, 384, 384)
        ImageDraw.Draw(target).ellipse(box, fill=_PALETTE[index % len(_PALETTE)])
        ImageDraw.Draw(mask).ellipse(box, fill=255)
        target, mask = target.resize((size, size), Image.BICUBIC), mask.resize((size, size), Image.NEAREST)
        half = size // 2
        reference = target.transpose(Image.Transpose.FLIP_LEFT_RIGHT).resize((half, half), Image.BICUBIC)
        reference_mask = mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT).resize((half, half), Image.NEAREST)
        target.save(root / "images" / f"{name}_target.png")
        reference.save(root / "images" / f"{name}_ref.png")
        mask.save(root / "masks" / f"{name}_target.png")
        reference_mask.save(root / "masks" / f"{name}_ref.png")
        centre, step = size / 2, size / 8
        pairs = [
            [(size - x) / 2, y / 2, x, y]  # mirrored and halved on the reference
            for x, y in ((centre, centre), (centre - step, centre), (centre, centre + step))
        ]
        line = {
            "id": name,
            "target": f"images/{name}_target.png",
            "references": [f"images/{name}_ref.png"],
            "caption": f"a photo of {name}",
            "subjects": [name],
            "target_masks": [f"masks/{name}_target.png"],
            "reference_masks": [f"masks/{name}_ref.png"],
        }
        if index == 0:
            line["correspondences"] = [pairs]
        else:
            (root / "pairs" / f"{name}.json").write_text(json.dumps([pairs]))
            line["correspondences"] = f"pairs/{name}.json"
        lines.append(json.dumps(line))
    path = root / "manifest.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path
