"""Synthetic ground truth: random homographies, warps, point transforms and PCK."""

import itertools
import math

import pytest
import torch
from kornia.geometry.transform import warp_perspective

from mosaic_kit.correspondence.synthetic import (
    PhotometricJitter,
    inside,
    pck,
    random_homographies,
    transform_points,
    warp_images,
)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _blob(height: int, width: int, centre: tuple[float, float], sigma: float) -> torch.Tensor:
    """A Gaussian blob sampled at the pixel centres (col + 0.5, row + 0.5): ``(H, W)``."""
    ys = torch.arange(height, dtype=torch.float64) + 0.5
    xs = torch.arange(width, dtype=torch.float64) + 0.5
    d2 = (xs[None, :] - centre[0]) ** 2 + (ys[:, None] - centre[1]) ** 2
    return torch.exp(-d2 / (2 * sigma**2))


def _centroid(image: torch.Tensor) -> torch.Tensor:
    """Intensity-weighted centroid ``(x, y)`` of an ``(H, W)`` image, at pixel centres."""
    height, width = image.shape
    ys = torch.arange(height, dtype=image.dtype) + 0.5
    xs = torch.arange(width, dtype=image.dtype) + 0.5
    total = image.sum()
    return torch.stack(((image.sum(0) * xs).sum() / total, (image.sum(1) * ys).sum() / total))


def _corners(height: int, width: int, batch: int) -> torch.Tensor:
    return torch.tensor([[0.0, 0.0], [width, 0.0], [width, height], [0.0, height]], dtype=torch.float64).expand(
        batch, 4, 2
    )


# ------------------------------------------------------------------------------ determinism
def test_equal_seeds_give_equal_results_and_the_global_generator_is_untouched():
    images = torch.rand(3, 3, 24, 32, generator=_generator(9))
    torch.manual_seed(123)
    state = torch.get_rng_state()
    h1 = random_homographies(3, 24, 32, generator=_generator(4))
    h2 = random_homographies(3, 24, 32, generator=_generator(4))
    w1 = warp_images(images, h1, generator=_generator(5))
    w2 = warp_images(images, h2, generator=_generator(5))
    assert torch.equal(h1, h2) and torch.equal(w1, w2)
    assert torch.equal(torch.get_rng_state(), state)
    assert not torch.equal(h1, random_homographies(3, 24, 32, generator=_generator(6)))
    assert not torch.equal(w1, warp_images(images, h1, generator=_generator(7)))
    # No generator: a fresh one seeded with 0.
    assert torch.equal(random_homographies(2, 24, 32), random_homographies(2, 24, 32, generator=_generator(0)))
    assert torch.equal(warp_images(images, h1), warp_images(images, h1, generator=_generator(0)))


def test_strength_zero_is_the_identity():
    homographies = random_homographies(4, 20, 30, strength=0.0, generator=_generator(1), dtype=torch.float64)
    torch.testing.assert_close(homographies, torch.eye(3, dtype=torch.float64).expand(4, 3, 3))
    images = torch.rand(4, 3, 20, 30, generator=_generator(2))
    torch.testing.assert_close(warp_images(images, homographies.float(), photometric=False), images, atol=1e-5, rtol=0)


@pytest.mark.parametrize("strength", [0.05, 0.15, 0.2])
def test_corners_move_by_at_most_strength_of_the_size(strength):
    height, width = 48, 80
    homographies = random_homographies(64, height, width, strength, generator=_generator(3), dtype=torch.float64)
    corners = _corners(height, width, 64)
    moved = transform_points(corners, homographies) - corners
    assert float(moved[..., 0].abs().max()) <= strength * width + 1e-6
    assert float(moved[..., 1].abs().max()) <= strength * height + 1e-6
    # The offsets use the whole range, in both directions.
    assert float(moved[..., 0].abs().max()) > 0.9 * strength * width
    assert float(moved[..., 0].min()) < 0 < float(moved[..., 0].max())


def test_corner_boxes_below_the_strength_limit_always_give_convex_quadrilaterals():
    # The turn at each corner is linear in each of the corners involved, so its extremes over
    # the boxes of allowed offsets are at box vertices: checking all of them proves convexity.
    strength, height, width = 0.2499, 1.0, 1.0
    base = _corners(height, width, 1)[0]
    signs = torch.tensor(list(itertools.product((-1.0, 1.0), repeat=8)), dtype=torch.float64).view(-1, 4, 2)
    quads = base + signs * strength
    edges = quads.roll(-1, dims=1) - quads
    turns = edges[:, :, 0] * edges.roll(-1, dims=1)[:, :, 1] - edges[:, :, 1] * edges.roll(-1, dims=1)[:, :, 0]
    assert bool((turns > 0).all())


