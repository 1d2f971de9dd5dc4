"""Chunked target-softmax statistics with a recomputing backward (private).

For one transformer block, with per-head logits ``s_h(r, t) = scale * q_h(r) · k_h(t)`` over the
``N_tgt`` target keys and ``p_h(r, t) = softmax_t s_h(r, t)``, :class:`TargetSoftmaxStats` walks
over chunks of a list of query rows ``r`` (``R`` of them) and computes in one pass:

- for each annotated pair ``i`` (sample ``b_i``, row ``r_i``, target ``v_i``):
  ``pair[i] = logsumexp_h log p_h(r_i, v_i)``, the log of the *sum over heads* of the probability
  at the pair's target;
- ``rows[b, k, t] = sum_r weight[b, k, r] * mean_h p_h(r, t)``: weighted mean attention rows.

Neither the ``R × N_tgt`` probabilities nor the logits are kept: the forward keeps only the
per-row log-sum-exp ``(B, H, R)`` and the per-pair values; the backward recomputes each chunk's
softmax from the saved queries and keys, one chunk at a time (flash-attention style).

Activation checkpointing: only the query and key go through ``ctx.save_for_backward`` (so
autograd's saved-tensor hooks, e.g. non-reentrant ``torch.utils.checkpoint``, may drop and
recompute them), and ``backward`` reads ``ctx.saved_tensors`` exactly once (checkpoint allows one
unpack per saved tensor). The small statistics (log-sum-exps, pair values) live on ``ctx`` and
are never recomputed, so a checkpoint's recomputation only has to *replay* the function: with
``replay=True`` it saves the same two tensors and computes nothing.

Gradients (per head ``h``, row ``r``, target ``t``; ``δ`` the Kronecker delta):

- through ``pair[i]``: ``∂/∂s_h(r, t) = c_{ih} (δ[r = r_i, t = v_i] - δ[r = r_i] p_h(r, t))`` with
  ``c_{ih} = ∂L/∂pair[i] · softmax_h(log p_h(r_i, v_i))``;
- through ``rows``: ``∂/∂s_h(r, t) = p_h(r, t) (g(r, t) - Σ_t' p_h(r, t') g(r, t'))`` with
  ``g(r, t) = (1/H) Σ_k weight[k, r] ∂L/∂rows[k, t]``.

Then ``∂L/∂q_h(r) = scale Σ_t ∂L/∂s_h(r, t) k_h(t)`` and ``∂L/∂k_h(t) = scale Σ_r ∂L/∂s_h(r, t) q_h(r)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.autograd.function import once_differentiable

from ..utils.checks import compute_dtype


@dataclass(frozen=True)
class Plan:
    """How one block is walked: which rows, which pairs, in which chunks.

    Args:
        rows: ``(B, R)`` long query rows, or None for all query rows in order.
        weights: ``(B, K, R)`` row weights of the aggregated rows (compute dtype), or None.
        pair_batch: ``(n,)`` long sample of each pair.
        pair_pos: ``(n,)`` long position of each pair's row in the row list.
        pair_target: ``(n,)`` long target token of each pair.
        chunk_rows: rows per chunk.
    """

    rows: torch.Tensor | None
    weights: torch.Tensor | None
    pair_batch: torch.Tensor
    pair_pos: torch.Tensor
    pair_target: torch.Tensor
    chunk_rows: int

    def chunks(self, num_rows: int):
        """``(start, stop)`` for every chunk of rows. Each chunk handles the pairs whose row it
        holds through a mask over all pairs (not a slice of them), so that nothing here depends on
        the data: dynamo traces the loop with static bounds whatever the correspondences."""
        for start in range(0, num_rows, self.chunk_rows):
            yield start, min(num_rows, start + self.chunk_rows)

    def chunk_pairs(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(in_chunk (n,) bool, row (n,) long)``: which pairs have their row in ``[start, stop)``,
        and that row's position in the chunk (clamped into it for the others, which are masked)."""
        in_chunk = (self.pair_pos >= start) & (self.pair_pos < stop)
        return in_chunk, (self.pair_pos - start).clamp(0, stop - start - 1)


