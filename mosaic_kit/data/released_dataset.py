"""The released SemAlign-MS-Subjects200K data as a training dataset, coordinates included.

Beside the parquet shards and ``mask/<uid>.png`` (see `mosaic_kit.data.released`), the released
data holds, per sample, dense nearest-neighbour coordinates from two feature extractors:
``coord/dift/<uid>_ref0.pt`` and ``coord/geoaware/<uid>_ref0.pt``.

**Coordinate layout** (``layout="hw2"``, the default): a tensor of shape ``(64, 64, 2)`` with an
integer dtype (a float tensor is accepted when every value is a whole number), where
``coords[ty, tx] = (ry, rx)``: for the target cell at row ``ty`` and column ``tx`` of a 64×64 grid
over the 512×512 target panel, the row and column of its nearest cell on a 64×64 grid over the
reference panel. Every value lies in ``[0, 64)``. ``layout="2hw"`` reads ``(2, 64, 64)`` tensors
(``coords[:, ty, tx] = (ry, rx)``) instead. Files are read with ``torch.load(weights_only=True)``;
anything else raises a ValueError naming the file and what is wrong (`check_released_coords`).

**Which pairs are kept** (`released_pixel_pairs`): a target cell gives a pair when every
extractor names the same reference cell and the target cell is inside the subject mask. The mask
(``mask/<uid>.png``, any size; non-zero is inside) is put on the 64×64 grid by reading it at each
cell's centre (`mask_to_grid`), the rule `mosaic_kit.correspondence.filter_by_mask` uses. A kept
pair becomes the two cell centres in the 512-pixel panel frames,
``((rx + 0.5) * 8, (ry + 0.5) * 8, (tx + 0.5) * 8, (ty + 0.5) * 8)``, then scaled to the
configured target and reference sizes. Pairs come in row-major order of the target cells, so the
collate's `Correspondences.from_pixel_pairs` keeps the first pair of each reference token, as the
released pipeline does, at whatever token grid the batch uses.
"""

from __future__ import annotations

import bisect
import os
import pickle
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import UnidentifiedImageError

from ..utils.checks import check_int, check_option
from ._images import as_size, load_mask, load_rgb, resize_mask, scale_pairs
from .bad import BadSample
from .released import (
    ReleasedRow,
    _description,
    _open_shard,
    _read_errors,
    decode_released_row,
    released_shards,
)
from .sample import MultiSubjectSample

__all__ = [
    "COORD_LAYOUTS",
    "PANEL_SIZE",
    "RELEASED_COORD_METHODS",
    "ReleasedDataset",
    "check_released_coords",
    "load_released_coords",
    "mask_to_grid",
    "released_coord_path",
    "released_pixel_pairs",
]

RELEASED_COORD_METHODS = ("dift", "geoaware")
"""The coordinate folders of the released data, under ``coord/``."""
COORD_LAYOUTS = ("hw2", "2hw")
"""Tensor layouts of a coordinate file: ``(grid, grid, 2)`` or ``(2, grid, grid)``."""
PANEL_SIZE = 512
"""Side of the released target and reference panels, in pixels."""

_LOAD_ERRORS = (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError, AttributeError, TypeError)


def released_coord_path(root: str | Path, method: str, uid: str, ref: int = 0) -> Path:
    """``<root>/coord/<method>/<uid>_ref<ref>.pt``.

    Args:
        root: the data folder.
        method: the extractor folder (``"dift"``, ``"geoaware"``).
        uid: the sample id (`released_uid`).
        ref: the reference index (the released data has one, 0).

    Returns:
        The path (it may not exist).

    Examples:
        >>> released_coord_path("data", "dift", "ab12").as_posix()
        'data/coord/dift/ab12_ref0.pt'
    """
    if not isinstance(method, str) or not method:
        raise ValueError(f"Expected `method` to be a folder name such as 'dift', but got {method!r}.")
    ref = check_int("ref", ref, minimum=0)
    return Path(root) / "coord" / method / f"{uid}_ref{ref}.pt"


