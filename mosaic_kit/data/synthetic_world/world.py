"""The synthetic world: samples composing several subjects, seen from new poses, with exact
correspondences (`SyntheticWorld`, `SyntheticDataset`, `save_example_sheet`)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from kornia.geometry.transform import warp_affine
from torch.utils.data import Dataset

from ...correspondence import PhotometricJitter, draw_matches
from ...utils.atomic import save_image_atomic
from ...utils.checks import check_int, check_real
from ...utils.images import tensor_to_pil, to_uint8
from ...correspondence.synthetic import colour_jitter
from ..sample import MultiSubjectSample
from .subjects import SUBJECT_STYLES, _alpha, _check_range, _descriptor, _mix, _pack, _render

__all__ = ["BACKGROUNDS", "HELD_OUT_IDENTITIES", "MAX_SUBJECTS", "SYNTHETIC_PRESETS", "TRAIN_IDENTITIES",
           "SyntheticDataset", "SyntheticWorld", "SyntheticWorldConfig", "save_example_sheet"]

TRAIN_IDENTITIES = (0, 1_000_000)
"""``(start, stop)`` of the identities training worlds draw from (the default)."""
HELD_OUT_IDENTITIES = (1_000_000, 1_100_000)
"""``(start, stop)`` of held-out identities, disjoint from `TRAIN_IDENTITIES`."""
MAX_SUBJECTS = 16
"""The most subjects (references) one sample may hold."""
SYNTHETIC_PRESETS = {
    "cpu": {"image_size": 64, "ref_size": 32},
    "gpu": {"image_size": 256, "ref_size": 128},
}
"""Named sizes for `SyntheticWorldConfig.from_preset`: small for CPU runs, larger for a GPU."""
BACKGROUNDS = ("textured", "plain")
WORLD_LAYOUTS = ("random", "ordered")
"""Target backgrounds: ``textured`` (a procedural tinted gradient with smooth noise and faint
waves, different in every sample; the default) or ``plain`` (uniform mid grey, 0.5)."""
_PLAIN_BACKGROUND = 0.5


# ----------------------------------------------------------------------------- the world
@dataclass(frozen=True)
class SyntheticWorldConfig:
    """Settings of a `SyntheticWorld`; checked on construction.

    Sizes are in pixels. Scales are the side of the subject's canonical frame (which the subject
    fills up to a radius of 0.95) relative to the reference, or to its layout cell in the target:
    the target is cut into a grid of about ``sqrt(K) × sqrt(K)`` cells, one per subject.

    Args:
        image_size: side of the square target, >= 8. Defaults to 64.
        ref_size: side of the square references, >= 8. Defaults to 32.
        min_refs: fewest subjects (= references) per sample, >= 1. Defaults to 1.
        max_refs: most subjects per sample, ``min_refs <= max_refs <= MAX_SUBJECTS``.
            Defaults to 4.
        identity_range: ``(start, stop)``: identities are drawn from ``range(start, stop)``,
            which must hold at least ``max_refs`` of them. Defaults to `TRAIN_IDENTITIES`.
        seed: the world's seed, an integer >= 0. Defaults to 0.
        canonical_size: side of the canonical raster the images are warped from; defaults to
            ``max(2 * ref_size, image_size)``.
        grid_points: canonical points per side of the grid the pixel pairs come from, >= 1.
            Defaults to 16.
        ref_scale_range: range of the frame's side relative to ``ref_size``, in ``(0, 2]``.
            Defaults to (0.85, 1.0).
        ref_rotation: largest rotation of a reference in degrees, in ``[0, 180]``. Defaults to 15.
        ref_translation: largest shift of a reference, as a fraction of ``ref_size``, in
            ``[0, 0.5]``. Defaults to 0.05.
        ref_jitter: colour changes of the subject in its reference (kornia brightness,
            contrast, saturation, hue, then Gaussian noise; see `PhotometricJitter`); the
            background stays plain. Defaults to mild changes without noise.
        ref_background: grey level of the reference background, in [0, 1]. Defaults to 1 (white).
        target_scale_range: range of the frame's side relative to its layout cell, in ``(0, 2]``.
            Defaults to (0.8, 1.1).
        target_rotation: largest rotation of a subject in the target in degrees, in
            ``[0, 180]``. Defaults to 30.
        layout_jitter: largest shift of a subject's centre from its cell's centre, as a fraction
            of the cell's side, in [0, 0.5]. Defaults to 0.1.
        occlusion: how much the layout grid is squeezed towards the image centre, in [0, 1]:
            cell centres move to ``centre + (cell_centre - centre) * (1 - occlusion)``, so
            neighbours overlap and later subjects hide parts of earlier ones. With 0, no
            ``layout_jitter`` and ``target_scale_range`` at most 1, subjects never overlap.
            Defaults to 0.3.
        subject_style: how subjects are painted, one of `SUBJECT_STYLES`: ``"textured"`` (the
            default), ``"two_tone"`` (two halves, no fine pattern) or ``"plain"`` (one colour).
            Captions name what is painted.
        background: the target's background, one of `BACKGROUNDS`: ``"textured"`` (the default)
            or ``"plain"`` (uniform grey 0.5).
        layout: how subjects get their layout cells, one of `WORLD_LAYOUTS`: ``"random"`` (the
            default: a random cell each, and a random orientation of a non-square grid) or
            ``"ordered"`` (reference ``i`` in cell ``i``, row by row, of a grid with the rows
            `_grid_shape` gives: the layout follows the references' order, so a model can learn
            where each reference goes without breaking a symmetry between layouts).

    Example:
        >>> config = SyntheticWorldConfig(max_refs=6, identity_range=HELD_OUT_IDENTITIES)
        >>> config.canonical_size, config.max_refs
        (64, 6)
        >>> SyntheticWorldConfig(min_refs=3, max_refs=2)
        Traceback (most recent call last):
        ...
        ValueError: Expected `max_refs` >= `min_refs` (3), but got 2.
    """

    image_size: int = field(default=64, metadata={"help": "side of the square target in pixels"})
    ref_size: int = field(default=32, metadata={"help": "side of the square references in pixels"})
    min_refs: int = field(default=1, metadata={"help": "fewest subjects per sample"})
    max_refs: int = field(default=4, metadata={"help": "most subjects per sample"})
    identity_range: tuple[int, int] = field(
        default=TRAIN_IDENTITIES, metadata={"help": "(start, stop) of the identities drawn"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the world"})
    canonical_size: int | None = field(
        default=None, metadata={"help": "side of the canonical raster; default max(2 * ref_size, image_size)"}
    )
    grid_points: int = field(default=16, metadata={"help": "canonical grid points per side for the pairs"})
    ref_scale_range: tuple[float, float] = field(
        default=(0.85, 1.0), metadata={"help": "frame side relative to the reference size"}
    )
    ref_rotation: float = field(default=15.0, metadata={"help": "largest reference rotation in degrees"})
    ref_translation: float = field(default=0.05, metadata={"help": "largest reference shift / ref_size"})
    ref_jitter: PhotometricJitter = field(
        default=PhotometricJitter(brightness=0.05, contrast=0.1, saturation=0.1, hue=0.02, noise=0.0),
        metadata={"help": "colour changes of the subject in its reference"},
    )
    ref_background: float = field(default=1.0, metadata={"help": "grey level of the reference background"})
    target_scale_range: tuple[float, float] = field(
        default=(0.8, 1.1), metadata={"help": "frame side relative to the layout cell"}
    )
    target_rotation: float = field(default=30.0, metadata={"help": "largest target rotation in degrees"})
    layout_jitter: float = field(default=0.1, metadata={"help": "largest shift of a subject / its cell side"})
    occlusion: float = field(default=0.3, metadata={"help": "squeeze of the layout grid towards the centre"})
    subject_style: str = field(default="textured", metadata={"help": "textured, two_tone or plain subjects"})
    background: str = field(default="textured", metadata={"help": "textured or plain target background"})
    layout: str = field(default="random", metadata={"help": "random or ordered (reference i in cell i)"})

    def __post_init__(self) -> None:
        def put(name: str, value: object) -> None:
            object.__setattr__(self, name, value)

        put("image_size", check_int("image_size", self.image_size, minimum=8))
        put("ref_size", check_int("ref_size", self.ref_size, minimum=8))
        put("min_refs", check_int("min_refs", self.min_refs, minimum=1, maximum=MAX_SUBJECTS))
        put("max_refs", check_int("max_refs", self.max_refs, maximum=MAX_SUBJECTS))
        if self.max_refs < self.min_refs:
            raise ValueError(f"Expected `max_refs` >= `min_refs` ({self.min_refs}), but got {self.max_refs}.")
        identity_range = self.identity_range
        if isinstance(identity_range, (str, bytes)) or not isinstance(identity_range, (tuple, list)) or len(
            identity_range
        ) != 2:
            raise ValueError(f"Expected `identity_range` to be a pair (start, stop), but got {identity_range!r}.")
        start = check_int("identity_range[0]", identity_range[0], minimum=0)
        stop = check_int("identity_range[1]", identity_range[1], minimum=0)
        if stop - start < self.max_refs:
            raise ValueError(
                f"Expected `identity_range` to hold at least max_refs = {self.max_refs} identities, "
                f"but got {identity_range!r}."
            )
        put("identity_range", (start, stop))
        put("seed", check_int("seed", self.seed, minimum=0))
        if self.canonical_size is None:
            put("canonical_size", max(2 * self.ref_size, self.image_size))
        else:
            put("canonical_size", check_int("canonical_size", self.canonical_size, minimum=8))
        put("grid_points", check_int("grid_points", self.grid_points, minimum=1))
        put("ref_scale_range", _check_range("ref_scale_range", self.ref_scale_range, 0.0, 2.0))
        if self.ref_scale_range[0] <= 0:
            raise ValueError(f"Expected `ref_scale_range` > 0, but got {self.ref_scale_range!r}.")
        put("ref_rotation", check_real("ref_rotation", self.ref_rotation, 0.0, 180.0))
        put("ref_translation", check_real("ref_translation", self.ref_translation, 0.0, 0.5))
        if not isinstance(self.ref_jitter, PhotometricJitter):
            raise ValueError(
                f"Expected `ref_jitter` to be a PhotometricJitter, but got {type(self.ref_jitter).__name__}."
            )
        put("ref_background", check_real("ref_background", self.ref_background, 0.0, 1.0))
        put("target_scale_range", _check_range("target_scale_range", self.target_scale_range, 0.0, 2.0))
        if self.target_scale_range[0] <= 0:
            raise ValueError(f"Expected `target_scale_range` > 0, but got {self.target_scale_range!r}.")
        put("target_rotation", check_real("target_rotation", self.target_rotation, 0.0, 180.0))
        put("layout_jitter", check_real("layout_jitter", self.layout_jitter, 0.0, 0.5))
        put("occlusion", check_real("occlusion", self.occlusion, 0.0, 1.0))
        if self.subject_style not in SUBJECT_STYLES:
            raise ValueError(f"Expected `subject_style` to be one of {list(SUBJECT_STYLES)}, but got {self.subject_style!r}.")
        if self.background not in BACKGROUNDS:
            raise ValueError(f"Expected `background` to be one of {list(BACKGROUNDS)}, but got {self.background!r}.")
        if self.layout not in WORLD_LAYOUTS:
            raise ValueError(f"Expected `layout` to be one of {list(WORLD_LAYOUTS)}, but got {self.layout!r}.")

    @classmethod
    def from_preset(cls, name: str, **overrides: object) -> SyntheticWorldConfig:
        """A config with the sizes of a named preset (see `SYNTHETIC_PRESETS`).

        Args:
            name: ``"cpu"`` (64-pixel targets, 32-pixel references) or ``"gpu"`` (256 / 128).
            **overrides: any other field of the config.

        Returns:
            The `SyntheticWorldConfig`.

        Example:
            >>> config = SyntheticWorldConfig.from_preset("gpu", seed=1)
            >>> config.image_size, config.ref_size, config.seed
            (256, 128, 1)
        """
        if name not in SYNTHETIC_PRESETS:
            raise ValueError(f"Expected `name` to be one of {list(SYNTHETIC_PRESETS)}, but got {name!r}.")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"Expected `overrides` among the config's fields {sorted(known)}, but got {unknown}.")
        return cls(**{**SYNTHETIC_PRESETS[name], **overrides})  # type: ignore[arg-type]


def _grid_shape(count: int) -> tuple[int, int]:
    """Rows and columns of the layout grid for ``count`` subjects: as square as possible."""
    rows = math.isqrt(count - 1) + 1  # ceil(sqrt(count))
    return rows, math.ceil(count / rows)


def _similarity(scale: float, angle: float, centre_x: float, centre_y: float) -> list[list[float]]:
    cos, sin = math.cos(angle) * scale, math.sin(angle) * scale
    return [[cos, -sin, centre_x], [sin, cos, centre_y], [0.0, 0.0, 1.0]]


def _kornia_affine(canonical_to_pixel: torch.Tensor, canonical_size: int) -> torch.Tensor:
    """``(K, 2, 3)`` float32 raster→output affine in kornia's frame (pixel centres at integers)."""
    scale = 2.0 / canonical_size
    raster_to_canonical = torch.tensor(
        [[scale, 0.0, scale * 0.5 - 1.0], [0.0, scale, scale * 0.5 - 1.0], [0.0, 0.0, 1.0]], dtype=torch.float64
    )  # kornia raster pixel (centres at integers) → canonical (u, v)
    to_kornia = torch.tensor([[1.0, 0.0, -0.5], [0.0, 1.0, -0.5], [0.0, 0.0, 1.0]], dtype=torch.float64)
    matrix = to_kornia @ canonical_to_pixel @ raster_to_canonical
    return matrix[:, :2].float()


