"""RefTargetCapture against the dense float64 twin: values, gradients, memory behaviour."""

import itertools
import math

import pytest
import torch
from helpers import random_corr, random_qk

from mosaic_kit.attention import RefTargetCapture, dense_ref_target_attention
from mosaic_kit.correspondence import Correspondences


def _capture(corr, queries, keys, **kwargs):
    capture = RefTargetCapture(corr, **kwargs)
    for q, k in zip(queries, keys):
        capture.add(q, k)
    return capture.result()


def _dense_stats(corr, queries, keys, aggregate):
    """Pair log-probs and rows straight from the dense map, with Python loops."""
    A = dense_ref_target_attention(queries, keys)
    pairs = torch.zeros(corr.point_mask.shape, dtype=A.dtype)
    rows = torch.zeros(corr.batch_size, corr.num_refs, corr.tgt_tokens, dtype=A.dtype)
    pairs_list, rows_list = [], []
    for b in range(corr.batch_size):
        for k in range(corr.num_refs):
            offset = corr.ref_offsets[k]
            members = []
            for p in range(corr.max_points):
                if corr.point_mask[b, k, p]:
                    g = offset + int(corr.ref_index[b, k, p])
                    pairs_list.append(((b, k, p), torch.log(A[b, g, corr.tgt_index[b, k, p]])))
                    members.append(A[b, g])
            if aggregate == "all" and corr.ref_present[b, k]:
                members = [A[b, offset + i] for i in range(corr.ref_tokens[k])]
            if members:
                rows_list.append(((b, k), torch.stack(members).mean(0)))
    pairs = pairs.index_put(tuple(torch.tensor([i[0][j] for i in pairs_list]) for j in range(3)),
                            torch.stack([v for _, v in pairs_list])) if pairs_list else pairs
    for (b, k), row in rows_list:
        rows = rows.index_put((torch.tensor(b), torch.tensor(k)), row)
    return pairs, rows


CASES = [
    # seed, batch, refs, blocks, heads, dim, rows per chunk (None: the default budget)
    (0, 1, 1, 1, 1, 4, None),
    (1, 2, 3, 2, 3, 8, 2),
    (2, 3, 6, 3, 2, 4, 1),
    (3, 2, 4, 1, 4, 16, 5),
    (4, 1, 5, 2, 2, 8, 3),
]


def _chunk_elements(corr, heads, rows):
    """The budget that makes chunks of ``rows`` query rows."""
    return None if rows is None else rows * corr.batch_size * heads * corr.tgt_tokens


@pytest.mark.parametrize("aggregate", ["points", "all"])
@pytest.mark.parametrize("seed, batch, refs, blocks, heads, dim, chunk", CASES)
def test_capture_equals_dense_twin_values_and_gradients(seed, batch, refs, blocks, heads, dim, chunk, aggregate):
    corr = random_corr(seed, batch, refs)
    queries, keys = random_qk(corr, blocks, heads, dim, seed=seed)
    out = _capture(corr, queries, keys, aggregate=aggregate, max_chunk_elements=_chunk_elements(corr, heads, chunk))
    pairs, rows = _dense_stats(corr, queries, keys, aggregate)
    torch.testing.assert_close(out.pair_log_probs, pairs, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(out.ref_rows, rows, rtol=1e-6, atol=1e-12)
    assert (out.num_blocks, out.num_heads, out.aggregate) == (blocks, heads, aggregate)

    g = torch.Generator().manual_seed(seed)
    w_pairs = torch.randn(pairs.shape, generator=g, dtype=torch.float64)
    w_rows = torch.randn(rows.shape, generator=g, dtype=torch.float64)
    fast = torch.autograd.grad((out.pair_log_probs * w_pairs).sum() + (out.ref_rows * w_rows).sum(), queries + keys)
    slow = torch.autograd.grad((pairs * w_pairs).sum() + (rows * w_rows).sum(), queries + keys)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-10)


def test_pairs_only_capture_and_duplicate_rows():
    # One reference token annotated twice (two targets): gradients must accumulate on its query row.
    corr = Correspondences(
        ref_index=torch.tensor([[[1, 1, 0]]]), tgt_index=torch.tensor([[[0, 3, 2]]]),
        point_mask=torch.ones(1, 1, 3, dtype=torch.bool), ref_present=torch.ones(1, 1, dtype=torch.bool),
        ref_tokens=(3,), tgt_tokens=4,
    )
    queries, keys = random_qk(corr, 2, 3, 5)
    out = _capture(corr, queries, keys, aggregate=None, max_chunk_elements=1)
    assert out.ref_rows is None
    pairs, _ = _dense_stats(corr, queries, keys, "points")
    torch.testing.assert_close(out.pair_log_probs, pairs, rtol=1e-6, atol=1e-12)
    fast = torch.autograd.grad(out.pair_log_probs.sum(), queries + keys)
    slow = torch.autograd.grad(pairs.sum(), queries + keys)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("aggregate", ["points", "all", None])
