"""Synthetic ground truth for matching: random homographies and photometric changes (kornia).

Warping a real photo with a known homography gives a pair of images whose dense correspondence
is exact: a source point ``p`` lands at ``H p`` in the warped copy. `random_homographies` draws
the homographies, `warp_images` makes the warped copies (with seeded photometric changes),
`transform_points` and `inside` give the true target locations, and `pck` scores predicted
matches against them.

**Pixel convention.** Points are ``(x, y)`` in continuous pixel coordinates where pixel
``(col, row)`` covers ``[col, col + 1) × [row, row + 1)`` and its centre is
``(col + 0.5, row + 0.5)``; the image covers ``[0, W) × [0, H)``. This is the convention of
`TokenGrid` (``TokenGrid.token_to_pixel`` returns such centres). Homographies map source
points to target points in this convention. kornia's ``warp_perspective`` puts pixel centres at
integer coordinates instead; `warp_images` converts between the two, so that the warped image
and `transform_points` agree exactly.

Randomness comes only from the ``torch.Generator`` passed in (a fresh generator seeded with 0
when none is given), never from torch's global generator, so equal seeds give equal results.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
from kornia.enhance import (
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
)
from kornia.geometry.linalg import transform_points as _kornia_transform_points
from kornia.geometry.transform import get_perspective_transform, warp_perspective

from ..utils.checks import (
    check_floating,
    check_int,
    check_int_pair,
    check_real,
    check_shape,
    compute_dtype,
)

__all__ = [
    "PhotometricJitter",
    "inside",
    "pck",
    "random_homographies",
    "transform_points",
    "warp_images",
]

MAX_STRENGTH = 0.25
"""`random_homographies` requires ``strength < MAX_STRENGTH``: the warped corners then always
form a convex quadrilateral, so the homography is well defined and keeps orientation."""


def _generator(generator: torch.Generator | None) -> torch.Generator:
    if generator is None:
        return torch.Generator().manual_seed(0)
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"Expected `generator` to be a torch.Generator or None, but got {type(generator).__name__}.")
    return generator


@dataclass(frozen=True)
class PhotometricJitter:
    """Ranges of the photometric changes applied by `warp_images`.

    Each image gets its own values, drawn uniformly from the ranges below and applied in this
    order with kornia: brightness, contrast, saturation, hue, then Gaussian noise; the result is
    clipped to ``[0, 1]``. A zero range leaves that change out (the values are still drawn, so
    the random stream does not depend on the ranges).

    Args:
        brightness: additive offset drawn from ``[-brightness, brightness]``
            (``kornia.enhance.adjust_brightness``).
        contrast: multiplicative factor drawn from ``[1 - contrast, 1 + contrast]``
            (``kornia.enhance.adjust_contrast``), in ``[0, 1)``.
        saturation: factor drawn from ``[1 - saturation, 1 + saturation]``
            (``kornia.enhance.adjust_saturation``), in ``[0, 1)``.
        hue: shift drawn from ``[-hue, hue]`` in fractions of a full turn
            (``kornia.enhance.adjust_hue`` with ``2π · shift`` radians), in ``[0, 0.5]``.
        noise: standard deviation of additive Gaussian noise (images in ``[0, 1]``).

    Example:
        >>> PhotometricJitter(contrast=0.0, noise=0.05).noise
        0.05
    """

    brightness: float = 0.1
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.05
    noise: float = 0.02

    def __post_init__(self) -> None:
        object.__setattr__(self, "brightness", check_real("brightness", self.brightness, 0.0, 1.0))
        object.__setattr__(self, "contrast", check_real("contrast", self.contrast, 0.0, 1.0, high_inclusive=False))
        object.__setattr__(
            self, "saturation", check_real("saturation", self.saturation, 0.0, 1.0, high_inclusive=False)
        )
        object.__setattr__(self, "hue", check_real("hue", self.hue, 0.0, 0.5))
        object.__setattr__(self, "noise", check_real("noise", self.noise, 0.0, 1.0))


def _shift(offset: float, batch: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    matrix = torch.eye(3, dtype=dtype, device=device)
    matrix[0, 2] = matrix[1, 2] = offset
    return matrix.expand(batch, 3, 3)


def _to_kornia_frame(homographies: torch.Tensor) -> torch.Tensor:
    """The same map in kornia's frame, whose pixel centres sit at integer coordinates.

    A point ``p_k`` of kornia's frame is ``p_k + 0.5`` in ours, so the map is
    ``S(-0.5) @ H @ S(+0.5)`` with ``S(t)`` the translation by ``(t, t)``.
    """
    h64 = homographies.to(torch.float64)
    batch, device = h64.shape[0], h64.device
    return _shift(-0.5, batch, h64.dtype, device) @ h64 @ _shift(0.5, batch, h64.dtype, device)


def random_homographies(
    batch: int,
    height: int,
    width: int,
    strength: float = 0.15,
    generator: torch.Generator | None = None,
    *,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Random homographies that move each image corner by up to ``strength`` of the image size.

    The four corners ``(0, 0), (W, 0), (W, H), (0, H)`` of the source image are moved
    independently by offsets drawn uniformly from ``[-strength·W, strength·W]`` (x) and
    ``[-strength·H, strength·H]`` (y); the homography mapping the corners to their moved
    positions is solved with ``kornia.geometry.transform.get_perspective_transform`` (in
    float64). It maps source pixel coordinates ``(x, y)`` to target pixel coordinates in the
    convention of this module (pixel centres at ``col + 0.5``).

    Args:
        batch: number of homographies B (>= 1).
        height: image height H in pixels (>= 1).
        width: image width W in pixels (>= 1).
        strength: largest corner offset as a fraction of the image size, in ``[0, 0.25)``
            (below 0.25 the moved corners always form a convex quadrilateral); 0 gives the
            identity. Defaults to 0.15.
        generator: the random source, drawn on its device; defaults to a fresh generator seeded
            with 0.
        dtype: floating dtype of the result. Defaults to float32.

    Returns:
        ``(B, 3, 3)`` homographies on the generator's device.

    Example:
        >>> homographies = random_homographies(2, 64, 96, generator=torch.Generator().manual_seed(1))
        >>> homographies.shape
        torch.Size([2, 3, 3])
        >>> corners = torch.tensor([[[0.0, 0.0], [96.0, 0.0], [96.0, 64.0], [0.0, 64.0]]]).expand(2, 4, 2)
        >>> moved = transform_points(corners, homographies) - corners
        >>> bool((moved[..., 0].abs() <= 0.15 * 96 + 1e-3).all() and (moved[..., 1].abs() <= 0.15 * 64 + 1e-3).all())
        True
        >>> torch.allclose(random_homographies(1, 64, 64, strength=0.0), torch.eye(3)[None])
        True
    """
    batch = check_int("batch", batch, minimum=1)
    height = check_int("height", height, minimum=1)
    width = check_int("width", width, minimum=1)
    strength = check_real("strength", strength, 0.0, MAX_STRENGTH, high_inclusive=False)
    generator = _generator(generator)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"Expected `dtype` to be a floating torch.dtype, but got {dtype!r}.")
    device = generator.device
    corners = torch.tensor(
        [[0.0, 0.0], [width, 0.0], [width, height], [0.0, height]], dtype=torch.float64, device=device
    ).expand(batch, 4, 2)
    unit = torch.rand(batch, 4, 2, generator=generator, device=device, dtype=torch.float64) * 2 - 1
    scale = torch.tensor([strength * width, strength * height], dtype=torch.float64, device=device)
    homographies = get_perspective_transform(corners, corners + unit * scale)
    return (homographies / homographies[:, 2:, 2:]).to(dtype)


