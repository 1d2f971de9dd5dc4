"""RefTargetCapture fed inside checkpointed blocks (issue 12): values and gradients equal the
unchecked run and the dense twin, recomputation never counts a block twice, reentrant
checkpointing fails at once, misuse (a second step without reset, non-finite inputs, a capture
that would train nothing) says so."""

import functools
import warnings

import pytest
import torch
from helpers import random_corr
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

from mosaic_kit import finite_checks
from mosaic_kit.attention import PointAttentionRows, RefTargetCapture, dense_ref_target_attention

HEADS, DIM, WIDTH = 2, 4, 8


class ToyBlocks(torch.nn.Module):
    """A stack of blocks; each projects its tokens to q and k and feeds every capture *inside*
    the block, as an attention processor does inside a diffusers block."""

    def __init__(self, corr, blocks, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.corr = corr
        self.qk = torch.nn.ParameterList(
            torch.nn.Parameter(torch.randn(WIDTH, 2 * HEADS * DIM, generator=g, dtype=torch.float64) * 0.7)
            for _ in range(blocks)
        )
        self.mix = torch.nn.ParameterList(
            torch.nn.Parameter(torch.randn(WIDTH, WIDTH, generator=g, dtype=torch.float64) * 0.3) for _ in range(blocks)
        )

    def block(self, index, hidden, captures):
        batch, tokens, _ = hidden.shape
        qk = (hidden @ self.qk[index]).view(batch, tokens, 2, HEADS, DIM)
        n_tgt = self.corr.tgt_tokens  # layout: [target | references]
        query = qk[:, n_tgt:, 0].transpose(1, 2)  # (B, H, N_ref_total, D)
        key = qk[:, :n_tgt, 1].transpose(1, 2)  # (B, H, N_tgt, D)
        for capture in captures:
            capture.add(query, key)
        return torch.tanh(hidden @ self.mix[index]) + hidden, query, key

    def forward(self, hidden, captures, checkpointing=None):
        queries, keys = [], []
        for index in range(len(self.qk)):
            fn = functools.partial(self.block, index)
            if checkpointing is None:
                hidden, query, key = fn(hidden, captures)
            else:
                hidden, query, key = checkpoint(fn, hidden, captures, use_reentrant=checkpointing)
            queries.append(query)
            keys.append(key)
        return hidden, queries, keys


def _inputs(corr, seed=0):
    g = torch.Generator().manual_seed(seed + 100)
    tokens = corr.tgt_tokens + corr.total_ref_tokens
    return torch.randn(corr.batch_size, tokens, WIDTH, generator=g, dtype=torch.float64, requires_grad=True)


def _loss(out, hidden, weights):
    total = (out.pair_log_probs * weights[0]).sum() + (hidden * weights[2]).sum()
    if out.ref_rows is not None:
        total = total + (out.ref_rows * weights[1]).sum()
    return total


def _run(model, x, corr, checkpointing, weights, **capture_kwargs):
    capture = RefTargetCapture(corr, **capture_kwargs)
    hidden, queries, keys = model(x, [capture], checkpointing)
    out = capture.result()
    blocks_before = capture.num_blocks
    loss = _loss(out, hidden, weights)
    inputs = [x, *model.parameters()]
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)  # q/k weights unused when nothing is annotated
    grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, inputs)]
    assert capture.num_blocks == blocks_before == len(model.qk)  # recomputation added nothing
    return out, grads, [q.detach() for q in queries], [k.detach() for k in keys]