def _rows_of(query: torch.Tensor, rows: torch.Tensor | None, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
    """Query rows ``start:stop`` of the row list as ``(B, H, c, D)`` in ``dtype``."""
    if rows is None:
        return query[:, :, start:stop].to(dtype)
    index = rows[:, start:stop]
    b, h, _, d = query.shape
    return query.gather(2, index[:, None, :, None].expand(b, h, -1, d)).to(dtype)


class TargetSoftmaxStats(torch.autograd.Function):
    """See the module docstring. ``apply(query, key, plan, scale, replay=False)`` with ``query``
    ``(B, H, N_q, D)`` and ``key`` ``(B, H, N_tgt, D)`` returns ``(pair (n,), rows (B, K, N_tgt) or
    an empty tensor)`` in the compute dtype (float64 for float64 inputs, else float32). With
    ``replay=True`` (a checkpoint's recomputation) it only saves ``query`` and ``key`` and
    returns two empty tensors."""

    @staticmethod
    def forward(ctx: Any, query: torch.Tensor, key: torch.Tensor, plan: Plan, scale: float, replay: bool = False):  # type: ignore[override]
        ctx.plan, ctx.scale = plan, scale
        ctx.save_for_backward(query, key)  # the only tensors autograd's hooks see
        if replay:
            ctx.lse = ctx.pair = None
            empty = query.new_empty(0, dtype=compute_dtype(query.dtype))
            return empty, empty.clone()
        with torch.autocast(query.device.type, enabled=False):  # loss math stays in the compute dtype
            lse, pair, agg = TargetSoftmaxStats._forward(query, key, plan, scale)
        # A private copy of `pair`: the output itself may be changed in place by the caller.
        ctx.lse, ctx.pair = lse, pair.detach().clone()
        return pair, agg

    @staticmethod
    def _forward(query: torch.Tensor, key: torch.Tensor, plan: Plan, scale: float):
        dtype = compute_dtype(query.dtype)
        batch, heads, num_q, _ = query.shape
        num_t = key.shape[2]
        num_rows = num_q if plan.rows is None else plan.rows.shape[1]
        key_c = key.to(dtype)
        lse = query.new_empty(batch, heads, num_rows, dtype=dtype)
        pair = query.new_zeros(plan.pair_pos.shape[0], dtype=dtype)
        agg = query.new_zeros(batch, 0 if plan.weights is None else plan.weights.shape[1], num_t, dtype=dtype)
        has_pairs = plan.pair_pos.shape[0] > 0
        for start, stop in plan.chunks(num_rows):
            q = _rows_of(query, plan.rows, start, stop, dtype)
            logits = torch.matmul(q, key_c.transpose(-1, -2)).mul_(scale)  # (B, H, c, N_tgt)
            if has_pairs:
                in_chunk, r = plan.chunk_pairs(start, stop)
                b, v = plan.pair_batch, plan.pair_target
                pair_logits = logits[b, :, r, v]  # (n, H), read before the buffer is reused
            if plan.weights is None:
                chunk_lse = torch.logsumexp(logits, dim=-1)
            else:
                # One exp pass gives both the log-sum-exp and the probabilities.
                row_max = logits.amax(dim=-1, keepdim=True)
                exps = logits.sub_(row_max).exp_()
                total = exps.sum(dim=-1, keepdim=True)
                chunk_lse = (row_max + total.log()).squeeze(-1)
                probs = exps.div_(total).mean(1)  # (B, c, N_tgt)
                agg.add_(torch.matmul(plan.weights[:, :, start:stop], probs))
            lse[:, :, start:stop] = chunk_lse
            if has_pairs:
                pair = torch.where(in_chunk, torch.logsumexp(pair_logits - chunk_lse[b, :, r], dim=1), pair)
        return lse, pair, agg

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_pair: torch.Tensor | None, grad_agg: torch.Tensor | None):  # type: ignore[override]
        query, key = ctx.saved_tensors  # exactly once: checkpoint allows one unpack per tensor
        if ctx.lse is None:
            raise RuntimeError("Internal error: backward through a replayed capture block (it has no statistics).")
        with torch.autocast(query.device.type, enabled=False):
            return TargetSoftmaxStats._backward(ctx, query, key, ctx.lse, ctx.pair, grad_pair, grad_agg)

    @staticmethod
    def _backward(
        ctx: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        lse: torch.Tensor,
        pair: torch.Tensor,
        grad_pair: torch.Tensor | None,
        grad_agg: torch.Tensor | None,
    ):
        plan: Plan = ctx.plan
        use_pair = grad_pair is not None and pair.numel() > 0
        use_agg = grad_agg is not None and plan.weights is not None
        if not (use_pair or use_agg):
            return None, None, None, None, None
        dtype, scale = lse.dtype, ctx.scale
        batch, heads, num_q, dim = query.shape
        num_rows = lse.shape[2]
        key_c = key.to(dtype)
        grad_q = torch.zeros(batch, heads, num_q, dim, dtype=dtype, device=query.device)
        grad_k = torch.zeros_like(key_c)
        if use_agg:
            grad_agg = grad_agg.to(dtype) / heads
        if use_pair:
            grad_pair = grad_pair.to(dtype)
        has_pairs = use_pair and plan.pair_pos.shape[0] > 0
        for start, stop in plan.chunks(num_rows):
            q = _rows_of(query, plan.rows, start, stop, dtype)
            logits = torch.matmul(q, key_c.transpose(-1, -2)).mul_(scale)
            chunk_lse = lse[:, :, start:stop]
            if has_pairs:
                in_chunk, r = plan.chunk_pairs(start, stop)
                b, v = plan.pair_batch, plan.pair_target
                log_p = logits[b, :, r, v] - chunk_lse[b, :, r]  # (n, H)
                coef = grad_pair[:, None] * torch.exp(log_p - pair[:, None])  # (n, H)
                coef = torch.where(in_chunk[:, None], coef, 0.0)  # pairs of other chunks add nothing
                # Sum of the coefficients of the pairs on each row: (B, c, H) → (B, H, c).
                row_coef = logits.new_zeros(batch, stop - start, heads).index_put_((b, r), coef, accumulate=True)
                row_coef = row_coef.transpose(1, 2)
            probs = logits.sub_(chunk_lse[..., None]).exp_()  # (B, H, c, N_tgt), reuses the buffer
            if use_agg:
                upstream = torch.matmul(plan.weights[:, :, start:stop].transpose(1, 2), grad_agg)[:, None]
                centred = upstream - (probs * upstream).sum(-1, keepdim=True)
                if has_pairs:
                    centred = centred - row_coef[..., None]
                grad_s = probs.mul_(centred)
            elif has_pairs:
                grad_s = probs.mul_(-row_coef[..., None])
            else:
                continue  # nothing flows through this chunk
            if has_pairs:
                grad_s.permute(0, 2, 3, 1).index_put_((b, r, v), coef, accumulate=True)
            grad_s.mul_(scale)
            grad_q_chunk = torch.matmul(grad_s, key_c)
            if plan.rows is None:
                grad_q[:, :, start:stop] = grad_q_chunk
            else:
                index = plan.rows[:, None, start:stop, None].expand(batch, heads, -1, dim)
                grad_q.scatter_add_(2, index, grad_q_chunk)
            grad_k.add_(torch.matmul(grad_s.transpose(-1, -2), q))
        return grad_q.to(query.dtype), grad_k.to(key.dtype), None, None, None
