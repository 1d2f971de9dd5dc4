"""Multi-subject samples composed from single-subject ones.

The released data is mostly single-subject, so MDL (which compares references) never sees two.
`compose_samples` places the targets of K samples on one canvas and concatenates their
references, carrying correspondences and masks through the placement exactly; `ComposedDataset`
does it for every item of a dataset of single-subject samples, seeded per item.

**Placement.** Each part's target is first cropped to its subject (the bounding box of its target
masks, widened by ``margin`` times the box size on each side and clipped to the image), then
resized to ``(new_h, new_w)`` and pasted at the integer offset ``(ox, oy)``. The map from the
part's target frame to the canvas is the per-axis affine map

    x' = (x - x0) * new_w / crop_w + ox,    y' = (y - y0) * new_h / crop_h + oy

(continuous pixel coordinates, pixel centres at ``+0.5``), recorded per part in
``meta["layout"]``. The crop's long side becomes a fraction of the canvas's short side drawn from
``scale_range``; the position is uniform over the canvas. Boxes are redrawn until every pair of
boxes overlaps by at most ``max_overlap`` (intersection over the smaller box; 0: no overlap);
after ``max_tries`` draws per part the whole layout is redrawn with smaller scales, and after four
rounds the parts are placed on a regular grid (never overlapping).

**What is pasted.** With ``paste="mask"`` only the subject's pixels are pasted (the union of the
part's target masks, resized by reading each canvas pixel's centre); a part without masks is
pasted whole. With ``paste="box"`` the whole crop is pasted. Parts are pasted in order, so a later
part hides an earlier one where they meet. The canvas elsewhere is ``background``.

**Masks.** Reference ``k`` of part ``i`` gets as target mask its own mask mapped the same way (or,
without one, the part's pasted region), keeping only the pixels where part ``i`` is visible.
Reference images and reference masks are unchanged.

**Correspondences.** Reference pixels are unchanged; each target point is mapped by the part's
affine map. A pair is kept when the mapped point lands on a canvas pixel that shows its part:
pairs outside the crop, on the part's unpasted background, or hidden by a later part are dropped.
Then eq. 2 is enforced on the canvas's token grid (``vae_scale_factor * patch_size`` pixels per
token) with `mosaic_kit.correspondence.enforce_disjoint` (``disjoint="drop"`` removes every pair on
a target token claimed by two references; ``"first"`` lets the earlier reference keep it;
``"strict"`` raises). ``meta["pair_index"]`` holds, per reference, the indices of the kept pairs
among the part's original pairs, and ``meta["dropped"]`` the counts per reason.

**Caption.** Each part contributes its subject names (``meta["subjects"]``, as the readers set
them), or its caption when it has none. A name that does not start with a determiner or a number
gets ``"a "`` (``"an "`` before a vowel letter); the phrases are joined as ``"A, B and C"`` and put
into ``caption_template`` (default ``"{subjects}"``): ``"a dog, a cat and a teapot"``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Any

import torch

from ..correspondence import Correspondences, TokenGrid, enforce_disjoint
from ..utils.checks import check_int, check_option
from ._images import as_size, resize_image, resize_mask
from .sample import MultiSubjectSample

__all__ = [
    "COMPOSE_DISJOINT_POLICIES",
    "PASTE_MODES",
    "ComposedDataset",
    "compose_caption",
    "compose_samples",
    "join_subjects",
]

PASTE_MODES = ("mask", "box")
"""What `compose_samples` pastes: the subject's mask, or the whole cropped box."""
COMPOSE_DISJOINT_POLICIES = ("drop", "first", "strict")
"""The eq. 2 policies `compose_samples` accepts (see `enforce_disjoint`)."""

_DETERMINERS = {
    "a", "an", "the", "some", "this", "that", "these", "those", "my", "your", "his", "her", "its", "our", "their",
    "one", "two", "three", "four", "five", "six", "several", "many",
}


def _seed_for(seed: int, index: int) -> int:
    """A 63-bit seed for item ``index`` of a run seeded with ``seed`` (stable across processes)."""
    digest = hashlib.sha256(f"{int(seed)}:{int(index)}".encode()).hexdigest()
    return int(digest[:15], 16)


def _with_article(name: str) -> str:
    name = name.strip()
    if not name:
        return name
    first = name.split(" ", 1)[0].lower()
    if first in _DETERMINERS or first[0].isdigit():
        return name
    return ("an " if first[0] in "aeiou" else "a ") + name


