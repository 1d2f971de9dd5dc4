"""A plain JSONL manifest for your own data, and a dataset over it.

One JSON object per line (blank lines are skipped); paths are relative to the manifest's folder
(absolute paths are kept):

```json
{"id": "dog_0", "target": "images/dog_0.jpg", "references": ["images/dog_ref.jpg", "images/cat_ref.jpg"],
 "caption": "a dog and a cat on a sofa", "subjects": ["dog", "cat"],
 "target_masks": ["masks/dog_0_dog.png", null], "reference_masks": ["masks/dog_ref.png", null],
 "correspondences": [[[12.5, 40.5, 300.5, 220.5], [20.5, 44.5, 310.5, 230.5]], []]}
```

Keys:

- ``id`` (required): unique, letters, digits, ``.``, ``_`` and ``-`` (ids become file names);
- ``target`` (required): the target image;
- ``references`` (required): a non-empty list of reference images, one per subject;
- ``caption``: the target's caption (default ``""``);
- ``subjects``: one name per reference (used by the composer's captions);
- ``target_mask``: one mask of all subjects in the target (what ``build_correspondences`` uses);
- ``target_masks``: one mask (or null) per reference, the subject's region in the target;
  when absent, every reference gets ``target_mask``;
- ``reference_masks``: one mask (or null) per reference;
- ``correspondences``: per reference, a list of pixel pairs ``[ref_x, ref_y, tgt_x, tgt_y]`` in the
  pixels of the image files as stored (continuous coordinates: pixel ``i`` spans ``[i, i + 1)``,
  its centre is ``i + 0.5``), inline or as the path of a ``.json`` file holding the same nested
  list or a ``.pt`` file holding a list of ``(P, 4)`` tensors. Absent: no pairs;
- ``meta``: an optional object passed on in the sample's ``meta``.

A mask is any image, non-zero inside, of any size (it is read at each pixel centre of its image's
frame). Any other key is an error, so that a misspelt key does not go unnoticed.
"""

from __future__ import annotations

import json
import math
import pickle
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError

from ._images import as_size, load_mask, open_image, pil_to_tensor, resize_mask, scale_pairs, to_rgb
from .bad import BadSample
from .sample import MultiSubjectSample

__all__ = ["MANIFEST_KEYS", "ManifestDataset", "ManifestEntry", "load_pairs_file", "read_manifest"]

MANIFEST_KEYS = (
    "id", "target", "references", "caption", "subjects", "target_mask", "target_masks", "reference_masks",
    "correspondences", "meta",
)
"""The keys a manifest line may hold."""

_ID = re.compile(r"^[A-Za-z0-9._-]+$")
_LOAD_ERRORS = (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError, AttributeError, TypeError)


@dataclass(frozen=True)
class ManifestEntry:
    """One validated manifest line, paths resolved.

    Attributes:
        id: the sample id.
        target: the target image's path.
        references: the reference images' paths.
        caption: the caption (``""`` when absent).
        subjects: one name per reference, or None.
        target_mask: the mask of all subjects in the target, or None.
        target_masks: per reference, a mask path or None.
        reference_masks: per reference, a mask path or None.
        correspondences: per reference a ``(P, 4)`` float32 tensor (inline pairs), the path of a
            pair file, or None.
        meta: the line's ``meta`` object.
        line: the line number in the manifest (1-based).

    Examples:
        >>> entry = ManifestEntry("a", Path("t.png"), [Path("r.png")])
        >>> entry.num_refs, entry.target_masks, entry.correspondences
        (1, [None], None)
    """

    id: str
    target: Path
    references: list[Path]
    caption: str = ""
    subjects: list[str] | None = None
    target_mask: Path | None = None
    target_masks: list[Path | None] = field(default_factory=list)
    reference_masks: list[Path | None] = field(default_factory=list)
    correspondences: list[torch.Tensor] | Path | None = None
    meta: dict = field(default_factory=dict)
    line: int = 0

    def __post_init__(self) -> None:
        for name in ("target_masks", "reference_masks"):
            if not getattr(self, name):
                object.__setattr__(self, name, [None] * len(self.references))

    @property
    def num_refs(self) -> int:
        """K, the number of references."""
        return len(self.references)