def test_gradcheck_float64(aggregate):
    corr = random_corr(7, 2, 3, tgt_tokens=5)
    queries, keys = random_qk(corr, 2, 2, 3)

    def fn(*tensors):
        half = len(tensors) // 2
        out = _capture(corr, tensors[:half], tensors[half:], aggregate=aggregate, max_chunk_elements=3)
        return (out.pair_log_probs,) + ((out.ref_rows,) if out.ref_rows is not None else ())

    assert torch.autograd.gradcheck(fn, tuple(queries + keys), eps=1e-6, atol=1e-7)


def test_custom_scale_matches_dense_with_the_same_scale():
    corr = random_corr(9, 1, 2)
    queries, keys = random_qk(corr, 1, 2, 4)
    out = _capture(corr, queries, keys, scale=0.3)
    A = dense_ref_target_attention(queries, keys, scale=0.3)
    b, k, p = (int(i) for i in corr.point_mask.nonzero()[0])
    expected = torch.log(A[b, corr.global_rows[b, k, p], corr.tgt_index[b, k, p]])
    torch.testing.assert_close(out.pair_log_probs[b, k, p], expected)


def test_bf16_with_huge_logits_stays_finite():
    corr = random_corr(11, 2, 4, tgt_tokens=16)
    queries, keys = random_qk(corr, 3, 2, 8, dtype=torch.bfloat16, scale=40.0)  # logits up to ~±1e4
    logits = queries[0].float() @ keys[0].float().transpose(-1, -2) / math.sqrt(8)
    assert logits.abs().max() > 2e3
    for aggregate in ("points", "all"):
        out = _capture(corr, queries, keys, aggregate=aggregate)
        assert out.pair_log_probs.dtype == torch.float32 and out.ref_rows.dtype == torch.float32
        assert torch.isfinite(out.pair_log_probs).all() and torch.isfinite(out.ref_rows).all()
        grads = torch.autograd.grad(out.pair_log_probs.sum() + out.ref_rows.square().sum(), queries + keys)
        assert all(g.dtype == torch.bfloat16 and torch.isfinite(g).all() for g in grads)


def test_capture_holds_no_attention_map_between_blocks():
    """What autograd keeps per block is O(P·H + K·N_tgt), not O(N_ref·N_tgt)."""
    corr = Correspondences.from_dicts([[{u: u for u in range(8)} for _ in range(4)]], [256] * 4, 1024)
    queries, keys = random_qk(corr, 1, 4, 8, dtype=torch.float32)
    saved: list[torch.Tensor] = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _capture(corr, queries, keys, aggregate="points")
    fed = {q.data_ptr() for q in queries + keys}
    extra = sum(t.numel() for t in saved if t.data_ptr() not in fed)
    assert extra < 4 * 32 * 8 + 4 * 1024 + 4 * 1024, extra  # lse (H·M), pair (M), weights, rows
    assert extra < corr.total_ref_tokens * corr.tgt_tokens // 50


@pytest.mark.parametrize(
    "query_shape, key_shape, match",
    [
        ((2, 2, 9, 4), (2, 2, 12, 4), r"`query` of shape \(B, H, N_ref_total, D\) = \(1, \?, 9, \?\), but got \(2, 2, 9, 4\)"),
        ((1, 2, 8, 4), (1, 2, 12, 4), r"`query` of shape .* = \(1, \?, 9, \?\), but got \(1, 2, 8, 4\)"),
        ((1, 2, 9), (1, 2, 12, 4), r"`query` with 4 dims"),
        ((1, 2, 9, 4), (1, 3, 12, 4), r"`key` of shape \(B, H, N_tgt, D\) = \(1, 2, 12, 4\), but got \(1, 3, 12, 4\)"),
        ((1, 2, 9, 4), (1, 2, 11, 4), r"`key` of shape .* but got \(1, 2, 11, 4\)"),
    ],
)
def test_bad_shapes_raise(query_shape, key_shape, match):
    corr = Correspondences.from_dicts([[{0: 1}, {0: 2}]], [4, 5], 12)
    capture = RefTargetCapture(corr)
    with pytest.raises(ValueError, match=match):
        capture.add(torch.randn(query_shape), torch.randn(key_shape))