def join_subjects(names: Sequence[str]) -> str:
    """``"A"``, ``"A and B"``, ``"A, B and C"``, each name with an article where it has none.

    Args:
        names: subject names or phrases.

    Returns:
        The joined phrase.

    Examples:
        >>> join_subjects(["dog", "cat", "elephant"])
        'a dog, a cat and an elephant'
        >>> join_subjects(["the red teapot", "2 cups"])
        'the red teapot and 2 cups'
    """
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"Expected `names` to be a list of strings, but got {names!r}.")
    phrases = [_with_article(n) for n in names if n.strip()]
    if len(phrases) <= 1:
        return "".join(phrases)
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def compose_caption(parts: Sequence[MultiSubjectSample], template: str = "{subjects}") -> str:
    """The caption of a composite of ``parts`` (rule in the module docstring).

    Args:
        parts: the composed samples, in placement order.
        template: a format string with ``{subjects}``.

    Returns:
        The caption.

    Examples:
        >>> image = torch.zeros(3, 16, 16)
        >>> parts = [MultiSubjectSample(name, image, [image], f"photo of {name}", [torch.zeros(0, 4)],
        ...                             meta={"subjects": [name]}) for name in ("dog", "owl")]
        >>> compose_caption(parts, "a photo of {subjects} in a garden")
        'a photo of a dog and an owl in a garden'
    """
    if not isinstance(template, str) or "{subjects}" not in template:
        raise ValueError(f"Expected `template` to be a string holding '{{subjects}}', but got {template!r}.")
    return template.format(subjects=join_subjects([p for part in parts for p in _phrases(part)]))


def _names(part: MultiSubjectSample) -> list[str] | None:
    names = part.meta.get("subjects") if isinstance(part.meta, dict) else None
    if isinstance(names, (list, tuple)) and len(names) == part.num_refs and all(isinstance(n, str) and n for n in names):
        return list(names)
    return None


def _phrases(part: MultiSubjectSample) -> list[str]:
    names = _names(part)
    return names if names is not None else [part.caption]


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """Intersection over the smaller box's area."""
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    if width <= 0 or height <= 0:
        return 0.0
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return width * height / smaller