def _pair_list(where: str, value: Any, num_refs: int) -> list[torch.Tensor]:
    """Validates the nested pair list ``[[[rx, ry, tx, ty], ...] per reference]``."""
    if not isinstance(value, list) or len(value) != num_refs:
        got = f"a list of {len(value)}" if isinstance(value, list) else type(value).__name__
        raise ValueError(f"{where} must hold one list of [ref_x, ref_y, tgt_x, tgt_y] pairs per reference "
                         f"({num_refs}), but got {got}")
    out = []
    for k, pairs in enumerate(value):
        if isinstance(pairs, torch.Tensor):
            pairs = pairs.tolist() if pairs.numel() else []
        if not isinstance(pairs, list):
            raise ValueError(f"{where}[{k}] must be a list of pairs, but got {type(pairs).__name__}")
        for p, pair in enumerate(pairs):
            if (not isinstance(pair, (list, tuple)) or len(pair) != 4
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in pair)
                    or min(pair) < 0):
                raise ValueError(
                    f"{where}[{k}][{p}] must be [ref_x, ref_y, tgt_x, tgt_y], four finite non-negative pixel "
                    f"coordinates, but got {pair!r}"
                )
        out.append(torch.tensor(pairs, dtype=torch.float32).reshape(-1, 4))
    return out