def check_released_coords(coords: object, grid: int = 64, layout: str = "hw2", name: str = "coords") -> torch.Tensor:
    """Validates a coordinate tensor and returns it as ``(grid, grid, 2)`` long ``(ry, rx)``.

    Args:
        coords: the tensor, ``(grid, grid, 2)`` for ``layout="hw2"`` or ``(2, grid, grid)`` for
            ``"2hw"``; integer dtype, or float holding whole numbers; values in ``[0, grid)``.
        grid: side of the target and reference cell grids.
        layout: one of `COORD_LAYOUTS`.
        name: how to call the tensor in error messages (e.g. its file).

    Returns:
        ``(grid, grid, 2)`` long, ``[ty, tx] = (ry, rx)``.

    Raises:
        ValueError: naming ``name``, the expected and the received shape, dtype or values.

    Examples:
        >>> coords = torch.zeros(4, 4, 2, dtype=torch.int16)
        >>> check_released_coords(coords, grid=4).dtype
        torch.int64
        >>> check_released_coords(coords + 4, grid=4)
        Traceback (most recent call last):
        ...
        ValueError: Expected `coords` values in [0, 4) (cells of the 4×4 reference grid), but got values [4, 4, 4].
    """
    grid = check_int("grid", grid, minimum=1)
    check_option("layout", layout, COORD_LAYOUTS)
    expected = (grid, grid, 2) if layout == "hw2" else (2, grid, grid)
    if not isinstance(coords, torch.Tensor):
        raise ValueError(f"Expected `{name}` to be a tensor of shape {expected}, but got {type(coords).__name__}.")
    if tuple(coords.shape) != expected:
        raise ValueError(
            f"Expected `{name}` of shape {expected} (layout {layout!r}), but got {tuple(coords.shape)}."
        )
    if coords.dtype == torch.bool or coords.is_complex():
        raise ValueError(f"Expected `{name}` to have an integer dtype, but got {coords.dtype}.")
    if coords.is_floating_point() and not bool((torch.isfinite(coords) & (coords == coords.round())).all()):
        bad = coords[~torch.isfinite(coords) | (coords != coords.round())].flatten()[:3].tolist()
        raise ValueError(f"Expected `{name}` to hold whole cell indices, but got values {bad}.")
    coords = coords.long()
    if layout == "2hw":
        coords = coords.permute(1, 2, 0).contiguous()
    outside = (coords < 0) | (coords >= grid)
    if bool(outside.any()):
        bad = coords[outside].flatten()[:3].tolist()
        raise ValueError(
            f"Expected `{name}` values in [0, {grid}) (cells of the {grid}×{grid} reference grid), but got values {bad}."
        )
    return coords


