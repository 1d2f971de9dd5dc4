import json
import random

import pytest
import torch
from helpers import random_dicts
from hypothesis import given
from hypothesis import strategies as st

from mosaic_kit.correspondence import Correspondences, TokenGrid


def test_from_dicts_layout_masks_and_global_rows():
    corr = Correspondences.from_dicts([[{0: 5, 3: 7}, {}, {1: 2}], [{2: 9}]], ref_tokens=[4, 3, 2], tgt_tokens=16)
    assert (corr.batch_size, corr.num_refs, corr.max_points) == (2, 3, 2)
    assert corr.ref_offsets == (0, 4, 7) and corr.total_ref_tokens == 9
    assert corr.ref_present.tolist() == [[True, True, True], [True, False, False]]
    assert corr.num_points.tolist() == [[2, 0, 1], [1, 0, 0]]
    assert corr.global_rows[0, 2, 0] == 7 + 1
    assert corr.global_rows[0, 0].tolist() == [0, 3]
    assert corr.tgt_index[0, 0].tolist() == [5, 7]


@given(st.integers(0, 10_000), st.integers(1, 4), st.integers(1, 6))
def test_dicts_roundtrip(seed, batch, refs):
    rng = random.Random(seed)
    ref_tokens = [rng.randint(1, 9) for _ in range(refs)]
    samples = random_dicts(rng, batch, ref_tokens, 20)
    corr = Correspondences.from_dicts(samples, ref_tokens, 20)
    assert corr.to_dicts() == samples
    assert corr.compact().to_dicts() == samples


def test_json_string_keys_are_accepted():
    samples = json.loads(json.dumps([[{0: 3, 2: 1}]]))
    assert Correspondences.from_dicts(samples, [3], 4).to_dicts() == [[{0: 3, 2: 1}]]


def test_to_device_and_compact():
    corr = Correspondences.from_dicts([[{0: 1, 1: 2, 2: 3}]], [3], 4)
    moved = corr.to("cpu")
    assert moved.ref_index.device.type == "cpu" and moved.to_dicts() == corr.to_dicts()
    dropped = corr.with_point_mask(torch.tensor([[[True, False, True]]]))
    assert dropped.max_points == 3 and dropped.compact().max_points == 2
    assert dropped.compact().to_dicts() == [[{0: 1, 2: 3}]]


def test_from_pixel_pairs_any_resolution_with_confidence():
    ref_grid, tgt_grid = TokenGrid(32, 32), TokenGrid(32, 64)  # 2×2 and 2×4 tokens
    # Points given on 64×64 feature frames.
    ref_xy = torch.tensor([[0.0, 0.0], [40.0, 40.0], [1.0, 1.0]])
    tgt_xy = torch.tensor([[63.0, 0.0], [0.0, 63.0], [10.0, 10.0]])
    conf = torch.tensor([0.5, 0.9, 0.1])
    corr = Correspondences.from_pixel_pairs(
        [[(ref_xy, tgt_xy, conf)], []], [ref_grid, ref_grid], tgt_grid,
        ref_image_sizes=[(64, 64), (64, 64)], tgt_image_size=(64, 64),
    )
    assert corr.to_dicts() == [[{0: 3, 3: 4}], []]
    assert corr.ref_tokens == (4, 4) and corr.tgt_tokens == 8
    assert corr.confidence[0, 0, :2].tolist() == pytest.approx([0.5, 0.9])
    assert corr.ref_present.tolist() == [[True, False], [False, False]]
    every = Correspondences.from_pixel_pairs(
        [[(ref_xy, tgt_xy)]], ref_grid, tgt_grid, ref_image_sizes=[(64, 64)], tgt_image_size=(64, 64),
        first_per_ref_token=False,
    )
    assert every.num_points.tolist() == [[3]] and every.confidence is None