def load_pairs_file(path: str | Path, num_refs: int) -> list[torch.Tensor]:
    """Reads a correspondence file of the manifest.

    Args:
        path: a ``.json`` file holding ``[[[ref_x, ref_y, tgt_x, tgt_y], ...] per reference]``, or a
            ``.pt`` file (``torch.load(weights_only=True)``) holding a list of ``(P, 4)`` tensors
            or the same nested list.
        num_refs: the number of references the file must cover.

    Returns:
        Per reference, a ``(P, 4)`` float32 tensor.

    Raises:
        FileNotFoundError: when the file does not exist.
        ValueError: naming the file, when it is malformed.

    Examples:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "pairs.pt"
        >>> torch.save([torch.tensor([[1.5, 2.5, 3.5, 4.5]])], path)
        >>> load_pairs_file(path, num_refs=1)
        [tensor([[1.5000, 2.5000, 3.5000, 4.5000]])]
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no correspondence file {path}")
    if path.suffix == ".json":
        try:
            value = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path}: expected JSON pairs, but reading failed: {error}") from None
    elif path.suffix == ".pt":
        try:
            value = torch.load(path, map_location="cpu", weights_only=True)
        except _LOAD_ERRORS as error:
            raise ValueError(f"{path}: expected a torch file of pairs, but loading failed: {error}") from None
        if isinstance(value, tuple):
            value = list(value)
        for k, pairs in enumerate(value if isinstance(value, list) else []):
            if isinstance(pairs, torch.Tensor) and pairs.numel() and (pairs.ndim != 2 or pairs.shape[1] != 4):
                raise ValueError(f"{path}: expected reference {k}'s pairs of shape (P, 4), but got {tuple(pairs.shape)}")
    else:
        raise ValueError(f"Expected a correspondence file ending in .json or .pt, but got {path}.")
    return _pair_list(str(path), value, num_refs)


def _fail(path: Path, number: int, message: str) -> ValueError:
    return ValueError(f"{path}:{number}: {message}")


def _path_list(path: Path, number: int, row: dict, key: str, num_refs: int) -> list[str | None] | None:
    value = row.get(key)
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != num_refs or not all(
        v is None or (isinstance(v, str) and v) for v in value
    ):
        raise _fail(path, number, f"`{key}` must have one path (or null) per reference ({num_refs}), but got {value!r}")
    return value


def read_manifest(path: str | Path) -> list[ManifestEntry]:
    """Reads and validates a JSONL manifest (format in the module docstring).

    Every line is checked (keys, types, unique ids, inline correspondences); files are not opened
    (the dataset reports missing or broken files as `BadSample`).

    Args:
        path: the manifest.

    Returns:
        One `ManifestEntry` per non-blank line, paths resolved against the manifest's folder.

    Raises:
        ValueError: ``"<path>:<line>: ..."`` naming the key, what was expected and what arrived
            (also for a line that is not UTF-8).

    Examples:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "manifest.jsonl"
        >>> _ = path.write_text(json.dumps({"id": "dog_0", "target": "t.png", "references": ["r.png"],
        ...     "caption": "a dog", "correspondences": [[[1.5, 2.5, 30.5, 40.5]]]}) + "\\n")
        >>> entry, = read_manifest(path)
        >>> entry.id, entry.target == path.parent / "t.png", entry.correspondences[0].shape
        ('dog_0', True, torch.Size([1, 4]))
        >>> _ = path.write_text('{"id": "a", "target": "t.png", "references": []}\\n')
        >>> read_manifest(path)
        Traceback (most recent call last):
        ...
        ValueError: ...manifest.jsonl:1: `references` must be a non-empty list of paths, but got []
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"Expected `path` to be a manifest file, but {path} is not a file.")
    base = path.parent
    entries: list[ManifestEntry] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise _fail(
                path, number, f"expected UTF-8 text, but byte 0x{raw[error.start]:02x} at column {error.start + 1} "
                "is not valid UTF-8 (re-save the manifest as UTF-8)",
            ) from None
        if number == 1:
            line = line.removeprefix("\ufeff")  # a byte-order mark, as some editors write
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise _fail(path, number, f"expected a JSON object, but the line is not JSON ({error})") from None
        if not isinstance(row, dict):
            raise _fail(path, number, f"expected a JSON object, but got {type(row).__name__}")
        missing = {"id", "target", "references"} - set(row)
        if missing:
            raise _fail(path, number, f"missing {sorted(missing)} (required: ['id', 'target', 'references'])")
        unknown = set(row) - set(MANIFEST_KEYS)
        if unknown:
            raise _fail(path, number, f"unknown keys {sorted(unknown)}; expected only {list(MANIFEST_KEYS)}")
        sample_id = row["id"]
        if not isinstance(sample_id, str) or not _ID.match(sample_id):
            raise _fail(path, number, f"`id` must be a string of letters, digits, '.', '_', '-', but got {sample_id!r}")
        if sample_id in seen:
            raise _fail(path, number, f"`id` must be unique, but {sample_id!r} is also on line {seen[sample_id]}")
        if not isinstance(row["target"], str) or not row["target"]:
            raise _fail(path, number, f"`target` must be a path, but got {row['target']!r}")
        references = row["references"]
        if not isinstance(references, list) or not references or not all(isinstance(r, str) and r for r in references):
            raise _fail(path, number, f"`references` must be a non-empty list of paths, but got {references!r}")
        num_refs = len(references)
        caption = row.get("caption", "")
        if caption is None:
            caption = ""
        if not isinstance(caption, str):
            raise _fail(path, number, f"`caption` must be a string, but got {caption!r}")
        subjects = row.get("subjects")
        if subjects is not None and (
            not isinstance(subjects, list) or len(subjects) != num_refs or not all(isinstance(s, str) and s for s in subjects)
        ):
            raise _fail(path, number, f"`subjects` must have one name per reference ({num_refs}), but got {subjects!r}")
        target_mask = row.get("target_mask")
        if target_mask is not None and (not isinstance(target_mask, str) or not target_mask):
            raise _fail(path, number, f"`target_mask` must be a path or null, but got {target_mask!r}")
        target_masks = _path_list(path, number, row, "target_masks", num_refs)
        reference_masks = _path_list(path, number, row, "reference_masks", num_refs)
        meta = row.get("meta") or {}
        if not isinstance(meta, dict):
            raise _fail(path, number, f"`meta` must be an object, but got {meta!r}")
        corr = row.get("correspondences")
        if isinstance(corr, str):
            if not corr.endswith((".json", ".pt")):
                raise _fail(path, number, f"`correspondences` must be inline pairs or a .json/.pt path, but got {corr!r}")
            correspondences: list[torch.Tensor] | Path | None = base / corr
        elif corr is None:
            correspondences = None
        else:
            try:
                correspondences = _pair_list("`correspondences`", corr, num_refs)
            except ValueError as error:
                raise _fail(path, number, str(error)) from None
        seen[sample_id] = number
        resolve = (lambda p: None if p is None else base / p)
        if target_masks is None:
            masks = [resolve(target_mask)] * num_refs
        else:
            masks = [resolve(m) for m in target_masks]
        entries.append(ManifestEntry(
            id=sample_id,
            target=base / row["target"],
            references=[base / r for r in references],
            caption=caption,
            subjects=subjects,
            target_mask=resolve(target_mask),
            target_masks=masks,
            reference_masks=[resolve(m) for m in (reference_masks or [None] * num_refs)],
            correspondences=correspondences,
            meta=meta,
            line=number,
        ))
    return entries