def _check_homographies(homographies: object, batch: int) -> torch.Tensor:
    check_shape("homographies", homographies, (batch, 3, 3), "(B, 3, 3)")
    check_floating("homographies", homographies)
    return homographies


def colour_jitter(images: torch.Tensor, jitter: PhotometricJitter, factors: torch.Tensor) -> torch.Tensor:
    """The colour part of `PhotometricJitter` (kornia brightness, contrast, saturation, hue) with
    given per-image ``factors`` in ``[-1, 1]`` (no sensor noise).

    Args:
        images: ``(B, 3, H, W)`` in ``[0, 1]``.
        jitter: the strengths.
        factors: ``(B, 4)``: brightness, contrast, saturation and hue draws in ``[-1, 1]``.

    Returns:
        ``(B, 3, H, W)`` in ``[0, 1]``.

    Example:
        >>> images = torch.full((2, 3, 4, 4), 0.5)
        >>> out = colour_jitter(images, PhotometricJitter(brightness=0.2), torch.tensor([[1.0, 0, 0, 0], [-1.0, 0, 0, 0]]))
        >>> out[:, 0, 0, 0]
        tensor([0.7000, 0.3000])
    """
    out = images
    if jitter.brightness:
        out = adjust_brightness(out, factors[:, 0] * jitter.brightness, clip_output=True)
    if jitter.contrast:
        out = adjust_contrast(out, 1 + factors[:, 1] * jitter.contrast, clip_output=True)
    if jitter.saturation:
        out = adjust_saturation(out, 1 + factors[:, 2] * jitter.saturation).clamp(0, 1)
    if jitter.hue:
        out = adjust_hue(out, factors[:, 3] * (2 * math.pi * jitter.hue)).clamp(0, 1)
    return out


