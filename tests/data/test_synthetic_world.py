"""The synthetic multi-subject world: exact correspondences, determinism, K, splits, masks, errors."""

import statistics
import time

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from mosaic_kit.correspondence import PhotometricJitter
from mosaic_kit.data.sample import MultiSubjectSample
from mosaic_kit.data.synthetic_world import (
    HELD_OUT_IDENTITIES,
    MAX_SUBJECTS,
    SHAPE_FAMILIES,
    SUBJECT_COLOURS,
    TEXTURES,
    TRAIN_IDENTITIES,
    SyntheticDataset,
    SyntheticWorld,
    SyntheticWorldConfig,
    render_subject,
    save_example_sheet,
    subject_descriptor,
)
from mosaic_kit.data.synthetic_world.world import _grid_shape

NO_JITTER = PhotometricJitter(brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0, noise=0.0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread, as in a DataLoader worker: samples are many tiny operations, and extra
    threads only slow them down on a busy shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _bilinear(image: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Colours ``(P, C)`` of a ``(C, H, W)`` image at ``(P, 2)`` points (pixel centres at +0.5)."""
    height, width = image.shape[-2:]
    grid = torch.stack((points[:, 0] / width * 2 - 1, points[:, 1] / height * 2 - 1), dim=-1)
    return F.grid_sample(image[None], grid[None, None], mode="bilinear", align_corners=False)[0, :, 0].T


def _eroded(mask: torch.Tensor, radius: int) -> torch.Tensor:
    outside = (~mask).float()[None, None]
    return ~F.max_pool2d(outside, 2 * radius + 1, stride=1, padding=radius)[0, 0].bool()


def _at(mask: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    return mask[points[:, 1].long(), points[:, 0].long()]


def _homogeneous(points: torch.Tensor) -> torch.Tensor:
    return torch.cat((points, torch.ones(len(points), 1, dtype=points.dtype)), dim=1)


def _assert_equal_samples(first: MultiSubjectSample, second: MultiSubjectSample) -> None:
    assert first.sample_id == second.sample_id and first.caption == second.caption
    assert torch.equal(first.target, second.target)
    for name in ("references", "pairs", "target_masks", "reference_masks"):
        assert len(getattr(first, name)) == len(getattr(second, name))
        for a, b in zip(getattr(first, name), getattr(second, name)):
            assert torch.equal(a, b), name
    assert first.meta.keys() == second.meta.keys()
    for key, value in first.meta.items():
        other = second.meta[key]
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, other), key
        elif key == "canonical_points":
            assert all(torch.equal(a, b) for a, b in zip(value, other))
        else:
            assert value == other, key


# ------------------------------------------------------------------------------ exactness
def _colour_errors(world: SyntheticWorld, shift: float, samples: int = 8) -> torch.Tensor:
    """Largest channel difference between ref and target colours at interior pairs."""
    errors = []
    for index in range(samples):
        sample = world.sample(index, num_refs=3)
        for k, pairs in enumerate(sample.pairs):
            interior = _at(_eroded(sample.reference_masks[k], 2), pairs[:, :2]) & _at(
                _eroded(sample.target_masks[k], 2), pairs[:, 2:]
            )
            pairs = pairs[interior]
            on_ref = _bilinear(sample.references[k], pairs[:, :2])
            on_target = _bilinear(sample.target, pairs[:, 2:] + shift)
            errors.append((on_ref - on_target).abs().amax(dim=1))
    return torch.cat(errors)


def test_colours_agree_at_corresponding_points_and_disagree_half_a_pixel_off():
    world = SyntheticWorld(SyntheticWorldConfig(ref_jitter=NO_JITTER, seed=5))
    exact = _colour_errors(world, 0.0)
    shifted = _colour_errors(world, 0.5)
    assert len(exact) > 500
    # Interpolation of the textures is the only difference: small on average, and clearly
    # smaller than with target points half a pixel off.
    assert float(exact.mean()) < 0.04 and float(exact.median()) < 0.02
    assert float(shifted.mean()) > 3 * float(exact.mean())


def test_pixels_are_the_canonical_raster_sampled_through_the_known_transforms():
    config = SyntheticWorldConfig(ref_jitter=NO_JITTER, seed=2)
    sample = SyntheticWorld(config).sample(1, num_refs=3)
    size = config.canonical_size
    checked = 0
    for k in range(3):
        raster = render_subject(sample.meta["identities"][k], size)[:3]
        for image, mask, transform in (
            (sample.references[k], sample.reference_masks[k], sample.meta["reference_transforms"][k]),
            (sample.target, sample.target_masks[k], sample.meta["target_transforms"][k]),
        ):
            rows, cols = torch.nonzero(_eroded(mask, 1), as_tuple=True)
            centres = torch.stack((cols, rows), dim=1).double() + 0.5
            canonical = (_homogeneous(centres) @ torch.linalg.inv(transform).T)[:, :2]
            truth = _bilinear(raster, ((canonical + 1) / 2 * size).float())
            torch.testing.assert_close(image[:, rows, cols].T, truth, atol=1e-4, rtol=0)
            checked += len(rows)
    assert checked > 300


def test_known_transforms_map_reference_points_to_target_points():
    world = SyntheticWorld(SyntheticWorldConfig(seed=11))
    for index in range(5):
        sample = world.sample(index)
        to_ref, to_target = sample.meta["reference_transforms"], sample.meta["target_transforms"]
        for k, pairs in enumerate(sample.pairs):
            ref_to_target = to_target[k] @ torch.linalg.inv(to_ref[k])
            mapped = (_homogeneous(pairs[:, :2].double()) @ ref_to_target.T)[:, :2]
            torch.testing.assert_close(mapped, pairs[:, 2:].double(), atol=1e-4, rtol=0)
            canonical = _homogeneous(sample.meta["canonical_points"][k].double())
            torch.testing.assert_close((canonical @ to_ref[k].T)[:, :2], pairs[:, :2].double(), atol=1e-4, rtol=0)
            torch.testing.assert_close((canonical @ to_target[k].T)[:, :2], pairs[:, 2:].double(), atol=1e-4, rtol=0)
            # Similarity transforms: rotation and uniform scale only.
            linear = to_target[k][:2, :2]
            torch.testing.assert_close(linear @ linear.T / linear.det(), torch.eye(2, dtype=torch.float64))


# ------------------------------------------------------------------------------ masks
def test_pairs_lie_in_the_masks_and_visible_regions_do_not_overlap():
    world = SyntheticWorld(SyntheticWorldConfig(seed=3))
    occluded = 0
    for index in range(20):
        sample = world.sample(index, num_refs=4)
        for k, pairs in enumerate(sample.pairs):
            assert len(pairs) > 0
            assert bool(_at(sample.target_masks[k], pairs[:, 2:]).all())
            assert bool(_at(sample.reference_masks[k], pairs[:, :2]).all())
            assert sample.target_masks[k].shape == (64, 64) and sample.reference_masks[k].shape == (32, 32)
        coverage = torch.stack(sample.target_masks).sum(0)
        assert int(coverage.max()) <= 1
        occluded += int((sample.meta["visible_fraction"] < 0.98).sum())
    assert occluded > 0  # the default world does occlude


def test_without_occlusion_every_subject_is_fully_visible():
    config = SyntheticWorldConfig(occlusion=0.0, layout_jitter=0.0, target_scale_range=(0.8, 1.0), seed=4)
    world = SyntheticWorld(config)
    for index in range(10):
        sample = world.sample(index, num_refs=5)
        torch.testing.assert_close(sample.meta["visible_fraction"], torch.ones(5))


def test_occluded_points_have_no_pairs():
    world = SyntheticWorld(SyntheticWorldConfig(occlusion=0.6, seed=8))
    checked = 0
    for index in range(10):
        sample = world.sample(index, num_refs=4)
        order = sample.meta["paint_order"]
        for k, pairs in enumerate(sample.pairs):
            for j in range(4):
                if order[j] > order[k]:  # subject j is painted over subject k
                    hidden = _at(sample.target_masks[j], pairs[:, 2:])
                    assert not bool(hidden.any())
                    checked += 1
    assert checked > 0


# ------------------------------------------------------------------------------ determinism
def test_same_seed_and_index_give_identical_samples_and_the_global_generator_is_untouched():
    config = SyntheticWorldConfig(seed=7, max_refs=5)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    for index in (0, 1, 17):
        _assert_equal_samples(SyntheticWorld(config).sample(index), SyntheticWorld(config).sample(index))
    assert torch.equal(torch.get_rng_state(), state)


def test_different_seeds_and_indices_differ():
    first = SyntheticWorld(SyntheticWorldConfig(seed=0)).sample(0, num_refs=3)
    other_seed = SyntheticWorld(SyntheticWorldConfig(seed=1)).sample(0, num_refs=3)
    other_index = SyntheticWorld(SyntheticWorldConfig(seed=0)).sample(1, num_refs=3)
    for other in (other_seed, other_index):
        assert not torch.equal(first.target, other.target)
        assert first.meta["identities"] != other.meta["identities"]


def test_subjects_depend_only_on_identity():
    assert torch.equal(render_subject(42, 24), render_subject(42, 24))
    assert not torch.equal(render_subject(42, 24), render_subject(43, 24))
    descriptors = [subject_descriptor(i) for i in range(300)]
    assert {d.shape for d in descriptors} == set(SHAPE_FAMILIES)
    assert {d.texture for d in descriptors} == set(TEXTURES)
    assert len({d.name for d in descriptors}) > 150


# ------------------------------------------------------------------------------ K and splits
@pytest.mark.parametrize("num_refs", [1, 2, 3, 4, 5, 6, 9])
def test_requested_number_of_references_is_honoured(num_refs):
    sample = SyntheticWorld(SyntheticWorldConfig(max_refs=2)).sample(3, num_refs=num_refs)
    assert sample.num_refs == num_refs
    assert len(sample.pairs) == len(sample.target_masks) == len(sample.reference_masks) == num_refs
    assert len(set(sample.meta["identities"])) == num_refs
    assert len(sample.meta["names"]) == num_refs and all(name in sample.caption for name in sample.meta["names"])


def test_drawn_number_of_references_covers_the_configured_range():
    world = SyntheticWorld(SyntheticWorldConfig(min_refs=2, max_refs=5))
    counts = {world.sample(index).num_refs for index in range(60)}
    assert counts == {2, 3, 4, 5}
    # Giving the drawn K changes nothing else.
    drawn = world.sample(9)
    _assert_equal_samples(drawn, world.sample(9, num_refs=drawn.num_refs))


def test_held_out_identities_are_disjoint_from_training_identities():
    assert TRAIN_IDENTITIES[1] <= HELD_OUT_IDENTITIES[0]
    train = SyntheticWorld(SyntheticWorldConfig(identity_range=TRAIN_IDENTITIES))
    held_out = SyntheticWorld(SyntheticWorldConfig(identity_range=HELD_OUT_IDENTITIES))
    train_ids = {i for index in range(30) for i in train.sample(index).meta["identities"]}
    held_ids = {i for index in range(30) for i in held_out.sample(index).meta["identities"]}
    assert all(TRAIN_IDENTITIES[0] <= i < TRAIN_IDENTITIES[1] for i in train_ids)
    assert all(HELD_OUT_IDENTITIES[0] <= i < HELD_OUT_IDENTITIES[1] for i in held_ids)
    assert not train_ids & held_ids
    small = SyntheticWorld(SyntheticWorldConfig(identity_range=(10, 14), max_refs=4))
    assert sorted(small.sample(0, num_refs=4).meta["identities"]) == [10, 11, 12, 13]


# ------------------------------------------------------------------------------ subjects
def test_rendered_colours_lie_between_the_two_palette_colours():
    for identity in (0, 1, 2, 3, 1_000_123):
        rgba = render_subject(identity, 48)
        low, high = subject_descriptor(identity).palette
        pixels = rgba[:3].reshape(3, -1).T
        direction = high - low
        t = ((pixels - low) @ direction / direction.dot(direction)).clamp(0, 1)
        distance = (pixels - (low + t[:, None] * direction)).norm(dim=1)
        assert float(distance.max()) < 1e-4
        assert 0.0 < float(rgba[3].mean()) < 0.75  # a subject, not the whole frame
        assert subject_descriptor(identity).colour_names[0] != "white"
        assert set(subject_descriptor(identity).colour_names) <= set(SUBJECT_COLOURS)


def test_render_subject_soft_edge_and_range():
    rgba = render_subject(9, 64)
    assert rgba.shape == (4, 64, 64) and rgba.dtype == torch.float32
    assert float(rgba.min()) >= 0 and float(rgba.max()) <= 1
    edge = ((rgba[3] > 0) & (rgba[3] < 1)).sum()
    assert 0 < int(edge) < int((rgba[3] == 1).sum())


# ------------------------------------------------------------------------------ properties
@given(
    seed=st.integers(0, 2**40),
    index=st.integers(0, 2**31),
    num_refs=st.integers(1, 8),
    sizes=st.sampled_from([(16, 8), (32, 16), (64, 32), (48, 40)]),
    occlusion=st.floats(0.0, 1.0),
)
def test_any_seed_and_k_give_a_valid_sample(seed, index, num_refs, sizes, occlusion):
    image_size, ref_size = sizes
    config = SyntheticWorldConfig(image_size=image_size, ref_size=ref_size, seed=seed, occlusion=occlusion)
    sample = SyntheticWorld(config).sample(index, num_refs=num_refs)
    assert sample.num_refs == num_refs
    assert sample.target.shape == (3, image_size, image_size) and sample.target.dtype == torch.float32
    assert float(sample.target.min()) >= 0 and float(sample.target.max()) <= 1
    for reference, pairs, target_mask, reference_mask in zip(
        sample.references, sample.pairs, sample.target_masks, sample.reference_masks
    ):
        assert reference.shape == (3, ref_size, ref_size)
        assert float(reference.min()) >= 0 and float(reference.max()) <= 1
        assert pairs.dtype == torch.float32 and bool(torch.isfinite(pairs).all())
        assert bool(((pairs[:, :2] >= 0) & (pairs[:, :2] < ref_size)).all())
        assert bool(((pairs[:, 2:] >= 0) & (pairs[:, 2:] < image_size)).all())
        assert target_mask.dtype == torch.bool and target_mask.shape == (image_size, image_size)
        assert reference_mask.dtype == torch.bool and reference_mask.shape == (ref_size, ref_size)
        assert bool(_at(target_mask, pairs[:, 2:]).all()) and bool(_at(reference_mask, pairs[:, :2]).all())


@given(identity=st.integers(0, 2**62), size=st.integers(1, 24))
def test_any_identity_renders(identity, size):
    rgba = render_subject(identity, size)
    assert rgba.shape == (4, size, size) and bool(torch.isfinite(rgba).all())
    assert float(rgba.min()) >= 0 and float(rgba.max()) <= 1


# ------------------------------------------------------------------------------ speed, sizes
def test_a_64_pixel_sample_with_four_subjects_takes_milliseconds():
    world = SyntheticWorld()
    world.sample(0, num_refs=4)
    durations = []
    for index in range(1, 21):
        start = time.process_time()  # CPU time: robust to other jobs on a shared machine
        world.sample(index, num_refs=4)
        durations.append(time.process_time() - start)
    # About 5 ms on one core; the bound leaves room for slower machines.
    assert statistics.median(durations) < 0.05


def test_presets():
    gpu = SyntheticWorldConfig.from_preset("gpu", seed=2)
    assert (gpu.image_size, gpu.ref_size, gpu.canonical_size, gpu.seed) == (256, 128, 256, 2)
    sample = SyntheticWorld(gpu).sample(0, num_refs=2)
    assert sample.target.shape == (3, 256, 256) and sample.references[0].shape == (3, 128, 128)
    assert SyntheticWorldConfig.from_preset("cpu") == SyntheticWorldConfig()


# ------------------------------------------------------------------------------ dataset, sheet
def test_dataset_items_are_world_samples():
    world = SyntheticWorld(SyntheticWorldConfig(seed=6))
    dataset = SyntheticDataset(world, length=5)
    assert len(dataset) == 5
    _assert_equal_samples(dataset[2], world.sample(2))
    _assert_equal_samples(dataset[-1], world.sample(4))
    assert [sample.sample_id for sample in dataset] == [f"synthetic-6-{i}" for i in range(5)]
    fixed = SyntheticDataset(world, length=3, num_refs=6)
    assert all(sample.num_refs == 6 for sample in fixed)
    with pytest.raises(IndexError, match="index"):
        dataset[5]


def test_example_sheet(tmp_path):
    path = tmp_path / "nested" / "sheet.png"
    config = SyntheticWorldConfig(image_size=48, ref_size=16)
    sheet = save_example_sheet(path, config, num_samples=2, num_refs=3)
    assert sheet.shape == (3, 2 * 48 + 4, 16 + 2 * 48) and sheet.dtype == torch.uint8
    with Image.open(path) as image:
        assert image.size == (16 + 2 * 48, 2 * 48 + 4)


# ------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"image_size": 4}, "image_size"),
        ({"ref_size": 7.5}, "ref_size"),
        ({"min_refs": 0}, "min_refs"),
        ({"max_refs": MAX_SUBJECTS + 1}, "max_refs"),
        ({"min_refs": 3, "max_refs": 2}, "max_refs"),
        ({"identity_range": (5,)}, "identity_range"),
        ({"identity_range": (-1, 10)}, r"identity_range\[0\]"),
        ({"identity_range": (10, 12)}, "identity_range"),
        ({"identity_range": (10, 5)}, "identity_range"),
        ({"seed": -1}, "seed"),
        ({"seed": True}, "seed"),
        ({"canonical_size": 4}, "canonical_size"),
        ({"grid_points": 0}, "grid_points"),
        ({"ref_scale_range": (0.9, 0.8)}, "ref_scale_range"),
        ({"ref_scale_range": (0.0, 0.8)}, "ref_scale_range"),
        ({"ref_rotation": -1.0}, "ref_rotation"),
        ({"ref_translation": 0.6}, "ref_translation"),
        ({"ref_jitter": 0.1}, "ref_jitter"),
        ({"ref_background": 2.0}, "ref_background"),
        ({"target_scale_range": (0.5, 3.0)}, r"target_scale_range\[1\]"),
        ({"target_rotation": float("nan")}, "target_rotation"),
        ({"layout_jitter": 0.7}, "layout_jitter"),
        ({"occlusion": 1.5}, "occlusion"),
    ],
)
def test_config_errors_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}"):
        SyntheticWorldConfig(**kwargs)


def test_other_errors_name_the_argument():
    world = SyntheticWorld(SyntheticWorldConfig(identity_range=(0, 5), max_refs=3))
    cases = [
        (lambda: world.sample(-1), "index"),
        (lambda: world.sample(1.0), "index"),
        (lambda: world.sample(0, num_refs=0), "num_refs"),
        (lambda: world.sample(0, num_refs=6), "num_refs"),
        (lambda: SyntheticWorld(SyntheticWorldConfig()).sample(0, num_refs=MAX_SUBJECTS + 1), "num_refs"),
        (lambda: SyntheticWorld({"image_size": 64}), "config"),
        (lambda: render_subject(-1, 8), "identity"),
        (lambda: render_subject(1, 0), "size"),
        (lambda: subject_descriptor("7"), "identity"),
        (lambda: SyntheticWorldConfig.from_preset("tpu"), "name"),
        (lambda: SyntheticWorldConfig.from_preset("cpu", colour=1), "overrides"),
        (lambda: SyntheticDataset(world, 0), "length"),
        (lambda: SyntheticDataset("world", 3), "world"),
        (lambda: SyntheticDataset(world, 3, num_refs=9), "num_refs"),
        (lambda: SyntheticDataset(world, 3)["0"], "index"),
        (lambda: save_example_sheet("unused.png", num_refs=9), "num_refs"),
    ]
    for call, name in cases:
        with pytest.raises(ValueError, match=f"`{name}`"):
            call()


# ------------------------------------------------------------------------------ simple worlds (fidelity)
def _colour_count(pixels: torch.Tensor) -> int:
    """Distinct colours among ``(3, N)`` pixels, to 1/50."""
    return len({tuple(p) for p in (pixels.T * 50).round().int().tolist()})


def test_subject_styles_paint_two_halves_or_one_colour():
    identity = 4
    palette = subject_descriptor(identity).palette
    textured = render_subject(identity, 64)
    two_tone = render_subject(identity, 64, style="two_tone")
    plain = render_subject(identity, 64, style="plain")
    assert torch.equal(two_tone[3], textured[3]) and torch.equal(plain[3], textured[3])  # same shape
    inside = textured[3] > 0.99
    assert torch.allclose(plain[:3][:, inside], palette[0][:, None].expand(3, int(inside.sum())))
    # two halves: nearly every pixel is one of the two colours, and each covers a real share
    rgb = two_tone[:3][:, inside].T
    near = torch.cdist(rgb, palette).min(1)
    assert float((near.values < 0.02).float().mean()) > 0.9
    shares = torch.bincount(near.indices[near.values < 0.02], minlength=2).float() / len(rgb)
    assert float(shares.min()) > 0.15
    # the textured subject has many more mixtures of the two colours than the two halves
    assert _colour_count(textured[:3][:, inside]) > 3 * _colour_count(two_tone[:3][:, inside][:, near.values < 0.02])
    with pytest.raises(ValueError, match="`style`"):
        render_subject(identity, 16, style="dotted")


def test_plain_background_and_styled_captions_and_palettes():
    config = SyntheticWorldConfig(image_size=32, ref_size=16, identity_range=(0, 8), subject_style="plain",
                                  background="plain", occlusion=0.0)
    sample = SyntheticWorld(config).sample(3, num_refs=3)
    outside = ~torch.stack(sample.target_masks).any(0)
    edge_free = F.max_pool2d((~outside).float()[None, None], 3, 1, 1)[0, 0] == 0  # away from soft edges
    assert torch.allclose(sample.target[:, edge_free], torch.full_like(sample.target[:, edge_free], 0.5))
    assert sample.caption.endswith("on a plain background")
    for identity, name, palette in zip(sample.meta["identities"], sample.meta["names"], sample.meta["palettes"]):
        descriptor = subject_descriptor(identity)
        assert name == f"{descriptor.colour_names[0]} {descriptor.shape_name}" and name in sample.caption
        assert torch.equal(palette, descriptor.palette[[0, 0]])
    # the default world keeps its captions, its palettes in meta and its pixels
    default = SyntheticWorld(SyntheticWorldConfig(seed=2)).sample(1, num_refs=2)
    assert default.caption.endswith("on a textured background")
    assert torch.equal(default.meta["palettes"], torch.stack([subject_descriptor(i).palette
                                                             for i in default.meta["identities"]]))
    # the style changes only the subjects' colours: layout, masks and pairs stay the same
    textured = SyntheticWorld(SyntheticWorldConfig(image_size=32, ref_size=16, identity_range=(0, 8), occlusion=0.0)).sample(3, 3)
    assert all(torch.equal(a, b) for a, b in zip(textured.target_masks, sample.target_masks))
    assert all(torch.equal(a, b) for a, b in zip(textured.pairs, sample.pairs))


@pytest.mark.parametrize("kwargs, name", [({"subject_style": "striped"}, "subject_style"),
                                          ({"background": "noise"}, "background")])
def test_style_errors_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        SyntheticWorldConfig(**kwargs)


@settings(max_examples=25, deadline=None)
@given(index=st.integers(0, 10_000), count=st.integers(1, 6))
def test_ordered_layout_puts_reference_i_in_cell_i(index, count):
    kwargs = dict(image_size=48, ref_size=16, identity_range=(0, 8), occlusion=0.0, layout_jitter=0.1,
                  target_rotation=0.0, max_refs=6)
    ordered = SyntheticWorld(SyntheticWorldConfig(layout="ordered", **kwargs)).sample(index, num_refs=count)
    rows, cols = _grid_shape(count)
    ys, xs = torch.meshgrid(torch.arange(48.0) + 0.5, torch.arange(48.0) + 0.5, indexing="ij")
    for i, mask in enumerate(ordered.target_masks):
        weight = mask.float()
        cy, cx = float((ys * weight).sum() / weight.sum()), float((xs * weight).sum() / weight.sum())
        assert (int(cy // (48 / rows)), int(cx // (48 / cols))) == divmod(i, cols)
    # only the cells change: the subjects, their references and the caption are the random layout's
    shuffled = SyntheticWorld(SyntheticWorldConfig(**kwargs)).sample(index, num_refs=count)
    assert ordered.meta["identities"] == shuffled.meta["identities"] and ordered.caption == shuffled.caption
    assert all(torch.equal(a, b) for a, b in zip(ordered.references, shuffled.references))


def test_layout_error_names_the_argument():
    with pytest.raises(ValueError, match="`layout`.*'random', 'ordered'"):
        SyntheticWorldConfig(layout="diagonal")
