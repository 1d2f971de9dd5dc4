"""The multi-subject composer: exact transport of pairs and masks, occlusion, eq. 2, captions, determinism."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mosaic_kit.correspondence import Correspondences, TokenGrid, is_disjoint
from mosaic_kit.data import (
    BadSample,
    ComposedDataset,
    MultiSubjectSample,
    ReleasedDataset,
    collate_samples,
    compose_caption,
    compose_samples,
    join_subjects,
    make_released_fixture,
)

REF = 32
BACKGROUND = (1.0, 1.0, 1.0)


def _colour(i: int) -> torch.Tensor:
    return torch.tensor([0.1 + 0.2 * (i % 4), 0.1 + 0.25 * (i // 4 % 3), 0.15 * (i % 3)])


def _part(i: int, height: int, width: int, mask_box, pairs: torch.Tensor, name: str | None = None) -> MultiSubjectSample:
    """A solid-colour target (so the canvas colour tells which part a pixel shows), one reference."""
    target = _colour(i).view(3, 1, 1).expand(3, height, width).clone()
    masks = [None]
    if mask_box is not None:
        mask = torch.zeros(height, width, dtype=torch.bool)
        x0, y0, x1, y1 = mask_box
        mask[y0:y1, x0:x1] = True
        masks = [mask]
    reference = torch.rand(3, REF, REF, generator=torch.Generator().manual_seed(i))
    meta = {"subjects": [name]} if name else {}
    return MultiSubjectSample(f"part{i}", target, [reference], f"thing {i}", [pairs], masks, [None], meta)


@st.composite
def _parts(draw):
    count = draw(st.integers(1, 4))
    parts = []
    for i in range(count):
        height, width = draw(st.integers(8, 80)), draw(st.integers(8, 80))
        mask_box = None
        if draw(st.booleans()):
            x0, y0 = draw(st.integers(0, width - 2)), draw(st.integers(0, height - 2))
            mask_box = (x0, y0, draw(st.integers(x0 + 1, width)), draw(st.integers(y0 + 1, height)))
        num = draw(st.integers(0, 25))
        g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
        pairs = torch.rand(num, 4, generator=g) * torch.tensor([REF, REF, width, height]) * 0.999
        parts.append(_part(i, height, width, mask_box, pairs))
    return parts


def _shows(canvas: torch.Tensor, i: int) -> torch.Tensor:
    """``(H, W)`` bool: the canvas pixel has part i's colour."""
    return ((canvas - _colour(i).view(3, 1, 1)).abs() < 1e-3).all(0)


@given(
    parts=_parts(),
    canvas=st.sampled_from([64, 96, 128]),
    seed=st.integers(0, 2**31),
    max_overlap=st.sampled_from([0.0, 0.3, 0.8]),
    paste=st.sampled_from(["mask", "box"]),
    margin=st.sampled_from([0.0, 0.1]),
    crop=st.booleans(),
)
def test_pairs_and_masks_follow_the_placement_exactly(parts, canvas, seed, max_overlap, paste, margin, crop):
    out = compose_samples(
        parts, torch.Generator().manual_seed(seed), canvas, max_overlap=max_overlap, paste=paste, margin=margin,
        crop_to_subject=crop, background=BACKGROUND, scale_range=(0.3, 0.7),
    )
    assert out.num_refs == len(parts) and tuple(out.target.shape) == (3, canvas, canvas)
    grid = TokenGrid(canvas, canvas)
    candidates = []  # per reference: (index into original pairs, mapped (x, y), token)
    for i, (part, place) in enumerate(zip(parts, out.meta["layout"])):
        assert torch.equal(out.references[i], part.references[0])
        x0, y0, x1, y1 = place["crop"]
        sx, sy = place["scale"]
        ox, oy = place["offset"]
        bx0, by0, bx1, by1 = place["box"]
        assert (bx1 - bx0, by1 - by0) == (round(sx * (x1 - x0)), round(sy * (y1 - y0)))
        shows = _shows(out.target, i)
        # Pairs: reference points untouched, target points mapped by the part's affine map.
        original = part.pairs[0].double()
        index = out.meta["pair_index"][i]
        expected = torch.stack((original[:, 0], original[:, 1],
                                (original[:, 2] - x0) * sx + ox, (original[:, 3] - y0) * sy + oy), 1).float()
        assert torch.equal(out.pairs[i], expected[index])
        visible = []
        for j in range(original.shape[0]):
            tx, ty = float(original[j, 2]), float(original[j, 3])
            if not (x0 <= tx < x1 and y0 <= ty < y1):
                continue
            mx, my = float(expected[j, 2]), float(expected[j, 3])
            if bool(shows[math.floor(my), math.floor(mx)]):
                visible.append((j, int(grid.pixel_to_token(expected[j, 2:][None])[0])))
        candidates.append(visible)
        # Masks: the part's mask read at each canvas pixel's centre inside the box, where the part shows.
        mask = part.target_masks[0]
        if mask is None:
            assert torch.equal(out.target_masks[i], shows)
        else:
            cols = x0 + ((torch.arange(bx1 - bx0, dtype=torch.float64) + 0.5) * ((x1 - x0) / (bx1 - bx0))).floor().long()
            rows = y0 + ((torch.arange(by1 - by0, dtype=torch.float64) + 0.5) * ((y1 - y0) / (by1 - by0))).floor().long()
            placed = torch.zeros(canvas, canvas, dtype=torch.bool)
            placed[by0:by1, bx0:bx1] = mask[rows.clamp(max=mask.shape[0] - 1)][:, cols.clamp(max=mask.shape[1] - 1)]
            assert torch.equal(out.target_masks[i], placed & shows)
    # Kept = visible and not on a target token claimed by another reference (policy "drop").
    claims: dict[int, set[int]] = {}
    for k, visible in enumerate(candidates):
        for _, token in visible:
            claims.setdefault(token, set()).add(k)
    for k, visible in enumerate(candidates):
        kept = [j for j, token in visible if len(claims[token]) == 1]
        assert out.meta["pair_index"][k].tolist() == kept
    corr = Correspondences.from_pixel_pairs(
        [[(p[:, :2], p[:, 2:]) for p in out.pairs]], TokenGrid(REF, REF), grid, first_per_ref_token=False
    )
    assert bool(is_disjoint(corr).all())
    # Boxes respect the overlap bound (intersection over the smaller box).
    boxes = [place["box"] for place in out.meta["layout"]]
    for a in range(len(boxes)):
        for b in range(a + 1, len(boxes)):
            w = min(boxes[a][2], boxes[b][2]) - max(boxes[a][0], boxes[b][0])
            h = min(boxes[a][3], boxes[b][3]) - max(boxes[a][1], boxes[b][1])
            if w > 0 and h > 0:
                smaller = min((bx[2] - bx[0]) * (bx[3] - bx[1]) for bx in (boxes[a], boxes[b]))
                assert w * h / smaller <= max_overlap + 1e-9