def _photometric(images: torch.Tensor, jitter: PhotometricJitter, generator: torch.Generator) -> torch.Tensor:
    batch = images.shape[0]
    draws = torch.rand(batch, 4, generator=generator, device=generator.device, dtype=torch.float64) * 2 - 1
    noise = torch.randn(images.shape, generator=generator, device=generator.device, dtype=images.dtype)
    draws, noise = draws.to(images.device), noise.to(images.device)
    out = colour_jitter(images, jitter, draws.to(images.dtype))
    if jitter.noise:
        out = (out + noise * jitter.noise).clamp(0, 1)
    return out


def warp_images(
    images: torch.Tensor,
    homographies: torch.Tensor,
    photometric: bool | PhotometricJitter = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Warps images with homographies (same output size), then changes them photometrically.

    The warp is ``kornia.geometry.transform.warp_perspective`` (bilinear, zeros outside the
    source) with the homographies converted from this module's pixel convention to kornia's, so
    that the content at source point ``p`` appears at ``transform_points(p, homographies)`` in
    the result. Target pixels that see no source pixel are 0. The photometric changes follow
    `PhotometricJitter`, with one draw per image from ``generator``.

    Args:
        images: ``(B, C, H, W)`` floating images; with photometric changes ``C`` must be 3 (RGB)
            and values must lie in ``[0, 1]``.
        homographies: ``(B, 3, 3)`` floating source→target homographies in pixel coordinates
            (for example from `random_homographies`).
        photometric: ``True`` for the default `PhotometricJitter`, ``False`` for none, or a
            `PhotometricJitter` with other ranges. Defaults to True.
        generator: the random source of the photometric changes, drawn on its device; defaults
            to a fresh generator seeded with 0. Not used when ``photometric`` is False.

    Returns:
        ``(B, C, H, W)`` warped images, dtype and device of ``images``.

    Example:
        >>> images = torch.rand(1, 3, 4, 6)
        >>> flip = torch.tensor([[[-1.0, 0.0, 6.0], [0.0, -1.0, 4.0], [0.0, 0.0, 1.0]]])  # (x, y) → (W - x, H - y)
        >>> warped = warp_images(images, flip, photometric=False)
        >>> torch.allclose(warped, images.flip(-1, -2), atol=1e-5)
        True
        >>> transform_points(torch.tensor([[[0.5, 0.5]]]), flip)  # centre of pixel (0, 0) → pixel (5, 3)
        tensor([[[5.5000, 3.5000]]])
    """
    check_shape("images", images, (None, None, None, None), "(B, C, H, W)")
    check_floating("images", images)
    batch, channels, height, width = images.shape
    homographies = _check_homographies(homographies, batch)
    if isinstance(photometric, bool):
        jitter = PhotometricJitter() if photometric else None
    elif isinstance(photometric, PhotometricJitter):
        jitter = photometric
    else:
        raise ValueError(
            f"Expected `photometric` to be a bool or a PhotometricJitter, but got {type(photometric).__name__}."
        )
    if jitter is not None:
        if channels != 3:
            raise ValueError(f"Expected `images` with 3 (RGB) channels for photometric changes, but got {channels}.")
        if images.numel() and (float(images.min()) < 0 or float(images.max()) > 1):
            raise ValueError(
                f"Expected `images` in [0, 1] for photometric changes, but got values in "
                f"[{float(images.min()):.4g}, {float(images.max()):.4g}]."
            )
        generator = _generator(generator)
    if batch == 0:
        return images.clone()
    kornia_homographies = _to_kornia_frame(homographies).to(device=images.device, dtype=images.dtype)
    warped = warp_perspective(
        images, kornia_homographies, dsize=(height, width), mode="bilinear", padding_mode="zeros", align_corners=True
    )
    if jitter is None:
        return warped
    return _photometric(warped, jitter, generator)


def transform_points(points: torch.Tensor, homographies: torch.Tensor) -> torch.Tensor:
    """Maps points through homographies (``kornia.geometry.linalg.transform_points``).

    Args:
        points: ``(B, N, 2)`` floating ``(x, y)`` points.
        homographies: ``(B, 3, 3)`` floating homographies.

    Returns:
        ``(B, N, 2)`` mapped points, in the promoted dtype of the two inputs.

    Example:
        >>> shift = torch.tensor([[[1.0, 0.0, 2.0], [0.0, 1.0, -1.0], [0.0, 0.0, 1.0]]])
        >>> transform_points(torch.tensor([[[0.5, 0.5], [3.0, 4.0]]]), shift)
        tensor([[[ 2.5000, -0.5000],
                 [ 5.0000,  3.0000]]])
    """
    check_shape("points", points, (None, None, 2), "(B, N, 2)")
    check_floating("points", points)
    homographies = _check_homographies(homographies, points.shape[0])
    dtype = torch.promote_types(points.dtype, homographies.dtype)
    if points.shape[0] == 0 or points.shape[1] == 0:
        return points.to(dtype)
    return _kornia_transform_points(homographies.to(device=points.device, dtype=dtype), points.to(dtype))


def inside(points: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Which points lie inside an image: ``0 <= x < width`` and ``0 <= y < height``.

    Args:
        points: ``(..., 2)`` ``(x, y)`` pixel points, typically ``(B, N, 2)``.
        height: image height H in pixels (>= 1).
        width: image width W in pixels (>= 1).

    Returns:
        ``(...)`` bool, typically ``(B, N)``.

    Example:
        >>> inside(torch.tensor([[[0.0, 0.0], [63.9, 31.0], [64.0, 1.0], [-0.1, 5.0]]]), 32, 64)
        tensor([[ True,  True, False, False]])
    """
    if not isinstance(points, torch.Tensor) or points.ndim == 0 or points.shape[-1] != 2:
        shape = tuple(points.shape) if isinstance(points, torch.Tensor) else type(points).__name__
        raise ValueError(f"Expected `points` of shape (..., 2) holding (x, y), but got {shape}.")
    height = check_int("height", height, minimum=1)
    width = check_int("width", width, minimum=1)
    x, y = points[..., 0], points[..., 1]
    return (x >= 0) & (x < width) & (y >= 0) & (y < height)


def pck(
    predicted: torch.Tensor,
    truth: torch.Tensor,
    valid: torch.Tensor,
    alpha: float,
    image_size: tuple[int, int],
) -> torch.Tensor:
    """Percentage of correct keypoints: the share of valid points within ``alpha · max(H, W)``.

    A point counts as correct when the Euclidean distance between its predicted and true
    location is at most ``alpha * max(H, W)`` pixels. Only points with ``valid`` set count, in
    all images of the batch together.

    Args:
        predicted: ``(B, N, 2)`` floating predicted ``(x, y)`` pixel locations.
        truth: ``(B, N, 2)`` floating true ``(x, y)`` pixel locations.
        valid: ``(B, N)`` bool, the points that count (for example matches that were kept and
            whose true location lies `inside` the target image); at least one must be set.
        alpha: the threshold as a fraction of the longer image side, > 0 (0.05 and 0.10 are
            usual).
        image_size: ``(H, W)`` of the image the points live in.

    Returns:
        A 0-dim floating tensor in ``[0, 1]`` (float32, float64 for float64 inputs).

    Raises:
        ValueError: on bad shapes, a bad ``alpha`` or ``image_size``, or when no point is valid.

    Example:
        >>> truth = torch.tensor([[[10.0, 10.0], [20.0, 20.0], [30.0, 30.0], [40.0, 40.0]]])
        >>> predicted = truth + torch.tensor([[[0.0, 0.0], [3.0, 4.0], [6.0, 8.0], [90.0, 0.0]]])  # errors 0, 5, 10, 90
        >>> valid = torch.tensor([[True, True, True, False]])
        >>> pck(predicted, truth, valid, alpha=0.05, image_size=(100, 100))  # threshold 5 px
        tensor(0.6667)
    """
    check_shape("predicted", predicted, (None, None, 2), "(B, N, 2)")
    check_floating("predicted", predicted)
    batch, num = predicted.shape[:2]
    check_shape("truth", truth, (batch, num, 2), "(B, N, 2)")
    check_floating("truth", truth)
    check_shape("valid", valid, (batch, num), "(B, N)")
    if valid.dtype != torch.bool:
        raise ValueError(f"Expected `valid` to have dtype torch.bool, but got {valid.dtype}.")
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"Expected `alpha` to be a finite number > 0, but got {alpha!r}.")
    height, width = check_int_pair("image_size", image_size)
    count = int(valid.sum())
    if count == 0:
        raise ValueError(f"Expected `valid` to mark at least one point, but got none of {batch * num}.")
    dtype = compute_dtype(torch.promote_types(predicted.dtype, truth.dtype))
    valid = valid.to(predicted.device)
    error = torch.linalg.vector_norm(predicted.to(dtype) - truth.to(device=predicted.device, dtype=dtype), dim=-1)
    correct = (error <= alpha * max(height, width)) & valid
    return correct.sum().to(dtype) / count