def _open_image(sample_id: str, path: Path, size: tuple[int, int] | None) -> tuple[torch.Tensor, tuple[int, int]]:
    """The image as ``(3, H, W)`` at ``size`` (or its own size), and its original ``(H, W)``."""
    try:
        image = to_rgb(open_image(path), str(path))
    except ValueError as error:  # missing, undecodable, too large or an unsupported mode; names the file
        raise BadSample("unreadable_image", sample_id, str(error)) from None
    original = (image.size[1], image.size[0])
    if size is not None and original != size:
        image = image.resize((size[1], size[0]), Image.BICUBIC)
    return pil_to_tensor(image), original


def _open_mask(sample_id: str, path: Path | None, frame: tuple[int, int]) -> torch.Tensor | None:
    if path is None:
        return None
    if not path.is_file():
        raise BadSample("missing_mask", sample_id, f"no mask {path}")
    try:
        mask = load_mask(path)
    except (OSError, UnidentifiedImageError, ValueError) as error:
        raise BadSample("unreadable_image", sample_id, f"mask {path}: {error}") from None
    if not bool(mask.any()):
        raise BadSample("empty_mask", sample_id, f"mask {path} has no pixel inside")
    return resize_mask(mask, frame)


class ManifestDataset(torch.utils.data.Dataset):
    """Map-style dataset over a JSONL manifest (see `read_manifest`).

    Item ``i`` is line ``i`` (blank lines not counted) as a `MultiSubjectSample`: images resized
    to ``target_size`` / ``ref_size`` (bicubic; None keeps each file's size), masks read at the
    pixel centres of the resized frames, pairs scaled from the files' pixel frames to the resized
    ones. ``meta`` holds the line's ``meta``, ``subjects`` (when given) and ``line``.

    Bad data raises `BadSample`: ``"unreadable_image"`` (missing or undecodable image or mask, an
    image of more than `MAX_IMAGE_PIXELS` pixels or of an unsupported mode; see `to_rgb` for how
    16-bit, palette, CMYK and alpha images are converted),
    ``"missing_mask"``, ``"empty_mask"``, ``"missing_coordinates"`` (correspondence file) and
    ``"malformed_coordinates"`` (a malformed file, or a pair outside its image).

    Args:
        manifest: the manifest's path, or entries from `read_manifest`.
        target_size: target side or ``(H, W)``; None keeps the files' sizes.
        ref_size: reference side or ``(h, w)``; None keeps the files' sizes.

    Examples:
        >>> import tempfile
        >>> from mosaic_kit.data.fixtures import make_manifest_fixture
        >>> data = ManifestDataset(make_manifest_fixture(Path(tempfile.mkdtemp())), target_size=256, ref_size=64)
        >>> sample = data[1]
        >>> sample.sample_id, sample.caption, tuple(sample.target.shape), tuple(sample.references[0].shape)
        ('cat', 'a photo of cat', (3, 256, 256), (3, 64, 64))
        >>> sample.pairs[0][0].tolist()  # (32, 32, 64, 64) in the 64- and 128-pixel files, scaled
        [32.0, 32.0, 128.0, 128.0]
    """

    def __init__(
        self,
        manifest: str | Path | Sequence[ManifestEntry],
        target_size: int | tuple[int, int] | None = None,
        ref_size: int | tuple[int, int] | None = None,
    ) -> None:
        if isinstance(manifest, (str, Path)):
            self.entries = read_manifest(manifest)
        elif isinstance(manifest, Sequence) and all(isinstance(e, ManifestEntry) for e in manifest):
            self.entries = list(manifest)
        else:
            raise ValueError(f"Expected `manifest` to be a path or a list of ManifestEntry, but got {type(manifest).__name__}.")
        self.target_size = None if target_size is None else as_size("target_size", target_size)
        self.ref_size = None if ref_size is None else as_size("ref_size", ref_size)

    def __len__(self) -> int:
        return len(self.entries)

    def _pairs(self, entry: ManifestEntry) -> list[torch.Tensor]:
        if entry.correspondences is None:
            return [torch.zeros(0, 4) for _ in entry.references]
        if isinstance(entry.correspondences, Path):
            try:
                return load_pairs_file(entry.correspondences, entry.num_refs)
            except FileNotFoundError as error:
                raise BadSample("missing_coordinates", entry.id, str(error)) from None
            except ValueError as error:
                raise BadSample("malformed_coordinates", entry.id, str(error)) from None
        return [p.clone() for p in entry.correspondences]

    def __getitem__(self, index: int) -> MultiSubjectSample:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(self.entries):
            raise IndexError(f"Expected `index` in [0, {len(self.entries)}), but got {index!r}.")
        entry = self.entries[index]
        target, target_frame = _open_image(entry.id, entry.target, self.target_size)
        tgt_h, tgt_w = target.shape[1:]
        references, reference_masks, all_pairs = [], [], []
        pairs_per_ref = self._pairs(entry)
        target_masks = [_open_mask(entry.id, m, (tgt_h, tgt_w)) for m in entry.target_masks]
        for k, (ref_path, ref_mask_path, pairs) in enumerate(zip(entry.references, entry.reference_masks, pairs_per_ref)):
            reference, ref_frame = _open_image(entry.id, ref_path, self.ref_size)
            ref_h, ref_w = reference.shape[1:]
            frames = torch.tensor([ref_frame[1], ref_frame[0], target_frame[1], target_frame[0]], dtype=torch.float32)
            outside = (pairs >= frames).any(1)
            if bool(outside.any()):
                bad = pairs[outside][0].tolist()
                raise BadSample(
                    "malformed_coordinates", entry.id,
                    f"reference {k}: pair {bad} lies outside the reference ({ref_frame[1]}×{ref_frame[0]}) "
                    f"or the target ({target_frame[1]}×{target_frame[0]}) image (W×H)",
                )
            all_pairs.append(scale_pairs(
                pairs, (ref_w / ref_frame[1], ref_h / ref_frame[0]), (tgt_w / target_frame[1], tgt_h / target_frame[0])
            ))
            references.append(reference)
            reference_masks.append(_open_mask(entry.id, ref_mask_path, (ref_h, ref_w)))
        meta = dict(entry.meta)
        meta["line"] = entry.line
        if entry.subjects is not None:
            meta["subjects"] = list(entry.subjects)
        return MultiSubjectSample(
            sample_id=entry.id,
            target=target,
            references=references,
            caption=entry.caption,
            pairs=all_pairs,
            target_masks=target_masks,
            reference_masks=reference_masks,
            meta=meta,
        )
