"""The subjects of the synthetic world: an integer identity fixes a subject's shape, palette and
texture on its canonical frame (`subject_descriptor`), rasterised as RGBA (`render_subject`)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from functools import lru_cache

import torch

from ...utils.checks import check_int, check_real

__all__ = ["SHAPE_FAMILIES", "SUBJECT_COLOURS", "SUBJECT_STYLES", "TEXTURES", "SubjectDescriptor", "render_subject",
           "subject_descriptor"]

SHAPE_FAMILIES = ("superellipse", "polygon", "star")
"""The shape families of subjects."""
TEXTURES = ("stripes", "checks", "dots", "marble")
"""The texture families of subjects."""
SUBJECT_STYLES = ("textured", "two_tone", "plain")
"""How subjects are painted: ``textured`` (the identity's texture in its two colours, the
default), ``two_tone`` (split into two halves of the two colours along the texture's
orientation: no fine pattern to learn) or ``plain`` (the primary colour only)."""
_TEXTURE_WORDS = {"stripes": "striped", "checks": "checkered", "dots": "dotted", "marble": "marbled"}
_POLYGON_NAMES = {3: "triangle", 4: "square", 5: "pentagon", 6: "hexagon", 7: "heptagon", 8: "octagon"}
SUBJECT_COLOURS = {
    "red": (0.85, 0.12, 0.12),
    "orange": (0.96, 0.55, 0.08),
    "yellow": (0.96, 0.86, 0.12),
    "green": (0.18, 0.62, 0.22),
    "teal": (0.05, 0.58, 0.58),
    "blue": (0.12, 0.28, 0.86),
    "purple": (0.50, 0.18, 0.70),
    "pink": (0.96, 0.45, 0.72),
    "brown": (0.50, 0.30, 0.12),
    "black": (0.08, 0.08, 0.08),
    "white": (0.97, 0.97, 0.97),
}
"""Named base colours of the palettes (RGB in [0, 1]); white is never a primary colour."""

_SUBJECT_RADIUS = (0.8, 0.95)
_COLOUR_NOISE = 0.05
_NORMALISER_SAMPLES = 512
_MASK = (1 << 64) - 1


# ----------------------------------------------------------------------------- small helpers
def _check_range(name: str, value: object, low: float, high: float) -> tuple[float, float]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"Expected `{name}` to be a pair (low, high), but got {value!r}.")
    first = check_real(f"{name}[0]", value[0], low, high)
    second = check_real(f"{name}[1]", value[1], low, high)
    if first > second:
        raise ValueError(f"Expected `{name}` with low <= high, but got {value!r}.")
    return first, second


def _splitmix64(value: int) -> int:
    value = (value + 0x9E3779B97F4A7C15) & _MASK
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK
    return value ^ (value >> 31)


def _mix(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64 chained), stable across runs and platforms."""
    state = 0
    for value in values:
        state = _splitmix64(state ^ _splitmix64(value & _MASK))
    return state >> 1


