"""Independent parity check of SCAL and MDL against the MOSAIC paper (section 4, eq. 8-14).

The reference implementation below was written from the paper and the documented public API
contract only, without reading the library's implementation. It is deliberately naive:
float64, plain Python loops over samples / references / points / pairs, and attention built by
an explicit per-block, per-head softmax over the *target* logits (eq. 8).

Both input paths of ``scal`` / ``mdl`` are compared against it:

* the dense path (``x`` = A of shape ``(B, N_ref_total, N_tgt)``), values and dL/dA;
* the capture path (``RefTargetCapture`` fed with per-block queries/keys), values and the
  gradients w.r.t. every block's queries and keys.

Semantics checked (contract):

* eq. 8  A = mean over blocks and heads of softmax_v(q_u . k_v / sqrt(D)), target keys only.
* eq. 9  global row of local reference token u of reference k = n_1 + ... + n_{k-1} + u.
* eq. 10 SCAL per sample, "per_ref": mean over refs with points of the mean over their points of
         -log(A[G(u), v] + eps); "pooled": one mean over all points of the sample.
* eq. 11-14 MDL per sample: per taking-part reference the mean of A rows over its points
         ("points") or over all its tokens ("all"), L1-normalised; then
         -1/(K'(K'-1)) * sum over ordered pairs i != j of dist (symmetric KL or JSD).
* Absent references (sample list shorter than K) never take part; empty dicts are present
  references without points. Batch value = mean over contributing samples, 0.0 if none.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from torch.testing import assert_close

from mosaic_kit.attention import RefTargetCapture
from mosaic_kit.correspondence import Correspondences
from mosaic_kit.losses.functional import mdl, scal

DTYPE = torch.float64
RTOL, ATOL = 1e-6, 1e-9
JSD_DEFAULT_EPS = 1e-8


# --------------------------------------------------------------------------------------------
# Naive reference implementation (straight from the equations)
# --------------------------------------------------------------------------------------------


def ref_offsets(ref_tokens):
    """eq. 9: offset_k = n_1 + ... + n_{k-1}."""
    offsets, running = [], 0
    for n in ref_tokens:
        offsets.append(running)
        running += n
    return offsets


def naive_attention(queries, keys):
    """eq. 8, averaged over blocks *and* heads.

    queries[l]: (B, H, N_ref_total, D), keys[l]: (B, H, N_tgt, D) for block l.
    Returns A: (B, N_ref_total, N_tgt).
    """
    n_blocks = len(queries)
    batch, n_heads, _, dim = queries[0].shape
    per_sample = []
    for b in range(batch):
        acc = 0.0
        for l in range(n_blocks):
            for h in range(n_heads):
                q = queries[l][b, h]  # (N_ref_total, D)
                k = keys[l][b, h]  # (N_tgt, D)
                logits = (q @ k.transpose(0, 1)) / math.sqrt(dim)  # (N_ref_total, N_tgt)
                shifted = logits - logits.amax(dim=1, keepdim=True).detach()
                e = torch.exp(shifted)
                softmax_over_targets = e / e.sum(dim=1, keepdim=True)
                acc = acc + softmax_over_targets
        per_sample.append(acc / (n_blocks * n_heads))
    return torch.stack(per_sample)


def _batch_mean(values):
    if not values:
        return torch.zeros((), dtype=DTYPE)
    return sum(values) / len(values)


def naive_scal(A, samples, ref_tokens, reduction, eps):
    """eq. 10 (reduction="per_ref") or the released one-mean-per-sample ("pooled")."""
    offsets = ref_offsets(ref_tokens)
    per_sample = []
    for b, refs in enumerate(samples):
        per_ref_losses, all_terms = [], []
        for k, pairs in enumerate(refs):  # absent references are simply not in `refs`
            if not pairs:
                continue  # present but without points: takes no part
            terms = [-torch.log(A[b, offsets[k] + u, v] + eps) for u, v in pairs.items()]
            per_ref_losses.append(sum(terms) / len(terms))
            all_terms.extend(terms)
        if not all_terms:
            continue  # sample without points contributes nothing
        if reduction == "per_ref":
            per_sample.append(sum(per_ref_losses) / len(per_ref_losses))
        elif reduction == "pooled":
            per_sample.append(sum(all_terms) / len(all_terms))
        else:
            raise ValueError(reduction)
    return _batch_mean(per_sample)


def naive_kl(p, q, eps):
    """KL(p || q) of two distributions over the target tokens (1-D tensors)."""
    return (p * (torch.log(p + eps) - torch.log(q + eps))).sum()


def naive_sym_kl(p, q, eps):
    """eq. 13."""
    return 0.5 * naive_kl(p, q, eps) + 0.5 * naive_kl(q, p, eps)


def naive_jsd(p, q, eps):
    m = (p + q) / 2
    left = (p * (torch.log(p + eps) - torch.log(m + eps))).sum()
    right = (q * (torch.log(q + eps) - torch.log(m + eps))).sum()
    return 0.5 * left + 0.5 * right


def naive_mdl(A, samples, ref_tokens, divergence, aggregate, eps):
    """eq. 11-14."""
    if eps is None:  # documented defaults: sym_kl only clamps underflow, JSD uses 1e-8
        eps = 0.0 if divergence == "sym_kl" else JSD_DEFAULT_EPS
    dist = {"sym_kl": naive_sym_kl, "jsd": naive_jsd}[divergence]
    offsets = ref_offsets(ref_tokens)
    per_sample = []
    for b, refs in enumerate(samples):
        aggregated = []
        for k, pairs in enumerate(refs):
            if aggregate == "points":
                rows = list(pairs.keys())  # eq. 11: rows of the annotated points
            elif aggregate == "all":
                rows = list(range(ref_tokens[k]))  # every token of the present reference
            else:
                raise ValueError(aggregate)
            if not rows:
                continue
            mean_row = sum(A[b, offsets[k] + u] for u in rows) / len(rows)  # eq. 11-12
            aggregated.append(mean_row / mean_row.abs().sum())  # L1 normalisation
        n_part = len(aggregated)
        if n_part < 2:
            continue
        pair_sum = 0.0
        for i in range(n_part):
            for j in range(n_part):
                if i != j:
                    pair_sum = pair_sum + dist(aggregated[i], aggregated[j], eps)
        per_sample.append(-pair_sum / (n_part * (n_part - 1)))  # eq. 14
    return _batch_mean(per_sample)


# --------------------------------------------------------------------------------------------
# Random test cases
# --------------------------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    samples: list  # [batch][present refs] -> {ref_token: tgt_token}
    ref_tokens: list
    n_tgt: int
    queries: list  # per block (B, H, N_ref_total, D)
    keys: list  # per block (B, H, N_tgt, D)

    def corr(self):
        return Correspondences.from_dicts(
            self.samples, ref_tokens=list(self.ref_tokens), tgt_tokens=self.n_tgt
        )


def _randint(g, low, high):
    """Uniform integer in [low, high]."""
    return int(torch.randint(low, high + 1, (1,), generator=g))


def make_case(name, seed, batch, n_refs, n_blocks, n_heads, dim, scale=1.0, all_present=False):
    g = torch.Generator().manual_seed(seed)
    ref_tokens = [_randint(g, 1, 5) for _ in range(n_refs)]

    # local reference tokens per present reference (target tokens assigned below)
    local = []
    for b in range(batch):
        n_present = n_refs if (b == 0 or all_present) else _randint(g, 0, n_refs)
        refs = []
        for k in range(n_present):
            empty = float(torch.rand((), generator=g)) < 0.25
            n_points = 0 if empty else _randint(g, 1, min(ref_tokens[k], 3))
            refs.append(torch.randperm(ref_tokens[k], generator=g)[:n_points].tolist())
        local.append(refs)

    most_points = max((sum(len(r) for r in refs) for refs in local), default=0)
    n_tgt = max(most_points, 3) + _randint(g, 0, 5)

    samples = []
    for refs in local:
        # eq. 2: target tokens disjoint across the references of one sample
        tgt_pool = torch.randperm(n_tgt, generator=g).tolist()
        sample = []
        for ref_points in refs:
            sample.append({int(u): int(tgt_pool.pop()) for u in ref_points})
        samples.append(sample)

    n_ref_total = sum(ref_tokens)
    queries = [
        scale * torch.randn(batch, n_heads, n_ref_total, dim, generator=g, dtype=DTYPE)
        for _ in range(n_blocks)
    ]
    keys = [
        torch.randn(batch, n_heads, n_tgt, dim, generator=g, dtype=DTYPE) for _ in range(n_blocks)
    ]
    return Case(name, samples, ref_tokens, n_tgt, queries, keys)


#          name           seed  B  K  blocks heads D   logit scale
CASE_SPECS = [
    ("B1-K1-L1-H1", 11, 1, 1, 1, 1, 2, 1.0),
    ("B1-K2-L2-H2", 12, 1, 2, 2, 2, 4, 1.0),
    ("B2-K3-L1-H3", 13, 2, 3, 1, 3, 3, 1.0),
    ("B3-K4-L3-H4", 14, 3, 4, 3, 4, 4, 1.0),
    ("B2-K5-L2-H1", 15, 2, 5, 2, 1, 8, 1.0),
    ("B3-K6-L2-H2", 16, 3, 6, 2, 2, 4, 1.0),
    # sharp attention: tiny probabilities make the eps conventions observable
    ("B3-K6-L1-H2-sharp", 17, 3, 6, 1, 2, 4, 12.0),
    ("B2-K3-L3-H4-sharp", 18, 2, 3, 3, 4, 2, 6.0),
    # nearly uniform attention: MDL values close to zero
    ("B3-K5-L2-H3-flat", 19, 3, 5, 2, 3, 4, 0.1),
]
CASES = {spec[0]: make_case(*spec) for spec in CASE_SPECS}
CASE_IDS = list(CASES)

SCAL_OPTIONS = [
    (reduction, eps) for reduction in ("per_ref", "pooled") for eps in (0.0, 1e-9)
]
MDL_DIVERGENCES = [("sym_kl", 0.0), ("sym_kl", None), ("jsd", None), ("jsd", 0.0), ("jsd", 1e-9)]
MDL_OPTIONS = [(div, eps, agg) for div, eps in MDL_DIVERGENCES for agg in ("points", "all")]


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def grads_of(loss, inputs):
    """Gradients of `loss` w.r.t. `inputs`; zeros where the loss does not depend on them."""
    if not loss.requires_grad:
        return [torch.zeros_like(x) for x in inputs]
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]


def leaves(tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def library_capture(fn, case, capture_aggregate, **options):
    qs, ks = leaves(case.queries), leaves(case.keys)
    corr = case.corr()
    cap = RefTargetCapture(corr, aggregate=capture_aggregate)
    for q, k in zip(qs, ks):
        cap.add(q, k)
    loss = fn(cap.result(), corr, **options)
    return loss, grads_of(loss, qs + ks)


def naive_capture(naive_fn, case, **options):
    qs, ks = leaves(case.queries), leaves(case.keys)
    loss = naive_fn(naive_attention(qs, ks), case.samples, case.ref_tokens, **options)
    return loss, grads_of(loss, qs + ks)


def library_dense(fn, case, **options):
    (A,) = leaves([naive_attention(case.queries, case.keys)])
    loss = fn(A, case.corr(), **options)
    return loss, grads_of(loss, [A])


def naive_dense(naive_fn, case, **options):
    (A,) = leaves([naive_attention(case.queries, case.keys)])
    loss = naive_fn(A, case.samples, case.ref_tokens, **options)
    return loss, grads_of(loss, [A])


def assert_parity(got, expected, what):
    got_value, got_grads = got
    exp_value, exp_grads = expected
    assert got_value.dtype == DTYPE, f"{what}: value dtype {got_value.dtype}"
    assert_close(
        got_value.detach(), exp_value.detach(), rtol=RTOL, atol=ATOL,
        msg=lambda m: f"{what}: value differs from the paper reference\n{m}",
    )
    for i, (g, e) in enumerate(zip(got_grads, exp_grads)):
        assert_close(
            g, e, rtol=RTOL, atol=ATOL,
            msg=lambda m, i=i: f"{what}: gradient #{i} differs from the paper reference\n{m}",
        )


# --------------------------------------------------------------------------------------------
# Parity tests
# --------------------------------------------------------------------------------------------


def test_cases_cover_the_edge_cases():
    """The random cases really contain absent refs, empty refs and non-contributing samples."""
    absent = empty = no_points = single_part = multi_part = False
    for case in CASES.values():
        k_total = len(case.ref_tokens)
        for refs in case.samples:
            absent |= len(refs) < k_total
            empty |= any(not pairs for pairs in refs)
            with_points = sum(1 for pairs in refs if pairs)
            no_points |= with_points == 0
            single_part |= with_points == 1
            multi_part |= with_points >= 3
    assert absent and empty and no_points and single_part and multi_part


def test_naive_attention_rows_are_distributions():
    case = CASES["B3-K4-L3-H4"]
    A = naive_attention(case.queries, case.keys)
    assert A.shape == (3, sum(case.ref_tokens), case.n_tgt)
    assert_close(A.sum(-1), torch.ones(A.shape[:2], dtype=DTYPE))
    assert_close(A, torch.softmax(
        torch.stack([q @ k.transpose(-1, -2) for q, k in zip(case.queries, case.keys)])
        / math.sqrt(case.queries[0].shape[-1]), dim=-1).mean(dim=(0, 2)))


@pytest.mark.parametrize("reduction,eps", SCAL_OPTIONS)
@pytest.mark.parametrize("case_id", CASE_IDS)
def test_scal_dense_matches_paper(case_id, reduction, eps):
    case = CASES[case_id]
    got = library_dense(scal, case, reduction=reduction, eps=eps)
    expected = naive_dense(naive_scal, case, reduction=reduction, eps=eps)
    assert_parity(got, expected, f"scal dense {case_id} reduction={reduction} eps={eps}")


@pytest.mark.parametrize("capture_aggregate", ["points", "all"])
@pytest.mark.parametrize("reduction,eps", SCAL_OPTIONS)
@pytest.mark.parametrize("case_id", CASE_IDS)
def test_scal_capture_matches_paper(case_id, reduction, eps, capture_aggregate):
    case = CASES[case_id]
    got = library_capture(scal, case, capture_aggregate, reduction=reduction, eps=eps)
    expected = naive_capture(naive_scal, case, reduction=reduction, eps=eps)
    assert_parity(
        got, expected,
        f"scal capture({capture_aggregate}) {case_id} reduction={reduction} eps={eps}",
    )


@pytest.mark.parametrize("divergence,eps,aggregate", MDL_OPTIONS)
@pytest.mark.parametrize("case_id", CASE_IDS)
def test_mdl_dense_matches_paper(case_id, divergence, eps, aggregate):
    case = CASES[case_id]
    options = dict(divergence=divergence, aggregate=aggregate, eps=eps)
    got = library_dense(mdl, case, **options)
    expected = naive_dense(naive_mdl, case, **options)
    assert_parity(got, expected, f"mdl dense {case_id} {options}")


@pytest.mark.parametrize("pass_aggregate", [True, False], ids=["explicit", "from-capture"])
@pytest.mark.parametrize("divergence,eps,aggregate", MDL_OPTIONS)
@pytest.mark.parametrize("case_id", CASE_IDS)
def test_mdl_capture_matches_paper(case_id, divergence, eps, aggregate, pass_aggregate):
    case = CASES[case_id]
    got = library_capture(
        mdl, case, aggregate,
        divergence=divergence, eps=eps, aggregate=aggregate if pass_aggregate else None,
    )
    expected = naive_capture(naive_mdl, case, divergence=divergence, aggregate=aggregate, eps=eps)
    assert_parity(
        got, expected,
        f"mdl capture({aggregate}) {case_id} divergence={divergence} eps={eps} "
        f"aggregate={'explicit' if pass_aggregate else 'None'}",
    )


# --------------------------------------------------------------------------------------------
# Edge semantics
# --------------------------------------------------------------------------------------------


def _case_from(samples, ref_tokens, n_tgt, seed=0, n_blocks=2, n_heads=2, dim=4):
    g = torch.Generator().manual_seed(seed)
    batch, n_ref_total = len(samples), sum(ref_tokens)
    queries = [torch.randn(batch, n_heads, n_ref_total, dim, generator=g, dtype=DTYPE)
               for _ in range(n_blocks)]
    keys = [torch.randn(batch, n_heads, n_tgt, dim, generator=g, dtype=DTYPE)
            for _ in range(n_blocks)]
    return Case("handmade", samples, list(ref_tokens), n_tgt, queries, keys)


def _all_values(fn, case, capture_aggregate, **options):
    dense = library_dense(fn, case, **options)[0]
    captured = library_capture(fn, case, capture_aggregate, **options)[0]
    return dense, captured


NO_POINTS = _case_from([[{}, {}], [{}], []], ref_tokens=[3, 2], n_tgt=5)
AT_MOST_ONE_REF_WITH_POINTS = _case_from(
    [[{0: 1}, {}], [{}, {1: 2}], [{0: 3}], []], ref_tokens=[3, 2], n_tgt=5
)
AT_MOST_ONE_PRESENT_REF = _case_from([[{0: 1}], [], [{}]], ref_tokens=[3, 2], n_tgt=5)


@pytest.mark.parametrize("reduction,eps", SCAL_OPTIONS)
def test_scal_is_zero_when_no_sample_has_points(reduction, eps):
    for capture_aggregate in ("points", "all"):
        for value in _all_values(scal, NO_POINTS, capture_aggregate, reduction=reduction, eps=eps):
            assert float(value.detach()) == 0.0


@pytest.mark.parametrize("divergence,eps", MDL_DIVERGENCES)
def test_mdl_is_zero_when_no_sample_has_two_taking_part_refs(divergence, eps):
    for case in (NO_POINTS, AT_MOST_ONE_REF_WITH_POINTS):
        for value in _all_values(mdl, case, "points",
                                 divergence=divergence, aggregate="points", eps=eps):
            assert float(value.detach()) == 0.0
    for value in _all_values(mdl, AT_MOST_ONE_PRESENT_REF, "all",
                             divergence=divergence, aggregate="all", eps=eps):
        assert float(value.detach()) == 0.0


@pytest.mark.parametrize("divergence,eps", MDL_DIVERGENCES)
def test_mdl_all_counts_present_refs_without_points(divergence, eps):
    """With aggregate="all", empty (present) references take part; absent ones never do."""
    case = _case_from([[{}, {}], [{}, {}, {1: 2}], [{0: 0}]], ref_tokens=[2, 3, 4], n_tgt=6)
    options = dict(divergence=divergence, eps=eps)
    expected = naive_dense(naive_mdl, case, aggregate="all", **options)[0]
    assert float(expected.detach()) < 0.0
    for value in _all_values(mdl, case, "all", aggregate="all", **options):
        assert_close(value.detach(), expected.detach(), rtol=RTOL, atol=ATOL)
    for value in _all_values(mdl, case, "points", aggregate="points", **options):
        assert float(value.detach()) == 0.0


# --------------------------------------------------------------------------------------------
# Invariance under permuting the references
# --------------------------------------------------------------------------------------------


def permute_case(case, perm):
    offsets = ref_offsets(case.ref_tokens)
    rows = torch.cat([
        torch.arange(offsets[p], offsets[p] + case.ref_tokens[p]) for p in perm
    ])
    return Case(
        name=f"{case.name}-perm{perm}",
        samples=[[refs[p] for p in perm] for refs in case.samples],
        ref_tokens=[case.ref_tokens[p] for p in perm],
        n_tgt=case.n_tgt,
        queries=[q[:, :, rows] for q in case.queries],
        keys=list(case.keys),
    )


PERMUTATION_CASES = {
    "B3-K4": make_case("B3-K4-present", 21, 3, 4, 2, 2, 4, all_present=True),
    "B2-K6": make_case("B2-K6-present", 22, 2, 6, 1, 3, 3, all_present=True),
    "B2-K5-sharp": make_case("B2-K5-present-sharp", 23, 2, 5, 3, 2, 4, 6.0, all_present=True),
}


def _loss_values(case):
    """All SCAL / MDL option combinations, dense and capture path, as floats."""
    values = {}
    for reduction, eps in SCAL_OPTIONS:
        for capture_aggregate in ("points", "all"):
            dense, captured = _all_values(scal, case, capture_aggregate,
                                          reduction=reduction, eps=eps)
            values[("scal", reduction, eps, "dense")] = dense.detach()
            values[("scal", reduction, eps, f"capture-{capture_aggregate}")] = captured.detach()
    for divergence, eps, aggregate in MDL_OPTIONS:
        dense, captured = _all_values(mdl, case, aggregate,
                                      divergence=divergence, eps=eps, aggregate=aggregate)
        values[("mdl", divergence, eps, aggregate, "dense")] = dense.detach()
        values[("mdl", divergence, eps, aggregate, "capture")] = captured.detach()
    return values


@pytest.mark.parametrize("case_id", list(PERMUTATION_CASES))
def test_losses_are_invariant_to_reference_order(case_id):
    case = PERMUTATION_CASES[case_id]
    k = len(case.ref_tokens)
    assert all(len(refs) == k for refs in case.samples)
    assert any(not pairs for refs in case.samples for pairs in refs)  # has empty refs
    g = torch.Generator().manual_seed(k)
    perms = [tuple(reversed(range(k))), tuple(torch.randperm(k, generator=g).tolist())]
    before = _loss_values(case)
    for perm in perms:
        after = _loss_values(permute_case(case, perm))
        for key, value in before.items():
            assert_close(after[key], value, rtol=RTOL, atol=ATOL,
                         msg=lambda m, key=key: f"{key} changed under perm={perm}\n{m}")


# --------------------------------------------------------------------------------------------
# The options really are distinguishable on these inputs (so the parity tests have teeth)
# --------------------------------------------------------------------------------------------


def _naive(fn, case, **options):
    A = naive_attention(case.queries, case.keys)
    return float(fn(A, case.samples, case.ref_tokens, **options))


def _clearly_different(a, b):
    return abs(a - b) > 100 * (RTOL * max(abs(a), abs(b)) + ATOL)


def test_options_are_observable_on_the_test_inputs():
    sharp = CASES["B3-K6-L1-H2-sharp"]
    for eps in (0.0, 1e-9):
        assert _clearly_different(_naive(naive_scal, sharp, reduction="per_ref", eps=eps),
                                  _naive(naive_scal, sharp, reduction="pooled", eps=eps))
    for reduction in ("per_ref", "pooled"):
        assert _clearly_different(_naive(naive_scal, sharp, reduction=reduction, eps=0.0),
                                  _naive(naive_scal, sharp, reduction=reduction, eps=1e-9))
    for aggregate in ("points", "all"):
        assert _clearly_different(
            _naive(naive_mdl, sharp, divergence="sym_kl", aggregate=aggregate, eps=0.0),
            _naive(naive_mdl, sharp, divergence="jsd", aggregate=aggregate, eps=0.0))
    for divergence in ("sym_kl", "jsd"):
        assert _clearly_different(
            _naive(naive_mdl, sharp, divergence=divergence, aggregate="points", eps=0.0),
            _naive(naive_mdl, sharp, divergence=divergence, aggregate="all", eps=0.0))


def test_mdl_eps_conventions_on_tiny_probabilities():
    """Hand-made A whose two references differ only on probabilities of order 1e-8.

    For JSD the eps inside the logs (default 1e-8) then changes the value by ~10%; for the
    symmetric KL the default (eps=None) must only clamp underflow, i.e. equal eps=0.
    """
    rows = torch.tensor([
        [0.5, 0.5 - 4e-8, 1e-8, 3e-8],  # reference 1, token 0
        [0.5, 0.5 - 4e-8, 3e-8, 1e-8],  # reference 2, token 0
    ], dtype=DTYPE)
    samples = [[{0: 0}, {0: 1}]]
    corr = Correspondences.from_dicts(samples, ref_tokens=[1, 1], tgt_tokens=4)

    values = {}
    for divergence, eps in MDL_DIVERGENCES:
        A = rows.clone()[None].requires_grad_(True)
        got = mdl(A, corr, divergence=divergence, aggregate="points", eps=eps)
        A_ref = rows.clone()[None].requires_grad_(True)
        expected = naive_mdl(A_ref, samples, [1, 1], divergence, "points", eps)
        what = f"mdl tiny-probabilities divergence={divergence} eps={eps}"
        assert_close(got.detach(), expected.detach(), rtol=RTOL, atol=0.0,
                     msg=lambda m, what=what: f"{what}\n{m}")
        assert_close(grads_of(got, [A])[0], grads_of(expected, [A_ref])[0],
                     rtol=RTOL, atol=ATOL, msg=lambda m, what=what: f"{what} (grad)\n{m}")
        values[divergence, eps] = float(expected.detach())
    # the eps conventions are distinguishable here, so the parity above has teeth
    assert abs(values["jsd", None] - values["jsd", 0.0]) > 0.05 * abs(values["jsd", 0.0])
    assert abs(values["jsd", 1e-9] - values["jsd", 0.0]) > 1e-3 * abs(values["jsd", 0.0])
