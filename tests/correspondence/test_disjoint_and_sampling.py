import random

import pytest
import torch
from helpers import random_dicts
from hypothesis import given
from hypothesis import strategies as st

from mosaic_kit.correspondence import (
    Correspondences,
    TokenGrid,
    contested_tokens,
    enforce_disjoint,
    find_conflicts,
    is_disjoint,
    subsample,
)


def _claimed_by(corr: Correspondences) -> list[dict[int, set[int]]]:
    """Per sample, target token → set of claiming references (plain Python)."""
    out = []
    for b, refs in enumerate(_as_lists(corr)):
        claims: dict[int, set[int]] = {}
        for k, pairs in enumerate(refs):
            for _, v in pairs:
                claims.setdefault(v, set()).add(k)
        out.append(claims)
    return out


def _as_lists(corr: Correspondences) -> list[list[list[tuple[int, int]]]]:
    return [
        [
            [(u, v) for u, v, m in zip(corr.ref_index[b, k].tolist(), corr.tgt_index[b, k].tolist(), corr.point_mask[b, k].tolist()) if m]
            for k in range(corr.num_refs)
        ]
        for b in range(corr.batch_size)
    ]


def _random_batch(seed: int, with_confidence: bool = True) -> Correspondences:
    rng = random.Random(seed)
    refs = rng.randint(1, 5)
    ref_tokens = [rng.randint(1, 8) for _ in range(refs)]
    tgt = rng.randint(1, 10)  # few target tokens: many conflicts
    samples = random_dicts(rng, rng.randint(1, 3), ref_tokens, tgt, max_points=8)
    confidences = [[{u: rng.choice([0.1, 0.5, 0.9]) for u in d} for d in s] for s in samples] if with_confidence else None
    return Correspondences.from_dicts(samples, ref_tokens, tgt, confidences=confidences)


@given(st.integers(0, 100_000), st.sampled_from(["drop", "first", "confidence"]))
def test_after_enforcement_no_target_token_is_claimed_twice(seed, policy):
    corr = _random_batch(seed)
    before = _claimed_by(corr)
    out = enforce_disjoint(corr, policy)
    assert bool(is_disjoint(out).all())
    after = _claimed_by(out)
    for claims_before, claims_after in zip(before, after):
        for v, refs in claims_after.items():
            assert len(refs) == 1
        for v, refs in claims_before.items():
            if len(refs) == 1:  # uncontested claims are never removed
                assert claims_after.get(v) == refs
            elif policy == "drop":
                assert v not in claims_after
            elif policy == "first":
                assert claims_after[v] == {min(refs)}
    enforce_disjoint(out, "strict")  # does not raise


def test_confidence_policy_picks_the_most_confident_reference_and_keeps_its_points():
    corr = Correspondences.from_dicts(
        [[{0: 3, 1: 3}, {0: 3}, {0: 3}]], [2, 1, 1], 5,
        confidences=[[{0: 0.2, 1: 0.6}, {0: 0.9}, {0: 0.9}]],
    )
    assert enforce_disjoint(corr, "confidence").to_dicts() == [[{}, {0: 3}, {}]]  # tie 0.9 → lower index
    assert enforce_disjoint(corr, "first").to_dicts() == [[{0: 3, 1: 3}, {}, {}]]
    assert enforce_disjoint(corr, "drop").to_dicts() == [[{}, {}, {}]]


def test_same_reference_sharing_a_target_is_not_a_conflict():
    corr = Correspondences.from_dicts([[{0: 2, 1: 2}, {0: 1}]], [2, 1], 4)
    assert not bool(find_conflicts(corr).any())
    assert contested_tokens(corr) == [[]]


def test_strict_names_the_contested_tokens_and_bad_policies_raise():
    corr = Correspondences.from_dicts([[{0: 2, 1: 5}, {0: 5, 1: 2}], [{0: 1}, {0: 3}]], [2, 2], 6)
    assert contested_tokens(corr) == [[2, 5], []]
    assert is_disjoint(corr).tolist() == [False, True]
    with pytest.raises(ValueError, match=r"sample 0: \[2, 5\]"):
        enforce_disjoint(corr, "strict")
    with pytest.raises(ValueError, match=r"`policy` to be one of \['drop', 'first', 'confidence', 'strict'\], but got 'last'"):
        enforce_disjoint(corr, "last")
    with pytest.raises(ValueError, match="`corr.confidence`"):
        enforce_disjoint(corr, "confidence")


@given(st.integers(0, 100_000), st.integers(1, 6), st.sampled_from(["random", "farthest"]))
def test_subsample_keeps_a_subset_of_at_most_max_points(seed, max_points, method):
    corr = _random_batch(seed, with_confidence=False)
    grid = (1, corr.tgt_tokens)
    out = subsample(corr, max_points, method, seed=seed, target_grid=grid)
    assert out.max_points <= max_points
    assert torch.equal(out.num_points, corr.num_points.clamp_max(max_points))
    for before, after in zip(_as_lists(corr), _as_lists(out)):
        for pairs_before, pairs_after in zip(before, after):
            assert set(pairs_after) <= set(pairs_before)
            assert len(set(pairs_after)) == len(pairs_after)


def test_random_subsample_is_reproducible_by_seed():
    corr = Correspondences.from_dicts([[{u: u for u in range(40)}]], [40], 40)
    a, b, c = (subsample(corr, 8, "random", seed=s) for s in (1, 1, 2))
    assert a.to_dicts() == b.to_dicts() and a.to_dicts() != c.to_dicts()


def test_farthest_point_spreads_over_the_grid():
    grid = TokenGrid(128, 128)  # 8 × 8 tokens
    # A dense 4×4 cluster in the top-left plus the three other corners.
    cluster = [r * 8 + c for r in range(4) for c in range(4)]
    targets = cluster + [7, 56, 63]
    corr = Correspondences.from_dicts([[{u: v for u, v in enumerate(targets)}]], [len(targets)], 64)
    chosen = set(subsample(corr, 4, "farthest", target_grid=grid).to_dicts()[0][0].values())
    assert chosen == {0, 7, 56, 63}
    with pytest.raises(ValueError, match="`target_grid`"):
        subsample(corr, 4, "farthest")
    with pytest.raises(ValueError, match=r"rows \* cols = corr.tgt_tokens = 64, but got 4 \* 4 = 16"):
        subsample(corr, 4, "farthest", target_grid=(4, 4))
    with pytest.raises(ValueError, match="`target_grid` to be a pair of integers, but got 4"):
        subsample(corr, 4, "farthest", target_grid=4)
    with pytest.raises(ValueError, match="`max_points` >= 1"):
        subsample(corr, 0)
    with pytest.raises(ValueError, match="`method` to be one of"):
        subsample(corr, 2, "grid")