# ----------------------------------------------------------------------------- subjects
@dataclass(frozen=True)
class SubjectDescriptor:
    """Everything that defines one subject; a fixed function of its identity.

    Use `subject_descriptor` to get one. ``palette`` gives the two colours as a tensor, for
    example to measure whether a subject's colours leak into another subject's region.

    Args:
        identity: the subject's identity (>= 0).
        shape: the shape family, one of `SHAPE_FAMILIES`.
        shape_name: the noun used in captions (``"oval"``, ``"hexagon"``, ``"star"``, ...).
        texture: the texture family, one of `TEXTURES`.
        texture_name: the adjective used in captions (``"striped"``, ``"dotted"``, ...).
        colour_names: names of the primary and secondary colour (keys of `SUBJECT_COLOURS`).
        colours: the two RGB colours in [0, 1] (the named colours, perturbed per identity).
        radius: the subject's largest radius on the canonical frame, in ``[0.8, 0.95]``.
        rotation: the shape's rotation in radians.
        sides: number of sides (polygon) or points (star), 3 to 8; unused by superellipses.
        exponent: the superellipse exponent ``n`` of ``|x|^n + |y / aspect|^n = 1``.
        aspect: the superellipse's ratio of its minor to its major axis.
        star_depth: how far a star's inner corners reach towards the centre, as a fraction of
            its radius.
        texture_frequency: cycles of the texture across the canonical frame's width.
        texture_angle: orientation of the texture in radians.
        texture_phases: two phases (radians) of the texture's waves.
        texture_sharpness: steepness of the transition between the two colours.
        marble_waves: four ``(angle, relative frequency, phase)`` waves of the marble texture.

    Example:
        >>> descriptor = subject_descriptor(7)
        >>> descriptor.palette.shape, descriptor.shape in SHAPE_FAMILIES
        (torch.Size([2, 3]), True)
        >>> descriptor.name == f"{descriptor.colour_names[0]} and {descriptor.colour_names[1]} " \\
        ...     f"{descriptor.texture_name} {descriptor.shape_name}"
        True
    """

    identity: int
    shape: str
    shape_name: str
    texture: str
    texture_name: str
    colour_names: tuple[str, str]
    colours: tuple[tuple[float, float, float], tuple[float, float, float]]
    radius: float
    rotation: float
    sides: int
    exponent: float
    aspect: float
    star_depth: float
    texture_frequency: float
    texture_angle: float
    texture_phases: tuple[float, float]
    texture_sharpness: float
    marble_waves: tuple[tuple[float, float, float], ...]

    @property
    def name(self) -> str:
        """The caption phrase, e.g. ``"red and white striped star"``."""
        return f"{self.colour_names[0]} and {self.colour_names[1]} {self.texture_name} {self.shape_name}"

    @property
    def palette(self) -> torch.Tensor:
        """``(2, 3)`` float32 tensor of the primary and secondary colour."""
        return torch.tensor(self.colours, dtype=torch.float32)

    def styled_name(self, style: str = "textured") -> str:
        """The caption phrase of the subject painted in ``style`` (one of `SUBJECT_STYLES`):
        ``"red and white striped star"`` (textured), ``"red and white star"`` (two_tone),
        ``"red star"`` (plain).

        Raises:
            ValueError: an unknown ``style``.
        """
        _check_style(style)
        if style == "plain":
            return f"{self.colour_names[0]} {self.shape_name}"
        if style == "two_tone":
            return f"{self.colour_names[0]} and {self.colour_names[1]} {self.shape_name}"
        return self.name

    def styled_palette(self, style: str = "textured") -> torch.Tensor:
        """``(2, 3)`` float32: the colours the subject shows when painted in ``style``; for
        ``plain`` the primary colour twice (the secondary one never appears).

        Example:
            >>> d = subject_descriptor(3)
            >>> torch.equal(d.styled_palette("plain")[1], d.palette[0]), d.styled_name("plain").count(" ")
            (True, 1)
        """
        _check_style(style)
        palette = self.palette
        return palette[[0, 0]] if style == "plain" else palette


def _check_style(style: object) -> str:
    if style not in SUBJECT_STYLES:
        raise ValueError(f"Expected `style` to be one of {list(SUBJECT_STYLES)}, but got {style!r}.")
    return style  # type: ignore[return-value]


@lru_cache(maxsize=65536)
def _descriptor(identity: int) -> SubjectDescriptor:
    rng = random.Random(f"mosaic_kit.synthetic_world.subject:{identity}")
    family = SHAPE_FAMILIES[rng.randrange(len(SHAPE_FAMILIES))]
    texture = TEXTURES[rng.randrange(len(TEXTURES))]
    names = list(SUBJECT_COLOURS)
    primary = rng.choice([name for name in names if name != "white"])
    secondary = rng.choice([name for name in names if name != primary])
    colours = tuple(
        tuple(min(1.0, max(0.0, channel + rng.uniform(-_COLOUR_NOISE, _COLOUR_NOISE))) for channel in SUBJECT_COLOURS[n])
        for n in (primary, secondary)
    )
    radius = rng.uniform(*_SUBJECT_RADIUS)
    rotation = rng.uniform(0.0, 2 * math.pi)
    sides = rng.randint(3, 8)
    exponent = rng.uniform(1.4, 5.0)
    aspect = rng.uniform(0.6, 1.0)
    star_depth = rng.uniform(0.3, 0.55)
    frequency = rng.uniform(2.5, 6.0)
    angle = rng.uniform(0.0, math.pi)
    phases = (rng.uniform(0.0, 2 * math.pi), rng.uniform(0.0, 2 * math.pi))
    sharpness = rng.uniform(3.0, 8.0)
    waves = tuple(
        (rng.uniform(0.0, 2 * math.pi), rng.uniform(0.6, 1.4), rng.uniform(0.0, 2 * math.pi)) for _ in range(4)
    )
    if family == "superellipse":
        if exponent < 1.8:
            shape_name = "diamond"
        elif exponent < 2.6:
            shape_name = "disc" if aspect >= 0.9 else "oval"
        else:
            shape_name = "squircle"
    elif family == "polygon":
        shape_name = _POLYGON_NAMES[sides]
    else:
        shape_name = "star"
    return SubjectDescriptor(
        identity=identity,
        shape=family,
        shape_name=shape_name,
        texture=texture,
        texture_name=_TEXTURE_WORDS[texture],
        colour_names=(primary, secondary),
        colours=colours,  # type: ignore[arg-type]
        radius=radius,
        rotation=rotation,
        sides=sides,
        exponent=exponent,
        aspect=aspect,
        star_depth=star_depth,
        texture_frequency=frequency,
        texture_angle=angle,
        texture_phases=phases,
        texture_sharpness=sharpness,
        marble_waves=waves,
    )