@pytest.mark.parametrize("early_stop", [True, False])
@pytest.mark.parametrize(
    "aggregate, backend, chunk",
    [("points", "torch", 2), ("all", "torch", 3), (None, "torch", 1), ("points", "torch", None), (None, "fused", None)],
)
def test_non_reentrant_checkpoint_equals_unchecked_run_and_dense_twin(aggregate, backend, chunk, early_stop):
    corr = random_corr(3, 2, 3, tgt_tokens=10)
    model = ToyBlocks(corr, blocks=3, seed=3)
    x = _inputs(corr, seed=3)
    g = torch.Generator().manual_seed(4)
    weights = [
        torch.randn(corr.point_mask.shape, generator=g, dtype=torch.float64),
        torch.randn(corr.batch_size, corr.num_refs, corr.tgt_tokens, generator=g, dtype=torch.float64),
        torch.randn(x.shape, generator=g, dtype=torch.float64),
    ]
    kwargs = dict(aggregate=aggregate, backend=backend)
    if chunk is not None:
        kwargs["max_chunk_elements"] = chunk * corr.batch_size * HEADS * corr.tgt_tokens
    plain, plain_grads, queries, keys = _run(model, x, corr, None, weights, **kwargs)
    with set_checkpoint_early_stop(early_stop):
        checked, checked_grads, _, _ = _run(model, x, corr, False, weights, **kwargs)

    torch.testing.assert_close(checked.pair_log_probs, plain.pair_log_probs, rtol=0, atol=0)
    if aggregate is not None:
        torch.testing.assert_close(checked.ref_rows, plain.ref_rows, rtol=0, atol=0)
    assert checked.num_blocks == plain.num_blocks == 3
    for a, b in zip(checked_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)

    # The dense twin, on the same q and k, through the same model: values and gradients.
    A = dense_ref_target_attention(queries, keys)
    b, k, p = corr.point_mask.nonzero(as_tuple=True)
    expected = torch.log(A[b, corr.global_rows[b, k, p], corr.tgt_index[b, k, p]])
    torch.testing.assert_close(checked.pair_log_probs[b, k, p], expected, rtol=1e-10, atol=1e-12)

    def dense_loss():
        hidden, qs, ks = model(x, [], None)
        dense = dense_ref_target_attention(qs, ks)
        log_pairs = torch.zeros(corr.point_mask.shape, dtype=torch.float64)
        log_pairs[b, k, p] = torch.log(dense[b, corr.global_rows[b, k, p], corr.tgt_index[b, k, p]])
        total = (log_pairs * weights[0]).sum() + (hidden * weights[2]).sum()
        if aggregate is not None:
            rows = _dense_rows(corr, dense, aggregate)
            total = total + (rows * weights[1]).sum()
        return total

    dense_grads = torch.autograd.grad(dense_loss(), [x, *model.parameters()])
    for a, b_ in zip(checked_grads, dense_grads):
        torch.testing.assert_close(a, b_, rtol=1e-9, atol=1e-11)


def _dense_rows(corr, A, aggregate):
    """Per-reference mean rows from the dense map, with plain loops."""
    rows = torch.zeros(corr.batch_size, corr.num_refs, corr.tgt_tokens, dtype=A.dtype)
    for b in range(corr.batch_size):
        for k in range(corr.num_refs):
            offset = corr.ref_offsets[k]
            if aggregate == "all":
                if corr.ref_present[b, k]:
                    rows[b, k] = A[b, offset : offset + corr.ref_tokens[k]].mean(0)
                continue
            members = [A[b, offset + int(corr.ref_index[b, k, p])] for p in range(corr.max_points) if corr.point_mask[b, k, p]]
            if members:
                rows[b, k] = torch.stack(members).mean(0)
    return rows


def test_reentrant_checkpoint_raises_at_once_with_the_fix_in_the_message():
    corr = random_corr(5, 1, 2)
    model = ToyBlocks(corr, blocks=2)
    capture = RefTargetCapture(corr)
    with pytest.raises(RuntimeError, match=r"use_reentrant=True.*trains? nothing.*use_reentrant=False"):
        model(_inputs(corr), [capture], checkpointing=True)
    assert capture.num_blocks == 0


def test_point_rows_inside_a_checkpoint_count_each_block_once():
    corr = random_corr(6, 2, 2, tgt_tokens=9)
    model = ToyBlocks(corr, blocks=3, seed=6)
    x = _inputs(corr, seed=6)
    plain_rows, checked_rows, capture = PointAttentionRows(corr), PointAttentionRows(corr), RefTargetCapture(corr)
    model(x, [plain_rows], None)
    hidden, _, _ = model(x, [checked_rows, capture], False)
    (capture.result().pair_log_probs.sum() + hidden.sum()).backward()
    assert checked_rows._blocks == plain_rows._blocks == 3
    torch.testing.assert_close(checked_rows.result(), plain_rows.result(), rtol=0, atol=0)