def _layout(
    tiles: list[tuple[int, int]],
    canvas: tuple[int, int],
    generator: torch.Generator,
    scale_range: tuple[float, float],
    max_overlap: float,
    max_tries: int,
) -> tuple[list[tuple[int, int, int, int]], str]:
    """Boxes ``(x0, y0, x1, y1)`` on the canvas for tiles of ``(h, w)``, and how they were found."""
    height, width = canvas
    short = min(height, width)
    low, high = scale_range
    shrink = 1.0
    for _ in range(4):
        boxes: list[tuple[int, int, int, int]] = []
        for tile_h, tile_w in tiles:
            for _ in range(max_tries):
                u_scale, u_x, u_y = torch.rand(3, generator=generator, dtype=torch.float64).tolist()
                fraction = (low + (high - low) * u_scale) * shrink
                scale = fraction * short / max(tile_h, tile_w)
                new_w = min(width, max(1, round(tile_w * scale)))
                new_h = min(height, max(1, round(tile_h * scale)))
                x0 = min(int(u_x * (width - new_w + 1)), width - new_w)
                y0 = min(int(u_y * (height - new_h + 1)), height - new_h)
                box = (x0, y0, x0 + new_w, y0 + new_h)
                if all(_overlap(box, other) <= max_overlap for other in boxes):
                    boxes.append(box)
                    break
            else:
                break
        if len(boxes) == len(tiles):
            return boxes, "random"
        shrink *= 0.75
    cols = math.ceil(math.sqrt(len(tiles)))
    rows = math.ceil(len(tiles) / cols)
    cell_w, cell_h = width // cols, height // rows
    boxes = []
    for index, (tile_h, tile_w) in enumerate(tiles):
        scale = min(cell_w / tile_w, cell_h / tile_h)
        new_w, new_h = max(1, min(cell_w, math.floor(tile_w * scale))), max(1, min(cell_h, math.floor(tile_h * scale)))
        x0 = (index % cols) * cell_w + (cell_w - new_w) // 2
        y0 = (index // cols) * cell_h + (cell_h - new_h) // 2
        boxes.append((x0, y0, x0 + new_w, y0 + new_h))
    return boxes, "grid"


def _subject_crop(part: MultiSubjectSample, union: torch.Tensor | None, margin: float, crop: bool) -> tuple[int, int, int, int]:
    height, width = part.target.shape[1:]
    if not crop or union is None or not bool(union.any()):
        return 0, 0, width, height
    rows = union.any(1).nonzero().flatten()
    cols = union.any(0).nonzero().flatten()
    x0, x1, y0, y1 = int(cols[0]), int(cols[-1]) + 1, int(rows[0]), int(rows[-1]) + 1
    pad_x, pad_y = math.ceil(margin * (x1 - x0)), math.ceil(margin * (y1 - y0))
    return max(0, x0 - pad_x), max(0, y0 - pad_y), min(width, x1 + pad_x), min(height, y1 + pad_y)


def _check_parts(samples: Sequence[MultiSubjectSample]) -> None:
    if isinstance(samples, MultiSubjectSample) or not isinstance(samples, Sequence) or not samples:
        raise ValueError("Expected `samples` to be a non-empty list of MultiSubjectSample.")
    for i, part in enumerate(samples):
        if not isinstance(part, MultiSubjectSample):
            raise ValueError(f"Expected `samples[{i}]` to be a MultiSubjectSample, but got {type(part).__name__}.")
        frame = tuple(part.target.shape[1:])
        for k, mask in enumerate(part.target_masks):
            if mask is not None and tuple(mask.shape) != frame:
                raise ValueError(
                    f"Expected `samples[{i}].target_masks[{k}]` of the target's shape {frame}, but got {tuple(mask.shape)}."
                )


def compose_samples(
    samples: Sequence[MultiSubjectSample],
    generator: torch.Generator,
    canvas_size: int | tuple[int, int] = 512,
    *,
    scale_range: tuple[float, float] = (0.35, 0.6),
    max_overlap: float = 0.0,
    paste: str = "mask",
    margin: float = 0.05,
    crop_to_subject: bool = True,
    background: float | Sequence[float] = 1.0,
    vae_scale_factor: int = 8,
    patch_size: int = 2,
    disjoint: str = "drop",
    caption_template: str = "{subjects}",
    max_tries: int = 50,
    sample_id: str | None = None,
) -> MultiSubjectSample:
    """Places the targets of ``samples`` on one canvas: one sample with all their references.

    The placement, the masks, the correspondences, eq. 2 and the caption follow the rules of the
    module docstring. The same ``generator`` state gives the same composite.

    Args:
        samples: the parts (usually single-subject), in placement order; later parts are on top.
        generator: the ``torch.Generator`` drawing the layout (it is advanced).
        canvas_size: canvas side, or ``(H, W)``; multiples of ``vae_scale_factor * patch_size``.
        scale_range: ``(low, high)`` fractions of the canvas's short side for a crop's long side,
            ``0 < low <= high <= 1``.
        max_overlap: largest allowed overlap of two boxes (intersection over the smaller box), in
            ``[0, 1]``.
        paste: one of `PASTE_MODES`.
        margin: widening of each subject crop, as a fraction of its box size per side, ``>= 0``.
        crop_to_subject: crop each target to its subject first (else the whole target is placed).
        background: canvas colour, a grey level or ``(r, g, b)`` in ``[0, 1]``.
        vae_scale_factor: pixels per latent cell, for the token grid of eq. 2.
        patch_size: latent cells per token side.
        disjoint: one of `COMPOSE_DISJOINT_POLICIES`.
        caption_template: a format string with ``{subjects}``.
        max_tries: box draws per part before a layout is redrawn smaller.
        sample_id: the composite's id (default: the parts' ids joined with ``+``).

    Returns:
        The composite: ``target`` ``(3, H, W)``, the parts' references in order, one target mask
        per reference, and ``meta`` with ``parts`` (ids), ``subjects``, ``layout`` (per part:
        ``crop``, ``box``, ``scale`` ``(sx, sy)``, ``offset`` ``(ox, oy)``), ``layout_mode``
        (``"random"`` or ``"grid"``), ``pair_index`` and ``dropped``.

    Examples:
        >>> image = torch.rand(3, 64, 64)
        >>> mask = torch.zeros(64, 64, dtype=torch.bool); mask[16:48, 16:48] = True
        >>> pairs = torch.tensor([[8.5, 8.5, 20.5, 30.5], [4.5, 4.5, 2.5, 2.5]])  # the second is off the subject
        >>> parts = [MultiSubjectSample(name, image, [image[:, :32, :32]], name, [pairs], [mask],
        ...                             meta={"subjects": [name]}) for name in ("dog", "cat")]
        >>> out = compose_samples(parts, torch.Generator().manual_seed(0), 128)
        >>> out.caption, out.num_refs, tuple(out.target.shape), out.meta["layout_mode"]
        ('a dog and a cat', 2, (3, 128, 128), 'random')
        >>> [index.tolist() for index in out.meta["pair_index"]]
        [[0], [0]]
        >>> sx, sy = out.meta["layout"][0]["scale"]; ox, oy = out.meta["layout"][0]["offset"]
        >>> x0, y0 = out.meta["layout"][0]["crop"][:2]
        >>> torch.allclose(out.pairs[0][0, 2:], torch.tensor([(20.5 - x0) * sx + ox, (30.5 - y0) * sy + oy]))
        True
    """
    _check_parts(samples)
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"Expected `generator` to be a torch.Generator, but got {type(generator).__name__}.")
    height, width = as_size("canvas_size", canvas_size)
    grid = TokenGrid(height, width, vae_scale_factor, patch_size)
    if (not isinstance(scale_range, (tuple, list)) or len(scale_range) != 2
            or not 0 < float(scale_range[0]) <= float(scale_range[1]) <= 1):
        raise ValueError(f"Expected `scale_range` = (low, high) with 0 < low <= high <= 1, but got {scale_range!r}.")
    if not isinstance(max_overlap, (int, float)) or not 0 <= max_overlap <= 1:
        raise ValueError(f"Expected `max_overlap` in [0, 1], but got {max_overlap!r}.")
    if not isinstance(margin, (int, float)) or margin < 0:
        raise ValueError(f"Expected `margin` >= 0, but got {margin!r}.")
    check_option("paste", paste, PASTE_MODES)
    check_option("disjoint", disjoint, COMPOSE_DISJOINT_POLICIES)
    max_tries = check_int("max_tries", max_tries, minimum=1)
    colour = torch.as_tensor(background, dtype=torch.float32).flatten()
    if colour.numel() not in (1, 3) or not bool(((colour >= 0) & (colour <= 1)).all()):
        raise ValueError(f"Expected `background` as a grey level or (r, g, b) in [0, 1], but got {background!r}.")
    caption = compose_caption(samples, caption_template)

    unions, crops, tiles = [], [], []
    for part in samples:
        present = [m.bool() for m in part.target_masks if m is not None]
        union = torch.stack(present).any(0) if present else None
        crop = _subject_crop(part, union, float(margin), crop_to_subject)
        unions.append(union)
        crops.append(crop)
        tiles.append((crop[3] - crop[1], crop[2] - crop[0]))
    boxes, mode = _layout(tiles, (height, width), generator, (float(scale_range[0]), float(scale_range[1])),
                          float(max_overlap), max_tries)

    canvas = colour.view(-1, 1, 1).expand(3, height, width).clone()
    pasted: list[torch.Tensor] = []

    def place(mask: torch.Tensor, crop: tuple[int, int, int, int], box: tuple[int, int, int, int]) -> torch.Tensor:
        """A part-frame mask, cropped and resized into its box on an empty canvas."""
        full = torch.zeros(height, width, dtype=torch.bool)
        cropped = mask[crop[1]:crop[3], crop[0]:crop[2]]
        full[box[1]:box[3], box[0]:box[2]] = resize_mask(cropped, (box[3] - box[1], box[2] - box[0]))
        return full

    for part, union, crop, box in zip(samples, unions, crops, boxes):
        x0, y0, x1, y1 = box
        tile = resize_image(part.target[:, crop[1]:crop[3], crop[0]:crop[2]].float(), (y1 - y0, x1 - x0))
        if paste == "mask" and union is not None and bool(union.any()):
            region = place(union, crop, box)
        else:
            region = torch.zeros(height, width, dtype=torch.bool)
            region[y0:y1, x0:x1] = True
        window = region[y0:y1, x0:x1]
        canvas[:, y0:y1, x0:x1] = torch.where(window, tile, canvas[:, y0:y1, x0:x1])
        pasted.append(region)
    covered_after = [torch.zeros(height, width, dtype=torch.bool) for _ in samples]
    for i in range(len(samples) - 2, -1, -1):
        covered_after[i] = covered_after[i + 1] | pasted[i + 1]

    references, reference_masks, target_masks, layout = [], [], [], []
    kept_pairs, kept_index, subjects = [], [], []
    dropped = {"outside": 0, "not_pasted": 0, "occluded": 0, "contested": 0}
    for i, (part, crop, box) in enumerate(zip(samples, crops, boxes)):
        crop_w, crop_h = crop[2] - crop[0], crop[3] - crop[1]
        scale_x, scale_y = (box[2] - box[0]) / crop_w, (box[3] - box[1]) / crop_h
        visible = pasted[i] & ~covered_after[i]
        layout.append({
            "sample_id": part.sample_id, "crop": crop, "box": box, "scale": (scale_x, scale_y), "offset": box[:2],
        })
        names = _names(part)
        subjects += names if names is not None else [part.caption] * part.num_refs
        for k in range(part.num_refs):
            references.append(part.references[k])
            reference_masks.append(part.reference_masks[k] if part.reference_masks else None)
            own = part.target_masks[k] if part.target_masks else None
            target_masks.append((place(own.bool(), crop, box) if own is not None else pasted[i]) & visible)
            pairs = part.pairs[k].to(torch.float64)
            tx, ty = pairs[:, 2], pairs[:, 3]
            in_crop = (tx >= crop[0]) & (tx < crop[2]) & (ty >= crop[1]) & (ty < crop[3])
            new_x = (tx - crop[0]) * scale_x + box[0]
            new_y = (ty - crop[1]) * scale_y + box[1]
            in_canvas = in_crop & (new_x >= 0) & (new_x < width) & (new_y >= 0) & (new_y < height)
            col = new_x.floor().long().clamp(0, width - 1)
            row = new_y.floor().long().clamp(0, height - 1)
            on_part = pasted[i][row, col] & in_canvas
            shown = visible[row, col] & in_canvas
            dropped["outside"] += int((~in_canvas).sum())
            dropped["not_pasted"] += int((in_canvas & ~on_part).sum())
            dropped["occluded"] += int((on_part & ~shown).sum())
            index = shown.nonzero().flatten()
            moved = torch.stack((pairs[index, 0], pairs[index, 1], new_x[index], new_y[index]), dim=1)
            kept_pairs.append(moved.to(torch.float32))
            kept_index.append(index)

    kept_pairs, kept_index, contested = _disjoint(kept_pairs, kept_index, grid, disjoint)
    dropped["contested"] = contested
    ids = [part.sample_id for part in samples]
    return MultiSubjectSample(
        sample_id=sample_id if sample_id is not None else "+".join(ids),
        target=canvas,
        references=references,
        caption=caption,
        pairs=kept_pairs,
        target_masks=target_masks,
        reference_masks=reference_masks,
        meta={
            "parts": ids, "subjects": subjects, "layout": layout, "layout_mode": mode,
            "pair_index": kept_index, "dropped": dropped,
        },
    )


