"""Dense matching and filters against brute-force twins and constructed cases."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from mosaic_kit.correspondence import (
    DenseMatches,
    TokenGrid,
    consensus,
    cycle_consistent,
    filter_by_mask,
    filter_by_score,
    is_disjoint,
    match_features,
    matches_to_correspondences,
    mutual_nearest,
)


def brute_force(source, target, target_mask=None):
    """Python loops over cells: argmax of cosine similarity."""
    batch, _, hs, ws = source.shape
    ht, wt = target.shape[2:]
    index = torch.zeros(batch, hs * ws, dtype=torch.long)
    score = torch.zeros(batch, hs * ws, dtype=torch.float64)
    for b in range(batch):
        for s in range(hs * ws):
            a = source[b, :, s // ws, s % ws].double()
            best, best_t = -float("inf"), -1
            for t in range(ht * wt):
                if target_mask is not None and not target_mask[b, t // wt, t % wt]:
                    continue
                c = target[b, :, t // wt, t % wt].double()
                sim = float(a @ c / (a.norm() * c.norm()))
                if sim > best:
                    best, best_t = sim, t
            index[b, s], score[b, s] = best_t, best
    return index, score


@given(
    st.integers(0, 10_000), st.integers(1, 2), st.integers(1, 5), st.integers(1, 5), st.integers(1, 5),
    st.integers(1, 5), st.sampled_from([1, 7, 2**22]),
)
def test_nearest_neighbours_equal_brute_force(seed, batch, hs, ws, ht, wt, chunk):
    g = torch.Generator().manual_seed(seed)
    source = torch.randn(batch, 6, hs, ws, generator=g, dtype=torch.float64)
    target = torch.randn(batch, 6, ht, wt, generator=g, dtype=torch.float64)
    mask = torch.rand(batch, ht, wt, generator=g) < 0.7
    mask[:, 0, 0] = True
    m = match_features(source, target, target_mask=mask, max_chunk_elements=chunk)
    index, score = brute_force(source, target, mask)
    assert torch.equal(m.index, index)
    torch.testing.assert_close(m.score, score)
    assert bool(m.valid.all())
    assert (m.source_shape, m.target_shape) == ((hs, ws), (ht, wt))


def test_masks_at_another_resolution_and_empty_target_mask():
    source = torch.randn(2, 4, 4, 4)
    full = torch.ones(2, 64, 64, dtype=torch.bool)
    left = full.clone()
    left[:, :, 32:] = False  # image-resolution mask: left half
    m = match_features(source, source, source_mask=left, target_mask=full)
    assert m.valid.view(2, 4, 4)[:, :, :2].all() and not m.valid.view(2, 4, 4)[:, :, 2:].any()
    empty = full.clone()
    empty[1] = False
    m = match_features(source, source, target_mask=empty)
    assert m.valid[0].all() and not m.valid[1].any() and torch.isfinite(m.score).all()
    kept = filter_by_mask(match_features(source, source), target_mask=left)
    assert bool(((kept.index % 4) < 2)[kept.valid].all()) and bool(((kept.index % 4) >= 2)[~kept.valid].all())


def _matches(index, shape_s, shape_t, score=None, valid=None):
    index = torch.tensor([index])
    return DenseMatches(
        index,
        torch.ones(index.shape) if score is None else torch.tensor([score]),
        torch.ones(index.shape, dtype=torch.bool) if valid is None else torch.tensor([valid]),
        shape_s,
        shape_t,
    )


def test_mutual_and_cycle_keep_exactly_the_right_pairs():
    # Source 2×2, target 1×3.
    forward = _matches([0, 2, 1, 1], (2, 2), (1, 3))
    backward = _matches([0, 1, 3], (1, 3), (2, 2), valid=[True, True, False])
    # Round trips: 0→0→0 exact; 1→2→3 but backward[2] is invalid; 2→1→1, from (row 1, col 0) to
    # (row 0, col 1), √2 cells off; 3→1→1, one cell off.
    assert mutual_nearest(forward, backward).valid.tolist() == [[True, False, False, False]]
    assert cycle_consistent(forward, backward, radius=1).valid.tolist() == [[True, False, False, True]]
    assert cycle_consistent(forward, backward, radius=1.5).valid.tolist() == [[True, False, True, True]]
    assert cycle_consistent(forward, backward, radius=0.99).valid.tolist() == [[True, False, False, False]]
    forward = _matches([0, 0, 1, 1], (2, 2), (1, 3))
    assert cycle_consistent(forward, backward, radius=1.5).valid.tolist() == [[True, True, True, True]]
    with pytest.raises(ValueError, match="`backward` to match the target grid back"):
        mutual_nearest(forward, forward)
    with pytest.raises(ValueError, match="`radius` to be a number >= 0"):
        cycle_consistent(forward, backward, radius=-1)


def test_mutual_nearest_equals_its_definition_on_random_features():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(1, 8, 6, 6, generator=g), torch.randn(1, 8, 5, 7, generator=g)
    forward, backward = match_features(a, b), match_features(b, a)
    expected = [backward.index[0, forward.index[0, s]].item() == s for s in range(36)]
    assert mutual_nearest(forward, backward).valid[0].tolist() == expected
    assert any(expected)


def test_consensus_and_score_filter():
    a = _matches([0, 1, 2, 5], (2, 2), (2, 3), score=[0.9, 0.8, 0.7, 0.6])
    b = _matches([0, 4, 2, 4], (2, 2), (2, 3), score=[0.5, 0.6, 0.7, 0.8], valid=[True, True, False, True])
    out = consensus([a, b])
    assert out.valid.tolist() == [[True, False, False, False]]
    assert out.score[0, 0].item() == pytest.approx(0.7)
    # Cell 1 vs 4: (1.5, .5) vs (1.5, 1.5) → 1 apart; cell 3: 5 vs 4 → 1 apart.
    assert consensus([a, b], radius=1).valid.tolist() == [[True, True, False, True]]
    assert filter_by_score(a, 0.75).valid.tolist() == [[True, True, False, False]]
    with pytest.raises(ValueError, match="at least two"):
        consensus([a])
    with pytest.raises(ValueError, match=r"`matches\[1\]` on the grids of `matches\[0\]`"):
        consensus([a, _matches([0, 1, 2, 3], (2, 2), (2, 2))])


def test_matches_to_correspondences_maps_grids_and_enforces_disjointness():
    feats = torch.randn(1, 8, 4, 4)
    identity = match_features(feats, feats)
    tgt_grid, ref_grid = TokenGrid(64, 64), TokenGrid(32, 32)  # 4×4 and 2×2 tokens
    corr = matches_to_correspondences([identity], ref_grid, tgt_grid)
    # Target cell (row r, col c) → reference cell (r, c) → reference token (r//2, c//2): first target cell wins.
    assert corr.to_dicts() == [[{0: 0, 1: 2, 2: 8, 3: 10}]]
    reverse = matches_to_correspondences([identity], tgt_grid, ref_grid, direction="reference_to_target")
    assert reverse.to_dicts() == [[{u: u // 4 // 2 * 2 + u % 4 // 2 for u in range(16)}]]
    # Two references claiming the same target tokens: confidence decides.
    weak = DenseMatches(identity.index, torch.full((1, 16), 0.2), identity.valid, (4, 4), (4, 4))
    corr = matches_to_correspondences([weak, identity], ref_grid, tgt_grid)
    assert bool(is_disjoint(corr).all())
    assert corr.num_points.tolist() == [[0, 4]]
    assert corr.confidence[0, 1, :4].tolist() == pytest.approx([1.0] * 4)
    corr = matches_to_correspondences([weak, identity], ref_grid, tgt_grid, disjoint="first")
    assert corr.num_points.tolist() == [[4, 0]]
    absent = matches_to_correspondences([identity, identity], ref_grid, tgt_grid, ref_present=torch.tensor([[True, False]]))
    assert absent.ref_present.tolist() == [[True, False]] and absent.num_points.tolist() == [[4, 0]]
    with pytest.raises(ValueError, match="absent references only after present ones"):
        matches_to_correspondences([identity, identity], ref_grid, tgt_grid, ref_present=torch.tensor([[False, True]]))
    with pytest.raises(ValueError, match="`direction` to be one of"):
        matches_to_correspondences([identity], ref_grid, tgt_grid, direction="both")


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"`source` with 4 dims"):
        match_features(torch.randn(4, 4), torch.randn(1, 4, 2, 2))
    with pytest.raises(ValueError, match=r"`target` of shape \(B, C, ht, wt\) = \(1, 4, \?, \?\), but got \(1, 3, 2, 2\)"):
        match_features(torch.randn(1, 4, 2, 2), torch.randn(1, 3, 2, 2))
    with pytest.raises(ValueError, match="floating dtype"):
        match_features(torch.ones(1, 4, 2, 2, dtype=torch.long), torch.ones(1, 4, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"`target_mask` of shape \(B, H, W\) = \(1, \?, \?\)"):
        match_features(torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2), target_mask=torch.ones(2, 2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="`min_score` to be a number"):
        filter_by_score(_matches([0], (1, 1), (1, 1)), "high")


def test_a_64_by_64_match_is_cheap():
    import time

    a, b = torch.randn(1, 128, 64, 64), torch.randn(1, 128, 64, 64)
    start = time.perf_counter()
    m = match_features(a, b)
    assert m.index.shape == (1, 4096)
    assert time.perf_counter() - start < 5.0  # about 0.1 s on a 2-core CPU
    assert torch.equal(m.index, (F.normalize(a.flatten(2), dim=1).transpose(1, 2) @ F.normalize(b.flatten(2), dim=1)).argmax(-1))


def test_draw_matches_places_images_side_by_side_with_given_colours():
    from mosaic_kit.correspondence import draw_matches

    left, right = torch.zeros(3, 8, 8), torch.ones(3, 6, 10) * 0.5
    canvas = draw_matches(left, right, torch.tensor([[0.5, 4.5]]), torch.tensor([[9.5, 4.5]]),
                          colours=torch.tensor([[0.0, 1.0, 0.0]]))
    assert canvas.shape == (3, 8, 18) and canvas.dtype == torch.uint8
    assert canvas[:, 4, 0].tolist() == [0, 255, 0] and canvas[:, 4, 17].tolist() == [0, 255, 0]  # the line's ends
    assert canvas[:, 0, 9].tolist() == [128, 128, 128] and canvas[:, 7, 9].tolist() == [0, 0, 0]  # right image, padding
    plain = draw_matches(left, right, torch.zeros(0, 2), torch.zeros(0, 2))
    none_drawn = draw_matches(left, right, torch.rand(50, 2) * 6, torch.rand(50, 2) * 6, max_lines=0)
    assert torch.equal(none_drawn, plain)
    with pytest.raises(ValueError, match=r"`colours` of shape \(N, 3\) = \(1, 3\)"):
        draw_matches(left, right, torch.zeros(1, 2), torch.zeros(1, 2), colours=torch.zeros(2, 3))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_features_with_cpu_masks():
    feats = torch.randn(1, 8, 4, 4, device="cuda")
    mask = torch.ones(1, 16, 16, dtype=torch.bool)  # masks usually come from image files, on the CPU
    m = match_features(feats, feats, source_mask=mask, target_mask=mask)
    assert m.index.device.type == "cuda" and bool(m.valid.all())
    assert bool(filter_by_mask(m, source_mask=mask, target_mask=mask).valid.all())