# ------------------------------------------------------------------------------ exactness
def test_pixel_permuting_warps_are_exact():
    images = torch.rand(2, 3, 8, 8, generator=_generator(11))
    flip = torch.tensor([[-1.0, 0.0, 8.0], [0.0, -1.0, 8.0], [0.0, 0.0, 1.0]]).expand(2, 3, 3)
    transpose = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]).expand(2, 3, 3)
    mirror = torch.tensor([[-1.0, 0.0, 8.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]).expand(2, 3, 3)
    shift = torch.tensor([[1.0, 0.0, 3.0], [0.0, 1.0, -2.0], [0.0, 0.0, 1.0]]).expand(2, 3, 3)
    torch.testing.assert_close(warp_images(images, flip, photometric=False), images.flip(-1, -2), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        warp_images(images, transpose, photometric=False), images.transpose(-1, -2), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(warp_images(images, mirror, photometric=False), images.flip(-1), atol=1e-5, rtol=0)
    shifted = torch.zeros_like(images)
    shifted[..., : 8 - 2, 3:] = images[..., 2:, : 8 - 3]
    torch.testing.assert_close(warp_images(images, shift, photometric=False), shifted, atol=1e-5, rtol=0)
    # And the points agree: the centre of pixel (col 1, row 2) goes to pixel (col 6, row 5) under the flip.
    torch.testing.assert_close(
        transform_points(torch.tensor([[[1.5, 2.5]]]), flip[:1]), torch.tensor([[[6.5, 5.5]]])
    )


def test_a_single_bright_pixel_lands_where_transform_points_says():
    # A 3× magnification about the origin; kornia's own frame (pixel centres at integers) would
    # put the pixel 1 px away, so this test tells the two conventions apart.
    height = width = 32
    scale3 = torch.tensor([[[3.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0]]], dtype=torch.float64)
    image = torch.zeros(1, 1, height, width, dtype=torch.float64)
    col, row = 4, 6
    image[0, 0, row, col] = 1.0
    expected = transform_points(torch.tensor([[[col + 0.5, row + 0.5]]], dtype=torch.float64), scale3)[0, 0]
    warped = warp_images(image, scale3, photometric=False)[0, 0]
    assert float((_centroid(warped) - expected).norm()) < 1e-6
    naive = warp_perspective(image, scale3, dsize=(height, width), align_corners=True)[0, 0]
    assert abs(float((_centroid(naive) - expected).norm()) - math.sqrt(2)) < 1e-6  # off by (1, 1) px


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_blobs_land_where_transform_points_says_under_random_homographies(seed):
    height, width, sigma = 64, 80, 1.5
    homography = random_homographies(1, height, width, strength=0.2, generator=_generator(seed), dtype=torch.float64)
    # Blob centres well inside the source whose images are well inside the target.
    centres = torch.tensor([[[28.3, 24.7], [40.0, 32.0], [51.5, 39.2], [33.9, 38.1]]], dtype=torch.float64)
    expected = transform_points(centres, homography)[0]
    for centre, target in zip(centres[0], expected):
        assert bool(inside(target[None, None] - 8, height - 16, width - 16))
        image = _blob(height, width, tuple(centre.tolist()), sigma)[None, None]
        warped = warp_images(image, homography, photometric=False)[0, 0]
        assert float((_centroid(warped) - target).norm()) < 0.25  # 0.14 at worst over 50 seeds


# ------------------------------------------------------------------------------ photometric
def test_photometric_changes_stay_in_range_and_only_change_colours():
    images = torch.rand(4, 3, 16, 16, generator=_generator(1))
    homographies = random_homographies(4, 16, 16, generator=_generator(2))
    plain = warp_images(images, homographies, photometric=False)
    changed = warp_images(images, homographies, photometric=True, generator=_generator(3))
    assert changed.shape == images.shape and changed.dtype == images.dtype
    assert float(changed.min()) >= 0 and float(changed.max()) <= 1
    assert float((changed - plain).abs().mean()) > 0.01
    nothing = PhotometricJitter(brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0, noise=0.0)
    torch.testing.assert_close(warp_images(images, homographies, photometric=nothing), plain)
    # Brightness alone shifts each image by its own constant (before clipping).
    mid = torch.full((4, 3, 16, 16), 0.5)
    identity = torch.eye(3).expand(4, 3, 3)
    bright = warp_images(mid, identity, PhotometricJitter(0.1, 0.0, 0.0, 0.0, 0.0), generator=_generator(4))
    offsets = (bright - 0.5).flatten(1)
    torch.testing.assert_close(offsets, offsets[:, :1].expand_as(offsets), atol=1e-5, rtol=0)
    assert float(offsets.abs().max()) <= 0.1 + 1e-6 and len(set(offsets[:, 0].tolist())) == 4


# ------------------------------------------------------------------------------ points and pck
def test_transform_points_and_inside():
    homographies = random_homographies(2, 30, 40, generator=_generator(8), dtype=torch.float64)
    points = torch.rand(2, 5, 2, generator=_generator(9), dtype=torch.float64) * 40
    homogeneous = torch.cat((points, torch.ones(2, 5, 1, dtype=torch.float64)), -1) @ homographies.transpose(1, 2)
    torch.testing.assert_close(transform_points(points, homographies), homogeneous[..., :2] / homogeneous[..., 2:])
    assert transform_points(points.float(), homographies).dtype == torch.float64
    edge = torch.tensor([[[0.0, 0.0], [39.999, 29.999], [40.0, 0.0], [0.0, 30.0], [-1e-4, 3.0], [3.0, -1e-4]]])
    assert inside(edge, 30, 40).tolist() == [[True, True, False, False, False, False]]


def test_pck_exact_values():
    truth = torch.zeros(2, 3, 2)
    # errors: image 0: 0, 5, 10; image 1: 10, 10.01, 20
    predicted = torch.tensor([[[0.0, 0.0], [3.0, 4.0], [6.0, 8.0]], [[10.0, 0.0], [0.0, 10.01], [12.0, 16.0]]])
    valid = torch.ones(2, 3, dtype=torch.bool)
    assert float(pck(predicted, truth, valid, 0.05, (200, 200))) == pytest.approx(4 / 6)  # 10 px, inclusive
    assert float(pck(predicted, truth, valid, 0.10, (200, 200))) == pytest.approx(1.0)
    assert float(pck(predicted, truth, valid, 0.05, (100, 200))) == pytest.approx(4 / 6)  # max(H, W)
    assert float(pck(predicted, truth, valid, 0.05, (200, 100))) == pytest.approx(4 / 6)
    assert float(pck(predicted, truth, valid, 0.025, (200, 100))) == pytest.approx(2 / 6)  # 5 px
    assert float(pck(predicted, truth, valid, 0.001, (200, 100))) == pytest.approx(1 / 6)  # 0.2 px
    # Invalid points do not count, even when their prediction is garbage.
    predicted[1, 2] = float("nan")
    valid[1, 2] = False
    valid[0, 0] = False
    assert float(pck(predicted, truth, valid, 0.05, (200, 200))) == pytest.approx(3 / 4)
    assert pck(predicted.double(), truth.double(), valid, 0.05, (200, 200)).dtype == torch.float64


# ------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("call", "argument"),
    [
        (lambda: random_homographies(0, 8, 8), "batch"),
        (lambda: random_homographies(1, 0, 8), "height"),
        (lambda: random_homographies(1, 8, 8.0), "width"),
        (lambda: random_homographies(1, 8, 8, strength=0.25), "strength"),
        (lambda: random_homographies(1, 8, 8, strength=-0.1), "strength"),
        (lambda: random_homographies(1, 8, 8, generator=0), "generator"),
        (lambda: random_homographies(1, 8, 8, dtype=torch.long), "dtype"),
        (lambda: warp_images(torch.rand(3, 8, 8), torch.eye(3)[None]), "images"),
        (lambda: warp_images(torch.rand(2, 3, 8, 8), torch.eye(3)[None]), "homographies"),
        (lambda: warp_images(torch.rand(1, 3, 8, 8), torch.eye(3)[None].long()), "homographies"),
        (lambda: warp_images(torch.rand(1, 1, 8, 8), torch.eye(3)[None]), "images"),
        (lambda: warp_images(torch.rand(1, 3, 8, 8) * 2, torch.eye(3)[None]), "images"),
        (lambda: warp_images(torch.rand(1, 3, 8, 8), torch.eye(3)[None], photometric="yes"), "photometric"),
        (lambda: PhotometricJitter(contrast=1.0), "contrast"),
        (lambda: PhotometricJitter(hue=-0.1), "hue"),
        (lambda: transform_points(torch.rand(2, 4, 3), torch.eye(3).expand(2, 3, 3)), "points"),
        (lambda: transform_points(torch.rand(2, 4, 2), torch.eye(3).expand(3, 3, 3)), "homographies"),
        (lambda: inside(torch.rand(2, 4, 3), 8, 8), "points"),
        (lambda: inside(torch.rand(2, 4, 2), 0, 8), "height"),
        (lambda: pck(torch.rand(1, 4, 2), torch.rand(1, 3, 2), torch.ones(1, 4, dtype=torch.bool), 0.1, (8, 8)), "truth"),
        (lambda: pck(torch.rand(1, 4, 2), torch.rand(1, 4, 2), torch.ones(1, 4), 0.1, (8, 8)), "valid"),
        (lambda: pck(torch.rand(1, 4, 2), torch.rand(1, 4, 2), torch.ones(4, dtype=torch.bool), 0.1, (8, 8)), "valid"),
        (lambda: pck(torch.rand(4, 2), torch.rand(4, 2), torch.ones(4, dtype=torch.bool), 0.1, (8, 8)), "predicted"),
        (lambda: pck(torch.rand(1, 4, 2), torch.rand(1, 4, 2), torch.ones(1, 4, dtype=torch.bool), 0.0, (8, 8)), "alpha"),
        (lambda: pck(torch.rand(1, 4, 2), torch.rand(1, 4, 2), torch.ones(1, 4, dtype=torch.bool), 0.1, 8), "image_size"),
        (lambda: pck(torch.rand(1, 4, 2), torch.rand(1, 4, 2), torch.zeros(1, 4, dtype=torch.bool), 0.1, (8, 8)), "valid"),
    ],
)
def test_bad_input_raises_naming_the_argument(call, argument):
    with pytest.raises(ValueError, match=f"`{argument}"):
        call()
