"""Chunked target-softmax statistics with a recomputing backward (private).

For one transformer block, with per-head logits ``s_h(m, t) = scale * q_h(m) · k_h(t)`` over the
``N_tgt`` target keys and ``p_h(m, t) = softmax_t s_h(m, t)``, :class:`TargetSoftmaxStats`
computes for a set of query rows ``m`` (``M`` of them):

- ``pair[b, m] = logsumexp_h log p_h(m, target[b, m])``: the log of the *sum over heads* of the
  probability at each row's annotated target token;
- ``rows[b, k, t] = sum_m weight[b, k, m] * mean_h p_h(m, t)``: weighted mean attention rows.

Neither the ``M × N_tgt`` probabilities nor the logits are kept: the forward walks over chunks
of rows, saves only the per-row log-sum-exp ``(B, H, M)``, and the backward recomputes each
chunk's softmax from the saved queries and keys, one chunk at a time (flash-attention style).

Gradients (per head, per row, ``δ`` the Kronecker delta):

- through ``pair``: ``∂pair/∂s_h(m, t) = w_h(m) (δ[t = target(m)] - p_h(m, t))`` with
  ``w_h(m) = softmax_h log p_h(m, target(m))``;
- through ``rows``: ``∂L/∂s_h(m, t) = p_h(m, t) (g(m, t) - Σ_t' p_h(m, t') g(m, t'))`` with
  ``g(m, t) = (1/H) Σ_k weight[k, m] ∂L/∂rows[k, t]``.

Then ``∂L/∂q_h(m) = scale Σ_t ∂L/∂s_h(m, t) k_h(t)`` and ``∂L/∂k_h(t) = scale Σ_m ∂L/∂s_h(m, t) q_h(m)``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.function import once_differentiable

from ..correspondence._checks import compute_dtype


def _chunks(num_rows: int, batch: int, heads: int, num_targets: int, max_chunk_elements: int):
    """``(start, stop)`` ranges of rows so that one chunk's logits hold at most the budget."""
    step = max(1, max_chunk_elements // max(1, batch * heads * num_targets))
    for start in range(0, num_rows, step):
        yield start, min(num_rows, start + step)


def _rows_of(query: torch.Tensor, rows: torch.Tensor | None, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
    """Query rows ``start:stop`` (of ``rows`` if given) as ``(B, H, c, D)`` in ``dtype``."""
    if rows is None:
        return query[:, :, start:stop].to(dtype)
    index = rows[:, start:stop]
    b, h, _, d = query.shape
    return query.gather(2, index[:, None, :, None].expand(b, h, -1, d)).to(dtype)


class TargetSoftmaxStats(torch.autograd.Function):
    """See the module docstring. Inputs:

    - ``query`` ``(B, H, N_q, D)``, ``key`` ``(B, H, N_tgt, D)``;
    - ``rows`` ``(B, M)`` long indices into ``N_q``, or None for all ``N_q`` rows in order;
    - ``targets`` ``(B, M)`` long target tokens, or None (no ``pair`` output);
    - ``weights`` ``(B, K, M)`` in the compute dtype, or None (no ``rows`` output);
    - ``scale`` float; ``max_chunk_elements`` int.

    Returns ``(pair (B, M) or empty, rows (B, K, N_tgt) or empty)`` in the compute dtype
    (float64 for float64 inputs, else float32).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        query: torch.Tensor,
        key: torch.Tensor,
        rows: torch.Tensor | None,
        targets: torch.Tensor | None,
        weights: torch.Tensor | None,
        scale: float,
        max_chunk_elements: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = compute_dtype(query.dtype)
        batch, heads, num_q, _ = query.shape
        num_t = key.shape[2]
        num_rows = num_q if rows is None else rows.shape[1]
        key_c = key.to(dtype)
        lse = query.new_empty(batch, heads, num_rows, dtype=dtype)
        pair = query.new_empty(batch, num_rows if targets is not None else 0, dtype=dtype)
        agg = query.new_zeros(batch, weights.shape[1] if weights is not None else 0, num_t, dtype=dtype)
        for start, stop in _chunks(num_rows, batch, heads, num_t, max_chunk_elements):
            q = _rows_of(query, rows, start, stop, dtype)
            logits = torch.matmul(q, key_c.transpose(-1, -2)).mul_(scale)  # (B, H, c, N_tgt)
            chunk_lse = torch.logsumexp(logits, dim=-1)
            lse[:, :, start:stop] = chunk_lse
            if targets is not None:
                tgt = targets[:, None, start:stop, None].expand(batch, heads, -1, 1)
                log_p = logits.gather(-1, tgt).squeeze(-1) - chunk_lse
                pair[:, start:stop] = torch.logsumexp(log_p, dim=1)
            if weights is not None:
                probs = logits.sub_(chunk_lse[..., None]).exp_().mean(1)  # (B, c, N_tgt)
                agg.add_(torch.matmul(weights[:, :, start:stop], probs))
        ctx.scale = scale
        ctx.max_chunk_elements = max_chunk_elements
        ctx.has_rows, ctx.has_targets, ctx.has_weights = rows is not None, targets is not None, weights is not None
        ctx.save_for_backward(
            query, key, lse, pair,
            rows if rows is not None else query.new_empty(0, dtype=torch.long),
            targets if targets is not None else query.new_empty(0, dtype=torch.long),
            weights if weights is not None else query.new_empty(0, dtype=dtype),
        )
        return pair, agg

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_pair: torch.Tensor | None, grad_agg: torch.Tensor | None):  # type: ignore[override]
        query, key, lse, pair, rows, targets, weights = ctx.saved_tensors
        rows = rows if ctx.has_rows else None
        use_pair = ctx.has_targets and grad_pair is not None
        use_agg = ctx.has_weights and grad_agg is not None
        if not (use_pair or use_agg):
            return None, None, None, None, None, None, None
        dtype = lse.dtype
        batch, heads, num_q, dim = query.shape
        num_t = key.shape[2]
        num_rows = lse.shape[2]
        scale = ctx.scale
        key_c = key.to(dtype)
        grad_q = torch.zeros(batch, heads, num_q, dim, dtype=dtype, device=query.device)
        grad_k = torch.zeros(batch, heads, num_t, dim, dtype=dtype, device=key.device)
        if use_agg:
            grad_agg = grad_agg.to(dtype) / heads
        for start, stop in _chunks(num_rows, batch, heads, num_t, ctx.max_chunk_elements):
            q = _rows_of(query, rows, start, stop, dtype)
            logits = torch.matmul(q, key_c.transpose(-1, -2)).mul_(scale)
            chunk_lse = lse[:, :, start:stop]
            if use_pair:
                tgt = targets[:, None, start:stop, None].expand(batch, heads, -1, 1)
                log_p = logits.gather(-1, tgt).squeeze(-1) - chunk_lse
                # coef_h(m) = dL/dpair(m) * softmax over heads of log p_h(m, target).
                coef = grad_pair[:, None, start:stop].to(dtype) * torch.exp(log_p - pair[:, None, start:stop])
            probs = logits.sub_(chunk_lse[..., None]).exp_()  # (B, H, c, N_tgt), reuses the buffer
            if use_agg:
                upstream = torch.matmul(weights[:, :, start:stop].transpose(1, 2), grad_agg)[:, None]  # (B, 1, c, N_tgt)
                centred = upstream - (probs * upstream).sum(-1, keepdim=True)
                if use_pair:
                    centred = centred - coef[..., None]
                grad_s = probs.mul_(centred)
            else:
                grad_s = probs.mul_(-coef[..., None])
            if use_pair:
                grad_s.scatter_add_(-1, tgt, coef[..., None])
            grad_s.mul_(scale)
            grad_q_chunk = torch.matmul(grad_s, key_c)
            if rows is None:
                grad_q[:, :, start:stop] = grad_q_chunk
            else:
                index = rows[:, None, start:stop, None].expand(batch, heads, -1, dim)
                grad_q.scatter_add_(2, index, grad_q_chunk)
            grad_k.add_(torch.matmul(grad_s.transpose(-1, -2), q))
        return grad_q.to(query.dtype), grad_k.to(key.dtype), None, None, None, None, None