@pytest.mark.parametrize(
    "samples, ref_tokens, tgt_tokens, match",
    [
        ([[{0: 1}, {0: 1}]], [2], 4, r"`samples\[0\]` to hold at most K = len\(ref_tokens\) = 1"),
        ([[{2: 1}]], [2], 4, r"`samples\[0\]\[0\]` in \[0, ref_tokens\[0\]\) = \[0, 2\), but got 2"),
        ([[{0: 4}]], [2], 4, r"`samples\[0\]\[0\]` in \[0, tgt_tokens\) = \[0, 4\), but got 4"),
        ([[{0: -1}]], [2], 4, r"but got -1"),
        ([[{0: 1.5}]], [2], 4, r"integer token index, but got 1.5"),
        ([[[0, 1]]], [2], 4, r"`samples\[0\]\[0\]` to be a dict"),
        ([{0: 1}], [2], 4, r"`samples\[0\]` to be a list over references"),
        ({0: 1}, [2], 4, r"`samples` to be a list over the batch"),
        ([[{0: 1}]], [0], 4, r"`ref_tokens\[0\]` >= 1"),
        ([[{0: 1}]], [2], "4", r"`tgt_tokens` to be an integer"),
        ([[{0: 1}]], 4, 4, r"`ref_tokens` to be a list of integers, but got 4"),
    ],
)
def test_from_dicts_bad_input(samples, ref_tokens, tgt_tokens, match):
    with pytest.raises(ValueError, match=match):
        Correspondences.from_dicts(samples, ref_tokens, tgt_tokens)


def test_constructor_validation():
    ok = dict(
        ref_index=torch.zeros(1, 2, 3, dtype=torch.long),
        tgt_index=torch.zeros(1, 2, 3, dtype=torch.long),
        point_mask=torch.ones(1, 2, 3, dtype=torch.bool),
        ref_present=torch.ones(1, 2, dtype=torch.bool),
        ref_tokens=(2, 2),
        tgt_tokens=4,
    )
    Correspondences(**ok)
    with pytest.raises(ValueError, match=r"`tgt_index` of shape \(B, K, P\) = \(1, 2, 3\), but got \(2, 2, 3\)"):
        Correspondences(**{**ok, "tgt_index": torch.zeros(2, 2, 3, dtype=torch.long)})
    with pytest.raises(ValueError, match=r"`ref_present` of shape \(B, K\) = \(\?, 1\), but got \(1, 2\)"):
        Correspondences(**{**ok, "ref_tokens": (2,)})
    with pytest.raises(ValueError, match="`point_mask` to be bool"):
        Correspondences(**{**ok, "point_mask": torch.ones(1, 2, 3)})
    with pytest.raises(ValueError, match=r"`ref_index` in \[0, ref_tokens\[k\]\) = \[0, 2\) for reference 1"):
        Correspondences(**{**ok, "ref_index": torch.tensor([[[0, 0, 0], [0, 2, 0]]])})
    with pytest.raises(ValueError, match="no points in absent references"):
        Correspondences(**{**ok, "ref_present": torch.tensor([[True, False]])})
    with pytest.raises(ValueError, match="`confidence` to be finite"):
        Correspondences(**{**ok, "confidence": torch.tensor([[[1.0, float("nan"), 1.0], [1.0, 1.0, 1.0]]])})


def test_to_dicts_refuses_what_the_released_format_cannot_hold():
    corr = Correspondences.from_dicts([[{0: 1}, {0: 2}]], [2, 2], 4)
    absent_first = Correspondences(
        ref_index=corr.ref_index, tgt_index=corr.tgt_index,
        point_mask=torch.tensor([[[False], [True]]]), ref_present=torch.tensor([[False, True]]),
        ref_tokens=(2, 2), tgt_tokens=4,
    )
    with pytest.raises(ValueError, match="absent references only after present ones"):
        absent_first.to_dicts()
    duplicate = Correspondences.from_pixel_pairs(
        [[(torch.tensor([[0.0, 0.0], [1.0, 1.0]]), torch.tensor([[0.0, 0.0], [20.0, 0.0]]))]],
        TokenGrid(32, 32), TokenGrid(32, 32), first_per_ref_token=False,
    )
    with pytest.raises(ValueError, match="maps token 0 to both 0 and 1"):
        duplicate.to_dicts()