def test_same_generator_same_composite_and_policies():
    parts = [_part(i, 48, 40, (4, 4, 36, 44), torch.rand(30, 4) * torch.tensor([REF, REF, 40, 48]) * 0.99, name)
             for i, name in enumerate(["dog", "owl", "teapot"])]
    one = compose_samples(parts, torch.Generator().manual_seed(3), 64, max_overlap=0.5)
    two = compose_samples(parts, torch.Generator().manual_seed(3), 64, max_overlap=0.5)
    assert torch.equal(one.target, two.target) and all(torch.equal(a, b) for a, b in zip(one.pairs, two.pairs))
    assert one.caption == "a dog, an owl and a teapot" and one.sample_id == "part0+part1+part2"
    assert one.meta["subjects"] == ["dog", "owl", "teapot"] and one.meta["parts"] == ["part0", "part1", "part2"]
    other = compose_samples(parts, torch.Generator().manual_seed(4), 64, max_overlap=0.5)
    assert other.meta["layout"] != one.meta["layout"]
    first = compose_samples(parts, torch.Generator().manual_seed(3), 64, max_overlap=0.5, disjoint="first")
    assert sum(p.shape[0] for p in first.pairs) >= sum(p.shape[0] for p in one.pairs)
    grid = TokenGrid(64, 64)
    corr = Correspondences.from_pixel_pairs([[(p[:, :2], p[:, 2:]) for p in first.pairs]], TokenGrid(REF, REF), grid,
                                            first_per_ref_token=False)
    assert bool(is_disjoint(corr).all())
    # Two full-canvas parts, side by side through their masks, with pairs in the same 16-pixel token.
    crowded = [_part(0, 32, 32, (0, 0, 10, 32), torch.tensor([[1.0, 1.0, 5.0, 4.0], [2.0, 2.0, 5.0, 20.0]])),
               _part(1, 32, 32, (10, 0, 32, 32), torch.tensor([[1.0, 1.0, 12.0, 4.0]]))]
    settings = {"scale_range": (1.0, 1.0), "max_overlap": 1.0, "crop_to_subject": False}
    dropped = compose_samples(crowded, torch.Generator().manual_seed(0), 32, **settings)
    assert [index.tolist() for index in dropped.meta["pair_index"]] == [[1], []]
    assert dropped.meta["dropped"]["contested"] == 2
    kept = compose_samples(crowded, torch.Generator().manual_seed(0), 32, disjoint="first", **settings)
    assert [index.tolist() for index in kept.meta["pair_index"]] == [[0, 1], []]
    with pytest.raises(ValueError, match="eq. 2"):
        compose_samples(crowded, torch.Generator().manual_seed(0), 32, disjoint="strict", **settings)