def load_released_coords(path: str | Path, grid: int = 64, layout: str = "hw2") -> torch.Tensor:
    """Reads one coordinate file (``torch.load(weights_only=True)``) and validates it.

    Args:
        path: the ``.pt`` file.
        grid: side of the cell grids.
        layout: one of `COORD_LAYOUTS`.

    Returns:
        ``(grid, grid, 2)`` long, ``[ty, tx] = (ry, rx)``.

    Raises:
        FileNotFoundError: when the file does not exist.
        ValueError: naming the file, when it cannot be loaded or is malformed.

    Examples:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "x_ref0.pt"
        >>> torch.save(torch.zeros(64, 64, 2, dtype=torch.int32), path)
        >>> load_released_coords(path).shape
        torch.Size([64, 64, 2])
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no coordinate file {path}")
    try:
        coords = torch.load(path, map_location="cpu", weights_only=True)
    except _LOAD_ERRORS as error:
        raise ValueError(f"Expected `{path}` to be a torch file of coordinates, but loading failed: {error}") from None
    return check_released_coords(coords, grid=grid, layout=layout, name=str(path))


def mask_to_grid(mask: torch.Tensor, grid: int | tuple[int, int]) -> torch.Tensor:
    """A mask on a coarser (or finer) cell grid: each cell reads the mask pixel at its centre.

    Args:
        mask: ``(H, W)`` bool (or numeric, non-zero inside) mask of any size.
        grid: cells per side, or ``(rows, cols)``.

    Returns:
        ``(rows, cols)`` bool.

    Examples:
        >>> mask = torch.zeros(512, 512, dtype=torch.bool)
        >>> mask[:, :261] = True  # cell column c reads pixel column 8 * c + 4: 252, 260, 268 for c = 31, 32, 33
        >>> mask_to_grid(mask, 64)[0, 31:34].tolist()
        [True, True, False]
    """
    if not isinstance(mask, torch.Tensor) or mask.ndim != 2:
        raise ValueError(f"Expected `mask` of shape (H, W), but got {getattr(mask, 'shape', type(mask).__name__)}.")
    return resize_mask(mask != 0, as_size("grid", grid))


def released_pixel_pairs(
    coords: Sequence[torch.Tensor], target_mask_grid: torch.Tensor | None = None, panel_size: int = PANEL_SIZE
) -> torch.Tensor:
    """The kept pairs of one sample, at cell centres in the panels' pixel frames.

    A target cell ``(ty, tx)`` gives a pair when all coordinate tensors name the same reference
    cell and ``target_mask_grid[ty, tx]`` is True.

    Args:
        coords: one ``(grid, grid, 2)`` long tensor ``[ty, tx] = (ry, rx)`` per extractor (see
            `check_released_coords`), at least one.
        target_mask_grid: ``(grid, grid)`` bool subject mask on the cell grid (`mask_to_grid`), or
            None to keep every agreeing cell.
        panel_size: side of both panels in pixels (512 in the released data).

    Returns:
        ``(P, 4)`` float32 ``(ref_x, ref_y, tgt_x, tgt_y)``, row-major over the target cells.

    Examples:
        >>> flip = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(3, -1, -1), indexing="ij"), -1)
        >>> other = flip.clone(); other[0, 0] = torch.tensor([2, 2])  # the extractors disagree on cell (0, 0)
        >>> mask = torch.ones(4, 4, dtype=torch.bool); mask[1:] = False
        >>> released_pixel_pairs([flip, other], mask, panel_size=64)
        tensor([[40.,  8., 24.,  8.],
                [24.,  8., 40.,  8.],
                [ 8.,  8., 56.,  8.]])
    """
    if isinstance(coords, torch.Tensor) or not coords:
        raise ValueError("Expected `coords` to be a non-empty list of (grid, grid, 2) tensors, one per extractor.")
    grid = coords[0].shape[0]
    checked = [check_released_coords(c, grid=grid, name=f"coords[{i}]") for i, c in enumerate(coords)]
    keep = torch.ones(grid, grid, dtype=torch.bool)
    for other in checked[1:]:
        keep &= (other == checked[0]).all(-1)
    if target_mask_grid is not None:
        if not isinstance(target_mask_grid, torch.Tensor) or tuple(target_mask_grid.shape) != (grid, grid):
            raise ValueError(
                f"Expected `target_mask_grid` of shape ({grid}, {grid}), "
                f"but got {getattr(target_mask_grid, 'shape', type(target_mask_grid).__name__)}."
            )
        keep &= target_mask_grid.bool()
    panel_size = check_int("panel_size", panel_size, minimum=1)
    cell = panel_size / grid
    target_cells = keep.nonzero()  # (P, 2) (ty, tx), row-major
    reference_cells = checked[0][keep]  # (P, 2) (ry, rx)
    pairs = torch.cat((reference_cells.flip(-1), target_cells.flip(-1)), dim=1).to(torch.float64)
    return ((pairs + 0.5) * cell).to(torch.float32)


class ReleasedDataset(torch.utils.data.Dataset):
    """Map-style dataset over the rows of the released layout, one reference per sample.

    Item ``i`` is the ``i``-th row over the shards sorted by path. It is decoded into a
    `MultiSubjectSample` with ``K = 1``: the target panel resized to ``target_size``, the reference
    panel resized to ``ref_size``, the caption ``description_0``, the pairs of
    `released_pixel_pairs` scaled to those sizes, and the target mask resized to ``target_size``
    (each pixel reads the mask at its centre). ``meta`` holds ``uid``, ``subjects`` (``[item]``),
    ``reference_caption``, ``shard`` and ``row``.

    Bad rows raise `BadSample`: ``"malformed_row"`` (description, or a row group of a shard that
    cannot be read), ``"unreadable_image"`` (the image or the mask cannot be decoded, is larger
    than `MAX_IMAGE_PIXELS` or of an unsupported mode), ``"missing_mask"``, ``"empty_mask"``,
    ``"missing_coordinates"`` and ``"malformed_coordinates"``. The sample id is the uid, or
    ``"<shard file>:<row>"`` when the row cannot be decoded.

    Random access reads (and caches) one parquet row group at a time, so reading in shard order is
    much faster than a random order over large row groups.

    A shard whose footer cannot be read (truncated, or not parquet) is refused when the dataset is
    built, with a `ValueError` naming it; a row group that cannot be read later makes its rows
    ``"malformed_row"`` bad samples.

    Args:
        root: the data folder (shards anywhere below it, ``mask/`` and ``coord/`` at its top).
        target_size: target side, or ``(H, W)``.
        ref_size: reference side, or ``(h, w)``.
        methods: the coordinate folders that must agree (default: DIFT and GeoAware).
        grid: side of the coordinate grids.
        layout: tensor layout of the coordinate files (`COORD_LAYOUTS`).

    Examples:
        >>> import tempfile
        >>> from mosaic_kit.data.fixtures import make_released_fixture
        >>> root = Path(tempfile.mkdtemp())
        >>> uids = make_released_fixture(root, [("dog", "a dog on the grass")])
        >>> data = ReleasedDataset(root, target_size=256, ref_size=128)
        >>> sample = data[0]
        >>> sample.sample_id == uids[0], sample.caption, tuple(sample.target.shape), tuple(sample.references[0].shape)
        (True, 'a dog on the grass', (3, 256, 256), (3, 128, 128))
        >>> sample.pairs[0].shape[1], bool((sample.pairs[0][:, 2:] < 256).all()), sample.meta["subjects"]
        (4, True, ['dog'])
    """

    def __init__(
        self,
        root: str | Path,
        target_size: int | tuple[int, int] = 512,
        ref_size: int | tuple[int, int] = 512,
        methods: Sequence[str] = RELEASED_COORD_METHODS,
        grid: int = 64,
        layout: str = "hw2",
    ) -> None:
        self.root = Path(root)
        self.target_size = as_size("target_size", target_size)
        self.ref_size = as_size("ref_size", ref_size)
        if isinstance(methods, str) or not methods or not all(isinstance(m, str) and m for m in methods):
            raise ValueError(f"Expected `methods` to be a non-empty list of folder names, but got {methods!r}.")
        self.methods = tuple(methods)
        self.grid = check_int("grid", grid, minimum=1)
        check_option("layout", layout, COORD_LAYOUTS)
        self.layout = layout
        self.shards = released_shards(self.root)
        self._group_starts: list[list[int]] = []
        self._starts: list[int] = []
        total = 0
        for shard in self.shards:
            metadata = _open_shard(shard).metadata  # a truncated shard: ValueError naming it
            starts, offset = [], 0
            for group in range(metadata.num_row_groups):
                starts.append(offset)
                offset += metadata.row_group(group).num_rows
            self._starts.append(total)
            self._group_starts.append(starts)
            total += offset
        self._length = total
        self._files: dict[int, object] = {}
        self._cache: tuple[tuple[int, int], object] | None = None
        self._pid = os.getpid()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_files"], state["_cache"] = {}, None  # open files stay in their process
        return state

    def __len__(self) -> int:
        return self._length

    def locate(self, index: int) -> tuple[Path, int]:
        """The shard and the row within it of item ``index``.

        Args:
            index: in ``[0, len(self))``.

        Returns:
            ``(shard path, row)``.

        Examples:
            >>> import tempfile
            >>> from mosaic_kit.data.fixtures import make_released_fixture
            >>> root = Path(tempfile.mkdtemp())
            >>> _ = make_released_fixture(root, [("dog", "a dog"), ("cat", "a cat")], rows_per_shard=1)
            >>> shard, row = ReleasedDataset(root).locate(1)
            >>> shard.name, row
            ('train-00001.parquet', 0)
        """
        index = check_int("index", index, minimum=0)
        if index >= self._length:
            raise IndexError(f"Expected `index` in [0, {self._length}), but got {index}.")
        shard = bisect.bisect_right(self._starts, index) - 1
        return self.shards[shard], index - self._starts[shard]

    def read_row(self, index: int) -> ReleasedRow:
        """The undecoded row of item ``index`` (its row group is cached).

        Args:
            index: in ``[0, len(self))``.

        Returns:
            The `ReleasedRow`.
        """
        path, row = self.locate(index)
        shard = bisect.bisect_right(self._starts, index) - 1
        starts = self._group_starts[shard]
        group = bisect.bisect_right(starts, row) - 1
        if self._pid != os.getpid():  # a forked worker: open its own files
            self._files, self._cache, self._pid = {}, None, os.getpid()
        if self._cache is None or self._cache[0] != (shard, group):
            if shard not in self._files:
                self._files[shard] = _open_shard(path)
            try:
                table = self._files[shard].read_row_group(group, columns=["image", "description"])
            except _read_errors() as error:  # a corrupt row group: its rows are bad
                raise BadSample(
                    "malformed_row", f"{path.name}:{row}",
                    f"{path} row group {group}: cannot be read (corrupt?): {type(error).__name__}: {error}",
                ) from None
            self._cache = ((shard, group), table)
        table = self._cache[1]
        offset = row - starts[group]
        return ReleasedRow(path, row, table.column("image")[offset].as_py(), table.column("description")[offset].as_py())

    def _coords(self, uid: str) -> list[torch.Tensor]:
        coords = []
        for method in self.methods:
            path = released_coord_path(self.root, method, uid)
            if not path.is_file():
                raise BadSample("missing_coordinates", uid, f"no coordinate file {path}")
            try:
                coords.append(load_released_coords(path, grid=self.grid, layout=self.layout))
            except ValueError as error:
                raise BadSample("malformed_coordinates", uid, str(error)) from None
        return coords

    def __getitem__(self, index: int) -> MultiSubjectSample:
        row = self.read_row(index)
        row_id = f"{row.shard.name}:{row.row}"
        try:
            _description(row.description)
        except (ValueError, TypeError) as error:
            raise BadSample("malformed_row", row_id, f"{row.shard} row {row.row}: {error}") from None
        try:
            decoded = decode_released_row(row, self.root)
        except ValueError as error:
            raise BadSample("unreadable_image", row_id, str(error)) from None
        uid = decoded.uid
        if not decoded.mask_path.is_file():
            raise BadSample("missing_mask", uid, f"no mask {decoded.mask_path}")
        try:
            mask = load_mask(decoded.mask_path)
        except (OSError, UnidentifiedImageError, ValueError) as error:
            raise BadSample("unreadable_image", uid, f"mask {decoded.mask_path}: {error}") from None
        if not bool(mask.any()):
            raise BadSample("empty_mask", uid, f"mask {decoded.mask_path} has no pixel inside")
        pairs = released_pixel_pairs(self._coords(uid), mask_to_grid(mask, self.grid), panel_size=PANEL_SIZE)
        (tgt_h, tgt_w), (ref_h, ref_w) = self.target_size, self.ref_size
        pairs = scale_pairs(pairs, (ref_w / PANEL_SIZE, ref_h / PANEL_SIZE), (tgt_w / PANEL_SIZE, tgt_h / PANEL_SIZE))
        return MultiSubjectSample(
            sample_id=uid,
            target=load_rgb(decoded.target, self.target_size),
            references=[load_rgb(decoded.reference, self.ref_size)],
            caption=decoded.target_caption,
            pairs=[pairs],
            target_masks=[resize_mask(mask, self.target_size)],
            reference_masks=[None],
            meta={
                "uid": uid,
                "subjects": [decoded.item],
                "reference_caption": decoded.reference_caption,
                "shard": str(row.shard),
                "row": row.row,
            },
        )
