"""SCAL, MDL and the objective: capture path against the dense float64 twin, properties, errors."""

import math
import random

import pytest
import torch
from helpers import random_corr, random_dicts, random_qk
from hypothesis import given
from hypothesis import strategies as st

from mosaic_kit.attention import RefTargetCapture, dense_ref_target_attention
from mosaic_kit.correspondence import Correspondences
from mosaic_kit.losses import (
    MDL,
    SCAL,
    ConstantSchedule,
    LinearRampSchedule,
    MosaicObjective,
    flow_matching_loss,
)
from mosaic_kit.losses.functional import mdl, scal


def _capture(corr, queries, keys, aggregate="points"):
    capture = RefTargetCapture(corr, aggregate=aggregate, max_chunk_elements=64)
    for q, k in zip(queries, keys):
        capture.add(q, k)
    return capture.result()


LOSS_OPTIONS = [
    ("scal", dict(reduction="per_ref", eps=0.0)),
    ("scal", dict(reduction="pooled", eps=0.0)),
    ("scal", dict(reduction="per_ref", eps=1e-9)),
    ("scal", dict(reduction="pooled", eps=1e-9)),
    ("mdl", dict(divergence="sym_kl", aggregate="points")),
    ("mdl", dict(divergence="sym_kl", aggregate="all")),
    ("mdl", dict(divergence="jsd", aggregate="points")),
    ("mdl", dict(divergence="jsd", aggregate="all")),
    ("mdl", dict(divergence="sym_kl", aggregate="points", eps=1e-6)),
    ("mdl", dict(divergence="jsd", aggregate="points", eps=0.0)),
    ("mdl", dict(divergence="jsd", aggregate="all", eps=0.0)),
]
LOSSES = {"scal": scal, "mdl": mdl}


@pytest.mark.parametrize("name, options", LOSS_OPTIONS)
@pytest.mark.parametrize("seed, batch, refs, blocks, heads", [(0, 1, 1, 1, 1), (1, 2, 2, 2, 3), (2, 3, 4, 3, 2), (3, 2, 6, 2, 4)])
def test_capture_path_equals_dense_twin(name, options, seed, batch, refs, blocks, heads):
    corr = random_corr(seed, batch, refs)
    queries, keys = random_qk(corr, blocks, heads, 8, seed=seed)
    aggregate = options.get("aggregate", "points")
    fast = LOSSES[name](_capture(corr, queries, keys, aggregate), corr, **options)
    slow = LOSSES[name](dense_ref_target_attention(queries, keys), corr, **options)
    assert fast.dtype == slow.dtype == torch.float64
    torch.testing.assert_close(fast, slow, rtol=1e-6, atol=1e-12)
    if not slow.requires_grad:
        return
    fast_grads = torch.autograd.grad(fast, queries + keys, allow_unused=True)
    slow_grads = torch.autograd.grad(slow, queries + keys, allow_unused=True)
    for a, b in zip(fast_grads, slow_grads):
        a = torch.zeros_like(queries[0]) if a is None and b is None else a
        torch.testing.assert_close(a, b if b is not None else torch.zeros_like(a), rtol=1e-6, atol=1e-10)


def test_hand_computed_values():
    # Sample 0: ref 0 (2 tokens) has points {0→1, 1→1}; ref 1 (1 token) has {0→0}. Sample 1: ref 0 only.
    corr = Correspondences.from_dicts([[{0: 1, 1: 1}, {0: 0}], [{1: 0}]], [2, 1], 2)
    A = torch.tensor(
        [[[0.5, 0.5], [0.25, 0.75], [0.9, 0.1]], [[0.6, 0.4], [0.2, 0.8], [0.5, 0.5]]], dtype=torch.float64
    )
    per_ref_0 = -(0.5 * (math.log(0.5) + math.log(0.75)) + math.log(0.9)) / 2
    pooled_0 = -(math.log(0.5) + math.log(0.75) + math.log(0.9)) / 3
    sample_1 = -math.log(0.2)
    assert scal(A, corr).item() == pytest.approx((per_ref_0 + sample_1) / 2, rel=1e-12)
    assert scal(A, corr, reduction="pooled").item() == pytest.approx((pooled_0 + sample_1) / 2, rel=1e-12)
    # MDL: only sample 0 has two references. Rows: ref 0 = mean([.5,.5],[.25,.75]) = [.375,.625]; ref 1 = [.9,.1].
    a, b = torch.tensor([0.375, 0.625]), torch.tensor([0.9, 0.1])
    sym = 0.5 * ((a - b) * (a.log() - b.log())).sum().item()
    assert mdl(A, corr).item() == pytest.approx(-sym, rel=1e-6)
    m = (a + b) / 2
    jsd = 0.5 * (a * (a.log() - m.log())).sum() + 0.5 * (b * (b.log() - m.log())).sum()
    assert mdl(A, corr, divergence="jsd", eps=0.0).item() == pytest.approx(-jsd.item(), rel=1e-6)
    # 'all': ref 0 row = mean of its two token rows (same as its points here).
    assert mdl(A, corr, aggregate="all").item() == pytest.approx(-sym, rel=1e-6)