def test_layout_falls_back_to_a_grid_that_never_overlaps():
    parts = [_part(i, 40, 40, None, torch.zeros(0, 4)) for i in range(5)]
    out = compose_samples(parts, torch.Generator().manual_seed(0), 96, scale_range=(1.0, 1.0))
    assert out.meta["layout_mode"] == "grid"
    boxes = [place["box"] for place in out.meta["layout"]]
    for a in range(len(boxes)):
        for b in range(a + 1, len(boxes)):
            assert min(boxes[a][2], boxes[b][2]) <= max(boxes[a][0], boxes[b][0]) or \
                min(boxes[a][3], boxes[b][3]) <= max(boxes[a][1], boxes[b][1])
    for i in range(5):  # every part is visible
        assert bool(_shows(out.target, i).any())


def test_captions():
    assert join_subjects(["dog"]) == "a dog"
    assert join_subjects(["apple", "The Cat", "two cups", "3 mugs"]) == "an apple, The Cat, two cups and 3 mugs"
    assert join_subjects([]) == ""
    plain = _part(0, 16, 16, None, torch.zeros(0, 4))  # no subject names: its caption is the phrase
    named = _part(1, 16, 16, None, torch.zeros(0, 4), "umbrella")
    assert compose_caption([plain, named], "{subjects} on a beach") == "a thing 0 and an umbrella on a beach"
    with pytest.raises(ValueError, match="subjects"):
        compose_caption([plain], "no placeholder")


def test_argument_errors():
    part = _part(0, 16, 16, None, torch.zeros(0, 4))
    g = torch.Generator().manual_seed(0)
    for kwargs, message in (
        ({"canvas_size": 40}, "multiple of"),
        ({"scale_range": (0.5, 0.2)}, "scale_range"),
        ({"max_overlap": 2}, "max_overlap"),
        ({"paste": "alpha"}, "paste"),
        ({"disjoint": "confidence"}, "disjoint"),
        ({"margin": -1}, "margin"),
        ({"background": (2, 0, 0)}, "background"),
    ):
        with pytest.raises(ValueError, match=message):
            compose_samples([part], g, **{"canvas_size": 32, **kwargs})
    with pytest.raises(ValueError, match="samples"):
        compose_samples([], g, 32)
    with pytest.raises(ValueError, match="generator"):
        compose_samples([part], 0, 32)


pytest.importorskip("pyarrow")


@pytest.fixture
def released(tmp_path):
    subjects = [("dog", "a dog on the grass"), ("cat", "a cat on a sofa"), ("teapot", "a teapot on a table"),
                ("owl", "an owl on a branch")]
    make_released_fixture(tmp_path, subjects)
    return ReleasedDataset(tmp_path, target_size=128, ref_size=64)


def test_composed_released_samples_keep_their_pairs_and_eq2(released):
    data = ComposedDataset(released, num_subjects=(2, 3), length=6, canvas_size=128, seed=11, max_overlap=0.2)
    samples = [data[i] for i in range(len(data))]
    again = data[4]
    assert torch.equal(again.target, samples[4].target) and again.sample_id == samples[4].sample_id
    for index, sample in enumerate(samples):
        picks = data.parts(index)
        assert 2 <= len(picks) <= 3 and len(set(picks)) == len(picks) and sample.num_refs == len(picks)
        names = [released[p].meta["subjects"][0] for p in picks]
        assert sample.meta["subjects"] == names and sample.caption == join_subjects(names)
        assert sample.sample_id.startswith(f"composed-{index}:")
        for k, pick in enumerate(picks):
            part = released[pick]
            place = sample.meta["layout"][k]
            (x0, y0), (sx, sy), (ox, oy) = place["crop"][:2], place["scale"], place["offset"]
            original = part.pairs[0].double()[sample.meta["pair_index"][k]]
            assert torch.equal(sample.pairs[k][:, :2], original[:, :2].float())
            moved = torch.stack(((original[:, 2] - x0) * sx + ox, (original[:, 3] - y0) * sy + oy), 1).float()
            assert torch.equal(sample.pairs[k][:, 2:], moved)
            assert sample.pairs[k].shape[0] > 0  # the subjects are large enough to keep pairs
        batch = collate_samples([sample], 128, 64, disjoint="strict")  # eq. 2 already holds at the canvas grid
        assert bool(is_disjoint(batch.corr).all())
    assert len({s.sample_id for s in samples}) == len(samples)


def test_a_bad_part_makes_the_whole_composite_bad(released, tmp_path):
    for path in (tmp_path / "mask").iterdir():
        path.unlink()
    data = ComposedDataset(ReleasedDataset(tmp_path, 64, 64), num_subjects=2, canvas_size=64)
    with pytest.raises(BadSample) as bad:
        data[0]
    assert bad.value.kind == "missing_mask"
    with pytest.raises(ValueError, match="num_subjects"):
        ComposedDataset(released, num_subjects=(2, 9))
    with pytest.raises(ValueError, match="set by the dataset"):
        ComposedDataset(released, generator=None)
    with pytest.raises(IndexError):
        ComposedDataset(released, length=2)[2]