def _disjoint(
    pairs: list[torch.Tensor], index: list[torch.Tensor], grid: TokenGrid, policy: str
) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
    """Applies eq. 2 on ``grid`` to the target points of ``pairs`` (per reference ``(P_k, 4)``)."""
    num_refs = len(pairs)
    most = max((p.shape[0] for p in pairs), default=0)
    if num_refs < 2 or most == 0:
        return pairs, index, 0
    tgt_index = torch.zeros(1, num_refs, most, dtype=torch.long)
    point_mask = torch.zeros(1, num_refs, most, dtype=torch.bool)
    for k, p in enumerate(pairs):
        tgt_index[0, k, : p.shape[0]] = grid.pixel_to_token(p[:, 2:])
        point_mask[0, k, : p.shape[0]] = True
    corr = Correspondences(
        ref_index=torch.arange(most).expand(1, num_refs, most).clone(),  # placeholders: eq. 2 reads targets only
        tgt_index=tgt_index,
        point_mask=point_mask,
        ref_present=torch.ones(1, num_refs, dtype=torch.bool),
        ref_tokens=(most,) * num_refs,
        tgt_tokens=grid.num_tokens,
    )
    keep = enforce_disjoint(corr, policy).point_mask[0]
    out_pairs, out_index = [], []
    for k, p in enumerate(pairs):
        kept = keep[k, : p.shape[0]]
        out_pairs.append(p[kept])
        out_index.append(index[k][kept])
    return out_pairs, out_index, int(point_mask.sum() - keep.sum())