def test_nothing_to_average_gives_zero_connected_to_the_graph():
    corr = Correspondences.from_dicts([[{}, {}], [{0: 1}]], [2, 2], 3)
    A = torch.full((2, 4, 3), 1 / 3, dtype=torch.float64, requires_grad=True)
    value = mdl(A, corr)  # sample 0: refs without points; sample 1: one reference
    assert value.item() == 0.0
    value.backward()
    assert torch.equal(A.grad, torch.zeros_like(A))
    empty = Correspondences.from_dicts([[{}], []], [2], 3)
    assert scal(A[:, :2], empty).item() == 0.0
    # With 'all', present references take part even without points.
    assert mdl(A, corr, aggregate="all").item() == pytest.approx(0.0, abs=1e-12)


@st.composite
def attention_inputs(draw):
    seed = draw(st.integers(0, 2**31 - 1))
    rng = random.Random(seed)
    refs = draw(st.integers(1, 6))
    ref_tokens = [rng.randint(1, 6) for _ in range(refs)]
    tgt = rng.randint(1, 10)
    samples = random_dicts(rng, draw(st.integers(1, 3)), ref_tokens, tgt, absent_prob=0.3, empty_prob=0.3)
    corr = Correspondences.from_dicts(samples, ref_tokens, tgt)
    scale = draw(st.sampled_from([1e-3, 1.0, 30.0, 300.0]))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float64]))
    queries, keys = random_qk(corr, draw(st.integers(1, 3)), draw(st.integers(1, 3)), 4, dtype=dtype, scale=scale, seed=seed)
    return corr, queries, keys


@given(attention_inputs(), st.sampled_from(LOSS_OPTIONS))
def test_losses_and_gradients_are_finite_for_every_valid_input(inputs, option):
    corr, queries, keys = inputs
    name, options = option
    value = LOSSES[name](_capture(corr, queries, keys, options.get("aggregate", "points")), corr, **options)
    assert torch.isfinite(value)
    if name == "mdl":
        assert value.item() <= 1e-6
    else:
        assert value.item() >= -1e-6
    grads = torch.autograd.grad(value, queries + keys, allow_unused=True)
    assert all(g is None or torch.isfinite(g).all() for g in grads)


@given(attention_inputs(), st.sampled_from(LOSS_OPTIONS), st.randoms(use_true_random=False))
def test_permuting_the_references_changes_nothing(inputs, option, rnd):
    corr, queries, keys = inputs
    name, options = option
    order = list(range(corr.num_refs))
    rnd.shuffle(order)
    # Permute the slots and the matching blocks of reference query rows.
    slices = [torch.arange(o, o + n) for o, n in zip(corr.ref_offsets, corr.ref_tokens)]
    row_order = torch.cat([slices[k] for k in order])
    permuted = Correspondences(
        ref_index=corr.ref_index[:, order], tgt_index=corr.tgt_index[:, order],
        point_mask=corr.point_mask[:, order], ref_present=corr.ref_present[:, order],
        ref_tokens=tuple(corr.ref_tokens[k] for k in order), tgt_tokens=corr.tgt_tokens,
    )
    permuted_queries = [q[:, :, row_order] for q in queries]
    aggregate = options.get("aggregate", "points")
    a = LOSSES[name](_capture(corr, queries, keys, aggregate), corr, **options)
    b = LOSSES[name](_capture(permuted, permuted_queries, keys, aggregate), permuted, **options)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_modules_call_the_functions():
    corr = random_corr(4, 2, 3)
    queries, keys = random_qk(corr, 2, 2, 4)
    out = _capture(corr, queries, keys)
    assert SCAL("pooled", 1e-9)(out, corr) == scal(out, corr, reduction="pooled", eps=1e-9)
    assert MDL("jsd")(out, corr) == mdl(out, corr, divergence="jsd")
    assert "pooled" in repr(SCAL("pooled")) and "jsd" in repr(MDL("jsd"))