def test_bad_arguments_and_state():
    corr = Correspondences.from_dicts([[{0: 1}]], [4], 6)
    with pytest.raises(ValueError, match=r"`aggregate` to be one of \['points', 'all', None\], but got 'mean'"):
        RefTargetCapture(corr, aggregate="mean")
    with pytest.raises(ValueError, match="`corr` to be a Correspondences"):
        RefTargetCapture([[{0: 1}]])
    with pytest.raises(ValueError, match="`scale`"):
        RefTargetCapture(corr, scale=-1.0)
    with pytest.raises(ValueError, match="`scale`"):
        RefTargetCapture(corr, scale=True)
    with pytest.raises(ValueError, match=r"`key` with the dtype of `query` \(torch.float64\), but got torch.float32"):
        RefTargetCapture(corr).add(torch.randn(1, 2, 4, 3, dtype=torch.float64), torch.randn(1, 2, 6, 3))
    with pytest.raises(ValueError, match="floating dtype"):
        dense_ref_target_attention([torch.ones(1, 1, 4, 2, dtype=torch.long)], [torch.ones(1, 1, 6, 2, dtype=torch.long)])
    capture = RefTargetCapture(corr)
    with pytest.raises(ValueError, match="at least one block"):
        capture.result()
    with pytest.raises(ValueError, match="floating dtype"):
        capture.add(torch.ones(1, 1, 4, 2, dtype=torch.long), torch.ones(1, 1, 6, 2, dtype=torch.long))
    with pytest.warns(UserWarning, match="would train nothing"):  # grad mode on, nothing requires grad
        capture.add(torch.randn(1, 2, 4, 3), torch.randn(1, 2, 6, 3))
    with pytest.raises(ValueError, match=r"every block with \(H, D\) = \(2, 3\), but got \(4, 3\)"):
        capture.add(torch.randn(1, 4, 4, 3), torch.randn(1, 4, 6, 3))
    with pytest.raises(ValueError, match="float64"):
        capture.add(torch.randn(1, 2, 4, 3, dtype=torch.float64), torch.randn(1, 2, 6, 3, dtype=torch.float64))
    assert capture.num_blocks == 1
    capture.reset()
    assert capture.num_blocks == 0


def test_no_points_at_all():
    corr = Correspondences.from_dicts([[{}, {}], []], [3, 2], 4)
    queries, keys = random_qk(corr, 2, 2, 4)
    for aggregate in ("points", "all"):
        out = _capture(corr, queries, keys, aggregate=aggregate)
        assert out.pair_log_probs.shape == (2, 2, 0)
        if aggregate == "points":
            assert torch.equal(out.ref_rows, torch.zeros(2, 2, 4, dtype=torch.float64))
        else:
            assert torch.allclose(out.ref_rows[0].sum(-1), torch.ones(2, dtype=torch.float64))
            assert torch.equal(out.ref_rows[1], torch.zeros(2, 4, dtype=torch.float64))


def test_every_case_runs_all_chunkings_identically():
    corr = random_corr(5, 2, 3)
    queries, keys = random_qk(corr, 2, 3, 4)
    results = [
        _capture(corr, queries, keys, aggregate=aggregate, max_chunk_elements=_chunk_elements(corr, 3, rows))
        for aggregate in ("points", "all")
        for rows in (1, 2, 3, 7, None)
    ]
    results = results[:5], results[5:]
    for same_aggregate in results:
        for a, b in itertools.pairwise(same_aggregate):
            torch.testing.assert_close(a.pair_log_probs, b.pair_log_probs, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(a.ref_rows, b.ref_rows, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("aggregate", ["points", "all", None])
def test_autocast_does_not_lower_the_loss_math(aggregate):
    corr = random_corr(12, 2, 3, tgt_tokens=20)
    queries, keys = random_qk(corr, 2, 2, 16, dtype=torch.float32, scale=3.0)
    plain = _capture(corr, queries, keys, aggregate=aggregate)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = _capture(corr, queries, keys, aggregate=aggregate)
    torch.testing.assert_close(autocast.pair_log_probs, plain.pair_log_probs, rtol=1e-6, atol=1e-6)
    if aggregate is not None:
        torch.testing.assert_close(autocast.ref_rows, plain.ref_rows, rtol=1e-6, atol=1e-7)
    g_plain = torch.autograd.grad(plain.pair_log_probs.sum(), queries + keys)
    g_auto = torch.autograd.grad(autocast.pair_log_probs.sum(), queries + keys)
    for a, b in zip(g_auto, g_plain):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