def _apply(transforms: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Maps ``(N, 2)`` canonical points through ``(K, 3, 3)`` affine transforms → ``(K, N, 2)``."""
    return torch.einsum("kij,nj->kni", transforms[:, :2, :2], points) + transforms[:, None, :2, 2]


def _lookup(masks: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """``masks[k]`` at the pixel holding each point ``(K, N, 2)``; False outside the image."""
    count, height, width = masks.shape
    x, y = points[..., 0], points[..., 1]
    within = (x >= 0) & (x < width) & (y >= 0) & (y < height)
    cols = x.floor().long().clamp(0, width - 1)
    rows = y.floor().long().clamp(0, height - 1)
    return within & masks[torch.arange(count)[:, None], rows, cols]


def _background(size: int, rng: random.Random, generator: torch.Generator) -> torch.Tensor:
    """A procedural ``(3, size, size)`` background: tinted gradient, smooth noise and faint waves."""
    coarse = torch.rand(3, 5, 5, generator=generator)
    noise = torch.nn.functional.interpolate(coarse[None], size=(size, size), mode="bicubic", align_corners=False)[0]
    centres = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    y, x = torch.meshgrid(centres, centres, indexing="ij")
    base = torch.tensor([rng.uniform(0.35, 0.75) for _ in range(3)])[:, None, None]
    tint = torch.tensor([rng.uniform(-0.15, 0.15) for _ in range(3)])[:, None, None]
    angle, frequency, phase = rng.uniform(0, math.pi), rng.uniform(6.0, 14.0), rng.uniform(0, 2 * math.pi)
    gradient = x * math.cos(angle) + y * math.sin(angle) - 0.5
    waves = torch.sin(2 * math.pi * frequency * (x * math.sin(angle) - y * math.cos(angle)) + phase)
    image = base + tint * gradient * 2 + 0.3 * (noise - 0.5) + 0.05 * waves
    return image.clamp(0.0, 1.0)


def _jitter(images: torch.Tensor, jitter: PhotometricJitter, factors: torch.Tensor) -> torch.Tensor:
    """kornia colour changes of ``(K, 3, h, w)`` images with per-image ``factors`` ``(K, 4)`` in [-1, 1]."""
    return colour_jitter(images.clamp(0.0, 1.0), jitter, factors)


def _caption(names: list[str], background: str = "textured") -> str:
    phrases = [f"a {name}" for name in names]
    if len(phrases) == 1:
        listed = phrases[0]
    else:
        listed = ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return f"{listed} on a {background} background"


class SyntheticWorld:
    """Generates multi-subject samples with exact correspondences (see the module docstring).

    ``sample(index)`` is a pure function of ``(config, index)``: it seeds its own random sources
    from ``config.seed`` and ``index``.

    Args:
        config: the settings; defaults to ``SyntheticWorldConfig()`` (the CPU sizes).

    Example:
        >>> world = SyntheticWorld()
        >>> sample = world.sample(4)
        >>> 1 <= sample.num_refs <= 4, sample.pairs[0].shape[1]
        (True, 4)
    """

    def __init__(self, config: SyntheticWorldConfig | None = None) -> None:
        if config is None:
            config = SyntheticWorldConfig()
        if not isinstance(config, SyntheticWorldConfig):
            raise ValueError(
                f"Expected `config` to be a SyntheticWorldConfig or None, but got {type(config).__name__}."
            )
        self._config = config
        points = config.grid_points
        centres = (torch.arange(points, dtype=torch.float64) + 0.5) * (2.0 / points) - 1.0
        v, u = torch.meshgrid(centres, centres, indexing="ij")
        self._grid = torch.stack((u.reshape(-1), v.reshape(-1)), dim=-1)  # (G², 2), row-major

    @property
    def config(self) -> SyntheticWorldConfig:
        """The world's `SyntheticWorldConfig`."""
        return self._config

    def __repr__(self) -> str:
        return f"SyntheticWorld({self._config!r})"

    def sample(self, index: int, num_refs: int | None = None) -> MultiSubjectSample:
        """Generates sample ``index``.

        Args:
            index: the sample's index, an integer >= 0.
            num_refs: K, the number of subjects and references, in ``[1, MAX_SUBJECTS]`` and at
                most the size of ``identity_range``; by default drawn uniformly from
                ``[min_refs, max_refs]`` with the index's seed. Giving the K that would have
                been drawn returns the same sample as giving none.

        Returns:
            A `MultiSubjectSample` with ``target`` ``(3, image_size, image_size)``, K references
            ``(3, ref_size, ref_size)``, per reference ``pairs`` ``(P_k, 4)`` float32
            ``(ref_x, ref_y, tgt_x, tgt_y)`` (``P_k`` may be 0 when a subject is hidden or
            outside the target), ``target_masks`` (the subject's visible region, ``(H, W)``
            bool), ``reference_masks`` (``(h, w)`` bool), and ``meta`` with ``identities``,
            ``names``, ``paint_order`` (paint position of each reference's subject: higher
            occludes lower), ``reference_transforms`` and ``target_transforms`` (``(K, 3, 3)``
            float64, canonical ``(u, v, 1)`` → pixel coordinates), ``canonical_points`` (the
            ``(u, v)`` of each pair, one ``(P_k, 2)`` tensor per reference), ``visible_fraction``
            (``(K,)``: visible / full subject area in the target), ``seed`` and ``index``.

        Example:
            >>> world = SyntheticWorld(SyntheticWorldConfig(seed=1))
            >>> sample = world.sample(10, num_refs=3)
            >>> sample.num_refs, len(sample.target_masks), sample.target_masks[0].dtype
            (3, 3, torch.bool)
            >>> torch.equal(sample.target, world.sample(10, num_refs=3).target)
            True
            >>> sample.caption.endswith("on a textured background")
            True
        """
        config = self._config
        index = check_int("index", index, minimum=0)
        start, stop = config.identity_range
        rng = random.Random(_mix(config.seed, index))
        generator = torch.Generator().manual_seed(_mix(config.seed, index, 1))
        drawn = rng.randint(config.min_refs, config.max_refs)
        if num_refs is None:
            count = drawn
        else:
            count = check_int("num_refs", num_refs, minimum=1, maximum=min(MAX_SUBJECTS, stop - start))
        identities = rng.sample(range(start, stop), count)
        descriptors = [_descriptor(identity) for identity in identities]
        paint_order = list(range(count))
        rng.shuffle(paint_order)

        # Layout of the target: a jittered grid, one cell per subject.
        size, ref_size = config.image_size, config.ref_size
        rows, cols = _grid_shape(count)
        swap = rows != cols and rng.random() < 0.5
        cells = rng.sample(range(rows * cols), count)  # drawn in both layouts: the rest of the sample stays the same
        if config.layout == "ordered":
            cells = list(range(count))
        elif swap:
            rows, cols = cols, rows
        cell_w, cell_h = size / cols, size / rows
        cell = min(cell_w, cell_h)
        target_rows, reference_rows, factors = [], [], []
        for slot in range(count):
            row, col = divmod(cells[slot], cols)
            shift = config.layout_jitter * cell
            squeeze = 1 - config.occlusion
            centre_x = size / 2 + ((col + 0.5) * cell_w - size / 2) * squeeze + rng.uniform(-shift, shift)
            centre_y = size / 2 + ((row + 0.5) * cell_h - size / 2) * squeeze + rng.uniform(-shift, shift)
            side = cell * rng.uniform(*config.target_scale_range)
            angle = math.radians(rng.uniform(-config.target_rotation, config.target_rotation))
            target_rows.append(_similarity(side / 2, angle, centre_x, centre_y))
            ref_side = ref_size * rng.uniform(*config.ref_scale_range)
            ref_angle = math.radians(rng.uniform(-config.ref_rotation, config.ref_rotation))
            ref_shift = config.ref_translation * ref_size
            ref_x = ref_size / 2 + rng.uniform(-ref_shift, ref_shift)
            ref_y = ref_size / 2 + rng.uniform(-ref_shift, ref_shift)
            reference_rows.append(_similarity(ref_side / 2, ref_angle, ref_x, ref_y))
            factors.append([rng.uniform(-1.0, 1.0) for _ in range(4)])
        target_transforms = torch.tensor(target_rows, dtype=torch.float64)
        reference_transforms = torch.tensor(reference_rows, dtype=torch.float64)
        background = _background(size, rng, generator)  # drawn in both modes: the random streams stay aligned
        if config.background == "plain":
            background = torch.full_like(background, _PLAIN_BACKGROUND)

        # Rendering: canonical rasters warped with kornia.
        params = _pack(descriptors)
        canonical = _render(params, config.canonical_size, config.subject_style)
        warped = warp_affine(
            canonical, _kornia_affine(target_transforms, config.canonical_size), dsize=(size, size),
            mode="bilinear", padding_mode="zeros", align_corners=True,
        )
        on_ref = warp_affine(
            canonical, _kornia_affine(reference_transforms, config.canonical_size), dsize=(ref_size, ref_size),
            mode="bilinear", padding_mode="zeros", align_corners=True,
        )

        # Target: paint in `paint_order`; the visible weight of a subject is its alpha times the
        # transparency of everything painted above it.
        alpha = warped[:, 3].clamp(0.0, 1.0)
        painted = torch.tensor(sorted(range(count), key=lambda slot: paint_order[slot]))  # slots, bottom first
        clear = 1 - alpha[painted]
        above_inclusive = torch.flip(torch.cumprod(torch.flip(clear, [0]), 0), [0])
        above = torch.cat((above_inclusive[1:], torch.ones_like(clear[:1])), 0)
        weights = torch.empty_like(alpha)
        weights[painted] = alpha[painted] * above
        target = (weights[:, None] * warped[:, :3].clamp(0.0, 1.0)).sum(0) + above_inclusive[0] * background
        target = target.clamp(0.0, 1.0)
        target_masks = weights > 0.5
        full_area = (alpha > 0.5).sum((1, 2)).clamp_min(1)
        visible_fraction = target_masks.sum((1, 2)) / full_area

        # References: jittered subject on a plain background.
        ref_alpha = on_ref[:, 3:].clamp(0.0, 1.0)
        ref_rgb = _jitter(on_ref[:, :3], config.ref_jitter, torch.tensor(factors, dtype=torch.float32))
        if config.ref_jitter.noise:
            noise = torch.randn(ref_rgb.shape, generator=generator)
            ref_rgb = (ref_rgb + noise * config.ref_jitter.noise).clamp(0.0, 1.0)
        references = ref_rgb * ref_alpha + config.ref_background * (1 - ref_alpha)
        reference_masks = ref_alpha[:, 0] > 0.5

        # Pairs: canonical grid points inside the subject, inside both images, in the reference
        # mask and visible in the target.
        grid = self._grid
        grid_u = grid[:, 0].float().expand(count, -1)
        grid_v = grid[:, 1].float().expand(count, -1)
        inside_subject = _alpha(params, grid_u, grid_v, edge=0.0) > 0.5
        ref_points = _apply(reference_transforms, grid)
        tgt_points = _apply(target_transforms, grid)
        keep = inside_subject & _lookup(reference_masks, ref_points) & _lookup(target_masks, tgt_points)
        pairs, canonical_points = [], []
        for slot in range(count):
            chosen = keep[slot]
            pairs.append(torch.cat((ref_points[slot, chosen], tgt_points[slot, chosen]), dim=1).float())
            canonical_points.append(grid[chosen].float())

        names = [descriptor.styled_name(config.subject_style) for descriptor in descriptors]
        return MultiSubjectSample(
            sample_id=f"synthetic-{config.seed}-{index}",
            target=target,
            references=[reference.clone() for reference in references],
            caption=_caption(names, config.background),
            pairs=pairs,
            target_masks=[mask.clone() for mask in target_masks],
            reference_masks=[mask.clone() for mask in reference_masks],
            meta={
                "seed": config.seed,
                "index": index,
                "identities": identities,
                "names": names,
                "paint_order": paint_order,
                "reference_transforms": reference_transforms,
                "target_transforms": target_transforms,
                "canonical_points": canonical_points,
                "visible_fraction": visible_fraction.float(),
                "palettes": torch.stack([d.styled_palette(config.subject_style) for d in descriptors]),
            },
        )


class SyntheticDataset(Dataset):
    """A map-style dataset of ``length`` samples of a `SyntheticWorld`: item ``i`` is ``world.sample(i)``.

    Args:
        world: the `SyntheticWorld`.
        length: number of samples, >= 1.
        num_refs: when given, every sample has exactly this many references; by default each
            sample draws K in ``[min_refs, max_refs]``.

    Raises:
        IndexError: from ``dataset[i]`` when ``i`` is outside ``[-length, length)`` (the
            sequence protocol); ``ValueError`` for a non-integer ``i``.

    Example:
        >>> dataset = SyntheticDataset(SyntheticWorld(), length=8, num_refs=2)
        >>> len(dataset), dataset[3].num_refs, dataset[-1].sample_id
        (8, 2, 'synthetic-0-7')
    """

    def __init__(self, world: SyntheticWorld, length: int, num_refs: int | None = None) -> None:
        if not isinstance(world, SyntheticWorld):
            raise ValueError(f"Expected `world` to be a SyntheticWorld, but got {type(world).__name__}.")
        self.world = world
        self.length = check_int("length", length, minimum=1)
        if num_refs is not None:
            start, stop = world.config.identity_range
            num_refs = check_int("num_refs", num_refs, minimum=1, maximum=min(MAX_SUBJECTS, stop - start))
        self.num_refs = num_refs

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> MultiSubjectSample:
        index = check_int("index", index)
        if not -self.length <= index < self.length:
            raise IndexError(f"Expected `index` in [{-self.length}, {self.length}), but got {index}.")
        return self.world.sample(index % self.length, num_refs=self.num_refs)


# ----------------------------------------------------------------------------- example sheet
_LINE_COLOURS = torch.tensor(
    [[0.90, 0.10, 0.10], [0.10, 0.45, 0.95], [0.10, 0.75, 0.20], [0.95, 0.60, 0.05],
     [0.65, 0.20, 0.85], [0.05, 0.80, 0.80], [0.95, 0.30, 0.70], [0.40, 0.40, 0.40]]
)


def save_example_sheet(
    path: str | Path,
    config: SyntheticWorldConfig | None = None,
    num_samples: int = 3,
    num_refs: int = 3,
    lines_per_reference: int = 6,
) -> torch.Tensor:
    """Saves a PNG of example samples: references, target with correspondence lines, visible masks.

    Each row is one sample: the references stacked on the left, the target in the middle with a
    few lines per reference from reference points to their target points (one colour per
    reference), and on the right the target dimmed with each subject's visible mask in its
    reference's colour. Rows are separated by white bands.

    Args:
        path: where to write the PNG (parent folders are created).
        config: the world; defaults to 192-pixel targets and 64-pixel references, seed 0.
        num_samples: rows (samples 0, 1, ...), >= 1. Defaults to 3.
        num_refs: K per sample, in ``[1, 8]``. Defaults to 3.
        lines_per_reference: correspondence lines drawn per reference (evenly spread over its
            pairs), >= 0. Defaults to 6.

    Returns:
        The sheet as a ``(3, H, W)`` uint8 tensor.

    Example:
        >>> import tempfile
        >>> out = Path(tempfile.mkdtemp()) / "sheet.png"
        >>> sheet = save_example_sheet(out, SyntheticWorldConfig(image_size=32, ref_size=16), num_samples=1, num_refs=2)
        >>> out.exists(), sheet.dtype, sheet.shape
        (True, torch.uint8, torch.Size([3, 32, 80]))
    """

    if config is None:
        config = SyntheticWorldConfig(image_size=192, ref_size=64)
    world = SyntheticWorld(config)
    num_samples = check_int("num_samples", num_samples, minimum=1)
    num_refs = check_int("num_refs", num_refs, minimum=1, maximum=len(_LINE_COLOURS))
    lines_per_reference = check_int("lines_per_reference", lines_per_reference, minimum=0)
    size, ref_size = config.image_size, config.ref_size
    height = max(size, num_refs * ref_size)
    rows = []
    for index in range(num_samples):
        sample = world.sample(index, num_refs=num_refs)
        stack = torch.ones(3, height, ref_size)
        left_xy, right_xy, colours = [], [], []
        overlay = sample.target * 0.35 + 0.65
        for slot, (reference, pairs) in enumerate(zip(sample.references, sample.pairs)):
            stack[:, slot * ref_size : (slot + 1) * ref_size] = reference
            colour = _LINE_COLOURS[slot]
            overlay = torch.where(sample.target_masks[slot], colour[:, None, None], overlay)
            if len(pairs) and lines_per_reference:
                chosen = torch.linspace(0, len(pairs) - 1, min(lines_per_reference, len(pairs))).round().long()
                left_xy.append(pairs[chosen, :2] + torch.tensor([0.0, slot * ref_size]))
                right_xy.append(pairs[chosen, 2:])
                colours.append(colour.expand(len(chosen), 3))
        target = torch.ones(3, height, size)
        target[:, :size] = sample.target
        masks = torch.ones(3, height, size)
        masks[:, :size] = overlay
        if left_xy:
            left, right, palette = torch.cat(left_xy), torch.cat(right_xy), torch.cat(colours)
        else:
            left, right, palette = torch.zeros(0, 2), torch.zeros(0, 2), torch.zeros(0, 3)
        drawn = draw_matches(stack, target, left, right, max_lines=len(left), colours=palette)
        rows.append(torch.cat((drawn, to_uint8(masks)), dim=2))
    gap = torch.full((3, 4, rows[0].shape[2]), 255, dtype=torch.uint8)
    parts = []
    for i, row in enumerate(rows):
        if i:
            parts.append(gap)
        parts.append(row)
    sheet = torch.cat(parts, dim=1)
    save_image_atomic(tensor_to_pil(sheet), path)
    return sheet