def test_bad_inputs_raise():
    corr = Correspondences.from_dicts([[{0: 1}, {0: 2}]], [2, 2], 3)
    A = torch.full((1, 4, 3), 1 / 3)
    with pytest.raises(ValueError, match=r"`reduction` to be one of \['per_ref', 'pooled'\], but got 'mean'"):
        scal(A, corr, reduction="mean")
    with pytest.raises(ValueError, match=r"`divergence` to be one of \['sym_kl', 'jsd'\], but got 'kl'"):
        mdl(A, corr, divergence="kl")
    with pytest.raises(ValueError, match=r"`aggregate` to be one of"):
        mdl(A, corr, aggregate="tokens")
    with pytest.raises(ValueError, match=r"`eps` to be a finite number >= 0, but got -1"):
        scal(A, corr, eps=-1)
    with pytest.raises(ValueError, match=r"`x` of shape \(B, N_ref_total, N_tgt\) = \(1, 4, 3\), but got \(1, 5, 3\)"):
        scal(torch.ones(1, 5, 3), corr)
    with pytest.raises(ValueError, match=r"`x` with 3 dims"):
        mdl(torch.ones(4, 3), corr)
    with pytest.raises(ValueError, match="`x` to be a CaptureResult or a dense"):
        scal([[0.5]], corr)
    with pytest.raises(ValueError, match="`corr` to be a Correspondences"):
        scal(A, None)
    with pytest.raises(ValueError, match="floating dtype"):
        scal(torch.ones(1, 4, 3, dtype=torch.long), corr)
    with pytest.raises(ValueError, match="`reduction` to be one of"):
        SCAL(reduction="sum")
    queries, keys = random_qk(corr, 1, 2, 4)
    captured = _capture(corr, queries, keys, aggregate="all")
    with pytest.raises(ValueError, match=r"`aggregate` to match the capture's aggregate 'all', but got 'points'"):
        mdl(captured, corr, aggregate="points")
    pairs_only = _capture(corr, queries, keys, aggregate=None)
    with pytest.raises(ValueError, match="aggregate=None"):
        mdl(pairs_only, corr)
    other = Correspondences.from_dicts([[{0: 1}]], [4], 3)
    with pytest.raises(ValueError, match="`x` captured for `corr`"):
        scal(captured, other)
    # Same layout, other points (as after enforce_disjoint or subsample): refused too.
    fewer = corr.with_point_mask(torch.tensor([[[True], [False]]]))
    with pytest.raises(ValueError, match="`x` captured for `corr`"):
        scal(captured, fewer)
    # Equal contents in another object are fine.
    same = Correspondences.from_dicts([[{0: 1}, {0: 2}]], [2, 2], 3)
    assert scal(captured, same) == scal(captured, corr)
    with pytest.raises(ValueError, match="`scal_eps` to be a finite number >= 0, but got -1"):
        MosaicObjective(scal_eps=-1)
    with pytest.raises(ValueError, match="`mdl_eps`"):
        MosaicObjective(mdl_eps=float("inf"))
    with pytest.raises(ValueError, match="`value` to be a finite number, but got 'a'"):
        ConstantSchedule("a")


def test_flow_matching_target_is_noise_minus_latents():
    latents, noise = torch.randn(2, 5, 4), torch.randn(2, 5, 4)
    pred = torch.randn(2, 5, 4, dtype=torch.bfloat16)
    expected = (pred.float() - (noise - latents)).square().mean()
    torch.testing.assert_close(flow_matching_loss(pred, noise, latents), expected)
    with pytest.raises(ValueError, match="`noise`"):
        flow_matching_loss(pred, noise[:1], latents)


def test_schedules():
    ramp = LinearRampSchedule(10_000, 11_000, 0.0, 1.0)
    assert [ramp(s) for s in (0, 10_000, 10_250, 11_000, 50_000)] == [0.0, 0.0, 0.25, 1.0, 1.0]
    assert ConstantSchedule(0.4)(7) == 0.4
    with pytest.raises(ValueError, match="`end_step` >= 11"):
        LinearRampSchedule(10, 10)
    with pytest.raises(ValueError, match="`value` to be a finite number, but got nan"):
        ConstantSchedule(float("nan"))