def subject_descriptor(identity: int) -> SubjectDescriptor:
    """The subject of an identity: shape, palette, texture and caption words.

    The descriptor depends only on ``identity`` (not on any world's seed), so identity 12 is the
    same subject in every world.

    Args:
        identity: the subject's identity, an integer >= 0.

    Returns:
        The `SubjectDescriptor`.

    Example:
        >>> subject_descriptor(12) == subject_descriptor(12), subject_descriptor(12).identity
        (True, 12)
        >>> bool((subject_descriptor(12).palette >= 0).all() and (subject_descriptor(12).palette <= 1).all())
        True
    """
    return _descriptor(check_int("identity", identity, minimum=0))


_SCALARS = (
    "family", "texture", "radius", "rotation", "sides", "exponent", "aspect", "star_depth",
    "frequency", "angle", "phase0", "phase1", "sharpness",
)


@lru_cache(maxsize=65536)
def _parameter_row(identity: int) -> tuple[float, ...]:
    """A subject's parameters as one flat row (see `_pack`), its radius normaliser included."""
    d = _descriptor(identity)
    scalars = (
        float(SHAPE_FAMILIES.index(d.shape)), float(TEXTURES.index(d.texture)), d.radius, d.rotation,
        float(d.sides), d.exponent, d.aspect, d.star_depth, d.texture_frequency, d.texture_angle,
        d.texture_phases[0], d.texture_phases[1], d.texture_sharpness,
    )
    waves = tuple(value for wave in d.marble_waves for value in wave)
    colours = tuple(value for colour in d.colours for value in colour)
    normaliser = 1.0  # polygons and stars reach radius 1 at their corners
    if d.shape == "superellipse":
        phi = torch.linspace(0.0, 2 * math.pi, _NORMALISER_SAMPLES + 1, dtype=torch.float32)[:-1]
        exponent = torch.tensor(d.exponent, dtype=torch.float32)  # the same float32 math as `_unit_radius`
        aspect = torch.tensor(d.aspect, dtype=torch.float32)
        total = phi.cos().abs().pow(exponent) + (phi.sin() / aspect).abs().pow(exponent)
        normaliser = float(total.clamp_min(1e-12).pow(-1.0 / exponent).amax())
    return scalars + (normaliser,) + waves + colours