def test_second_step_without_reset_raises_and_reset_gives_a_fresh_step():
    corr = random_corr(7, 1, 2)
    model = ToyBlocks(corr, blocks=2, seed=7)
    capture = RefTargetCapture(corr)
    for checkpointing in (None, False):
        capture.reset()
        x = _inputs(corr, seed=7)
        model(x, [capture], checkpointing)
        capture.result().pair_log_probs.sum().backward()
        with pytest.raises(ValueError, match=r"`result\(\)` was already taken after 2 block\(s\).*call `reset\(\)`"):
            model(x, [capture], checkpointing)
    # Reset between steps: the second step equals a fresh capture's.
    capture.reset()
    model(x, [capture], None)
    fresh = RefTargetCapture(corr)
    model(x, [fresh], None)
    torch.testing.assert_close(capture.result().pair_log_probs, fresh.result().pair_log_probs, rtol=0, atol=0)
    assert capture.num_blocks == 2


def test_warns_when_the_capture_would_train_nothing():
    corr = random_corr(8, 1, 2)
    query = torch.randn(1, 2, corr.total_ref_tokens, 4)
    key = torch.randn(1, 2, corr.tgt_tokens, 4)
    capture = RefTargetCapture(corr)
    with pytest.warns(UserWarning, match="neither `query` nor `key` requires grad"):
        capture.add(query, key)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        capture.add(query, key)  # once per capture, not once per block
        with torch.no_grad():  # evaluation: nothing to train, no warning
            RefTargetCapture(corr).add(query, key)
        RefTargetCapture(corr).add(query.requires_grad_(), key)  # the queries train: no warning
        RefTargetCapture(corr).add(query.detach(), key.requires_grad_())  # the keys train: no warning


@pytest.mark.parametrize("name", ["query", "key"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs_raise_while_checks_are_on(name, bad):
    corr = random_corr(9, 1, 2)
    tensors = {
        "query": torch.randn(1, 2, corr.total_ref_tokens, 4, requires_grad=True),
        "key": torch.randn(1, 2, corr.tgt_tokens, 4, requires_grad=True),
    }
    tensors[name] = tensors[name].detach().index_fill(2, torch.tensor([1]), bad).requires_grad_()
    capture = RefTargetCapture(corr)
    with pytest.raises(ValueError, match=rf"`{name}` to hold only finite values"):
        capture.add(tensors["query"], tensors["key"])
    assert capture.num_blocks == 0
    with finite_checks(False):  # off (the default in training): no device sync, no check
        capture.add(tensors["query"], tensors["key"])
    assert capture.num_blocks == 1


@settings(max_examples=12)
@given(
    seed=st.integers(0, 10_000),
    batch=st.integers(1, 2),
    refs=st.integers(1, 3),
    blocks=st.integers(1, 3),
    aggregate=st.sampled_from(["points", "all", None]),
    chunk_rows=st.integers(1, 6),
)
def test_checkpointing_never_changes_values_or_block_counts(seed, batch, refs, blocks, aggregate, chunk_rows):
    corr = random_corr(seed, batch, refs, tgt_tokens=7)
    model = ToyBlocks(corr, blocks=blocks, seed=seed)
    x = _inputs(corr, seed=seed)
    weights = [torch.ones(corr.point_mask.shape, dtype=torch.float64),
               torch.ones(corr.batch_size, corr.num_refs, corr.tgt_tokens, dtype=torch.float64), torch.ones_like(x)]
    kwargs = dict(aggregate=aggregate, max_chunk_elements=chunk_rows * batch * HEADS * corr.tgt_tokens)
    plain, plain_grads, _, _ = _run(model, x, corr, None, weights, **kwargs)
    checked, checked_grads, _, _ = _run(model, x, corr, False, weights, **kwargs)
    assert torch.equal(checked.pair_log_probs, plain.pair_log_probs)
    assert checked.num_blocks == plain.num_blocks == blocks
    for a, b in zip(checked_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