class ComposedDataset(torch.utils.data.Dataset):
    """Composites of random parts of a dataset, seeded per item.

    Item ``i`` draws, with a generator seeded from ``(seed, i)``, a count ``K`` in
    ``num_subjects`` and ``K`` distinct indices of ``dataset``, then calls `compose_samples` on
    those parts with the same generator. The same ``(seed, i)`` always gives the same composite.
    A part that raises `BadSample` makes the item raise it (the item is skipped as a whole, never
    completed with another part).

    Args:
        dataset: a map-style dataset of `MultiSubjectSample` (usually single-subject).
        num_subjects: K, or ``(low, high)`` inclusive; at most ``len(dataset)``.
        length: number of items (default ``len(dataset)``).
        canvas_size: canvas side or ``(H, W)``.
        seed: the run's data seed.
        **compose_kwargs: passed to `compose_samples` (``scale_range``, ``max_overlap``, ...).

    Examples:
        >>> image = torch.rand(3, 32, 32)
        >>> class Parts(torch.utils.data.Dataset):
        ...     def __len__(self): return 5
        ...     def __getitem__(self, i):
        ...         return MultiSubjectSample(f"p{i}", image, [image], f"thing {i}", [torch.zeros(0, 4)])
        >>> data = ComposedDataset(Parts(), num_subjects=(2, 3), length=4, canvas_size=64, seed=1)
        >>> len(data), data.parts(0) == data.parts(0), data[0].num_refs == len(data.parts(0))
        (4, True, True)
    """

    def __init__(
        self,
        dataset: Any,
        num_subjects: int | tuple[int, int] = (2, 3),
        length: int | None = None,
        canvas_size: int | tuple[int, int] = 512,
        seed: int = 0,
        **compose_kwargs: Any,
    ) -> None:
        self.dataset = dataset
        size = len(dataset)
        if isinstance(num_subjects, (tuple, list)) and len(num_subjects) == 2:
            low, high = (check_int(f"num_subjects[{i}]", v, minimum=1) for i, v in enumerate(num_subjects))
        else:
            low = high = check_int("num_subjects", num_subjects, minimum=1)
        if low > high or high > size:
            raise ValueError(
                f"Expected `num_subjects` = (low, high) with 1 <= low <= high <= len(dataset) = {size}, "
                f"but got {num_subjects!r}."
            )
        self.num_subjects = (low, high)
        self.length = size if length is None else check_int("length", length, minimum=0)
        self.canvas_size = as_size("canvas_size", canvas_size)
        self.seed = check_int("seed", seed)
        self.compose_kwargs = compose_kwargs
        bad = set(compose_kwargs) & {"samples", "generator", "canvas_size", "sample_id"}
        if bad:
            raise ValueError(f"Expected `compose_kwargs` without {sorted(bad)} (set by the dataset), but got them.")

    def __len__(self) -> int:
        return self.length

    def _draw(self, index: int) -> tuple[torch.Generator, list[int]]:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < self.length:
            raise IndexError(f"Expected `index` in [0, {self.length}), but got {index!r}.")
        generator = torch.Generator().manual_seed(_seed_for(self.seed, index))
        low, high = self.num_subjects
        count = low + int(torch.randint(high - low + 1, (1,), generator=generator))
        picks: list[int] = []
        while len(picks) < count:
            pick = int(torch.randint(len(self.dataset), (1,), generator=generator))
            if pick not in picks:
                picks.append(pick)
        return generator, picks

    def parts(self, index: int) -> list[int]:
        """The indices of ``dataset`` that item ``index`` composes, in placement order.

        Args:
            index: in ``[0, len(self))``.

        Returns:
            The part indices.

        Examples:
            >>> image = torch.zeros(3, 16, 16)
            >>> parts = [MultiSubjectSample(str(i), image, [image], "x", [torch.zeros(0, 4)]) for i in range(4)]
            >>> data = ComposedDataset(parts, num_subjects=2, canvas_size=32, seed=0)
            >>> picks = data.parts(1)
            >>> len(picks), len(set(picks)), picks == ComposedDataset(parts, 2, canvas_size=32, seed=0).parts(1)
            (2, 2, True)
        """
        return self._draw(index)[1]

    def __getitem__(self, index: int) -> MultiSubjectSample:
        generator, picks = self._draw(index)
        parts = [self.dataset[pick] for pick in picks]
        sample_id = f"composed-{index}:" + "+".join(part.sample_id for part in parts)
        return compose_samples(
            parts, generator, self.canvas_size, sample_id=sample_id, **self.compose_kwargs
        )