def _split(rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Named ``(K, 1)`` columns of ``(K, 32)`` parameter rows (waves ``(K, 4, 1)``, colours ``(K, 2, 3, 1)``)."""
    count, scalars = rows.shape[0], len(_SCALARS)
    params = {name: rows[:, i, None] for i, name in enumerate(_SCALARS)}
    params["normaliser"] = rows[:, scalars, None]
    waves = rows[:, scalars + 1 : scalars + 13].reshape(count, 4, 3)
    params["wave_angle"] = waves[..., 0, None]
    params["wave_frequency"] = waves[..., 1, None]
    params["wave_phase"] = waves[..., 2, None]
    params["colours"] = rows[:, scalars + 13 :].reshape(count, 2, 3, 1)
    return params


def _pack(descriptors: list[SubjectDescriptor]) -> dict[str, torch.Tensor]:
    """Per-subject parameters as named ``(K, 1)`` float32 columns (see `_split`)."""
    return _split(torch.tensor([_parameter_row(d.identity) for d in descriptors], dtype=torch.float32))


def _unit_radius(params: dict[str, torch.Tensor], phi: torch.Tensor) -> torch.Tensor:
    """Boundary radius (before normalisation) of each subject along directions ``phi`` ``(K, N)``."""
    cos = phi.cos().abs()
    sin = (phi.sin() / params["aspect"]).abs()
    exponent = params["exponent"]
    superellipse = (cos.pow(exponent) + sin.pow(exponent)).clamp_min(1e-12).pow(-1.0 / exponent)
    sector = 2 * math.pi / params["sides"]
    local = torch.remainder(phi, sector)
    polygon = torch.cos(sector / 2) / torch.cos(local - sector / 2)
    star = 1 - params["star_depth"] * (1 - (local / (sector / 2) - 1).abs())
    family = params["family"]
    return torch.where(family == 0, superellipse, torch.where(family == 1, polygon, star))


def _alpha(params: dict[str, torch.Tensor], u: torch.Tensor, v: torch.Tensor, edge: float) -> torch.Tensor:
    """Subject coverage at canonical points ``(K, N)``: a soft edge ``edge`` wide, hard when 0."""
    rho = torch.hypot(u, v)
    phi = torch.atan2(v, u) - params["rotation"]
    boundary = params["radius"] * _unit_radius(params, phi) / params["normaliser"]
    if edge == 0:
        return (rho <= boundary).float()
    return ((boundary - rho) / edge + 0.5).clamp(0.0, 1.0)


def _colour(params: dict[str, torch.Tensor], u: torch.Tensor, v: torch.Tensor, style: str = "textured") -> torch.Tensor:
    """Subject colour at canonical points ``(K, 3, N)``, defined over the whole frame, painted in
    ``style`` (see `SUBJECT_STYLES`)."""
    colours = params["colours"]  # (K, 2, 3, 1)
    angle = params["angle"]
    x = u * angle.cos() + v * angle.sin()
    if style == "plain":
        return colours[:, 0].expand(-1, -1, u.shape[1]).clone()
    if style == "two_tone":  # one straight boundary through the centre, a one-pixel-ish soft edge
        mix = torch.sigmoid(x * 80.0)[:, None]
        return colours[:, 0] * (1 - mix) + colours[:, 1] * mix
    y = -u * angle.sin() + v * angle.cos()
    omega = math.pi * params["frequency"]  # `frequency` cycles across the 2-unit frame
    wave_x = omega * x + params["phase0"]
    wave_y = omega * y + params["phase1"]
    stripes = wave_x.sin()
    checks = wave_x.sin() * wave_y.sin() * 2
    dots = wave_x.cos() + wave_y.cos() - 1
    direction = u[:, None] * params["wave_angle"].cos() + v[:, None] * params["wave_angle"].sin()
    marble = (omega[:, None] * params["wave_frequency"] * direction + params["wave_phase"]).sin().sum(1) / 2
    texture = params["texture"]
    pattern = torch.where(
        texture == 0, stripes, torch.where(texture == 1, checks, torch.where(texture == 2, dots, marble))
    )
    mix = torch.sigmoid(params["sharpness"] * pattern)[:, None]  # (K, 1, N)
    return colours[:, 0] * (1 - mix) + colours[:, 1] * mix


def _render(params: dict[str, torch.Tensor], size: int, style: str = "textured") -> torch.Tensor:
    """``(K, 4, size, size)`` canonical RGBA rasters of several subjects (parameters from `_pack`),
    painted in ``style``."""
    count = params["radius"].shape[0]
    centres = (torch.arange(size, dtype=torch.float32) + 0.5) * (2.0 / size) - 1.0
    v, u = torch.meshgrid(centres, centres, indexing="ij")
    u = u.reshape(1, -1).expand(count, -1)
    v = v.reshape(1, -1).expand(count, -1)
    alpha = _alpha(params, u, v, edge=2.0 / size)
    rgb = _colour(params, u, v, style)
    return torch.cat((rgb, alpha[:, None]), dim=1).reshape(count, 4, size, size)


def render_subject(identity: int, size: int, style: str = "textured") -> torch.Tensor:
    """Rasterises a subject's canonical frame as an RGBA image.

    Pixel ``(col, row)`` shows the canonical point ``u = 2 (col + 0.5) / size - 1``,
    ``v = 2 (row + 0.5) / size - 1``. The colour channels hold the subject's texture over the
    whole frame; the alpha channel is the subject's coverage (a one-pixel soft edge). Composite
    on a background with ``rgb * alpha + background * (1 - alpha)``.

    Args:
        identity: the subject's identity, an integer >= 0.
        size: side of the square raster in pixels, >= 1.
        style: how the subject is painted, one of `SUBJECT_STYLES`. Defaults to ``"textured"``.

    Returns:
        ``(4, size, size)`` float32 tensor in [0, 1]: RGB then alpha.

    Raises:
        ValueError: a bad ``identity``, ``size`` or ``style``.

    Example:
        >>> rgba = render_subject(5, 32)
        >>> rgba.shape, float(rgba[3, 16, 16]), float(rgba[3, 0, 0])  # centre inside, corner outside
        (torch.Size([4, 32, 32]), 1.0, 0.0)
        >>> on_white = rgba[:3] * rgba[3:] + (1 - rgba[3:])
        >>> plain = render_subject(5, 32, style="plain")
        >>> bool((plain[:3, 16, 16] == subject_descriptor(5).palette[0]).all())
        True
    """
    identity = check_int("identity", identity, minimum=0)
    size = check_int("size", size, minimum=1)
    return _render(_pack([_descriptor(identity)]), size, _check_style(style))[0]