def test_objective_presets_and_total():
    corr = random_corr(6, 2, 3)
    queries, keys = random_qk(corr, 2, 2, 4)
    latents, noise, pred = (torch.randn(2, 6, 4, dtype=torch.float64) for _ in range(3))
    paper = MosaicObjective.from_preset("paper")
    out = paper(pred, noise, latents, _capture(corr, queries, keys, "points"), corr, step=5)
    assert (out.scal_weight, out.mdl_weight) == (0.4, 0.6)
    expected_scal = scal(_capture(corr, queries, keys), corr, reduction="per_ref", eps=0.0)
    expected_mdl = mdl(_capture(corr, queries, keys), corr, divergence="sym_kl")
    torch.testing.assert_close(out.scal, expected_scal)
    torch.testing.assert_close(out.mdl, expected_mdl)
    torch.testing.assert_close(out.loss, out.flow_matching + 0.4 * out.scal + 0.6 * out.mdl)
    out.loss.backward()
    assert all(q.grad is not None and torch.isfinite(q.grad).all() for q in queries)

    released = MosaicObjective.from_preset("released")
    captured_all = _capture(corr, queries, keys, "all")
    early = released(pred, noise, latents, captured_all, corr, step=100)
    late = released(pred, noise, latents, captured_all, corr, step=10_500)
    assert (early.scal_weight, early.mdl_weight, late.mdl_weight) == (0.1, 0.0, 0.5)
    torch.testing.assert_close(early.scal, scal(captured_all, corr, reduction="pooled", eps=1e-9))
    torch.testing.assert_close(late.mdl, mdl(captured_all, corr, divergence="jsd"))
    torch.testing.assert_close(late.loss, late.flow_matching + 0.1 * late.scal + 0.5 * late.mdl)
    # Pairs-only capture is enough while the MDL weight is 0.
    pairs_only = _capture(corr, queries, keys, None)
    assert released(pred, noise, latents, pairs_only, corr, step=0).mdl.item() == 0.0
    with pytest.raises(ValueError, match="has no rows"):
        released(pred, noise, latents, pairs_only, corr, step=10_500)
    # No attention at all is fine only with both weights at 0.
    none = MosaicObjective(scal_weight=0.0, mdl_weight=0.0)(pred, noise, latents, None, None)
    torch.testing.assert_close(none.loss, flow_matching_loss(pred, noise, latents))
    with pytest.raises(ValueError, match="`attention` and `corr`"):
        paper(pred, noise, latents, None, None)
    with pytest.raises(ValueError, match=r"`name` to be one of \['paper', 'released'\]"):
        MosaicObjective.from_preset("ours")
    with pytest.raises(ValueError, match="overrides among"):
        MosaicObjective.from_preset("paper", alpha=1.0)
    assert MosaicObjective.from_preset("paper", scal_weight=1.0).scal_weight(0) == 1.0
    with pytest.raises(ValueError, match="`scal_weight` to be a number or a schedule"):
        MosaicObjective(scal_weight="high")


@pytest.mark.parametrize("name, options", LOSS_OPTIONS)
def test_bf16_huge_logits_give_finite_losses_and_gradients(name, options):
    corr = random_corr(11, 2, 4, tgt_tokens=16)
    queries, keys = random_qk(corr, 3, 2, 8, dtype=torch.bfloat16, scale=40.0)  # logits up to ~±1e4
    out = _capture(corr, queries, keys, options.get("aggregate", "points"))
    value = LOSSES[name](out, corr, **options)
    grads = torch.autograd.grad(value, queries + keys)
    assert value.dtype == torch.float32 and torch.isfinite(value)
    assert all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_dense_scal_padded_slot_reading_a_zero_keeps_gradients_finite():
    corr = Correspondences.from_dicts([[{0: 1, 1: 1}], [{1: 0}]], [2], 2)  # sample 1 has a padded slot
    A = torch.tensor([[[0.5, 0.5], [0.2, 0.8]], [[0.0, 1.0], [0.3, 0.7]]], dtype=torch.float64, requires_grad=True)
    value = scal(A, corr)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(A.grad).all()
    assert A.grad[1, 0, 0] == 0.0  # the padded slot reads A[1, 0, 0] = 0 and takes no part
