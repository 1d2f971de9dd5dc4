"""Pair statistics through fused attention kernels (private).

For SCAL alone (``aggregate=None``) nothing of a full softmax row is needed: per annotated pair,
``log p_h(r, v) = s_h(r, v) - lse_h(r)``, where the row's log-sum-exp ``lse_h(r)`` is what
memory-efficient attention kernels return beside their output. The backward needs, per row, the
attention-weighted sum of keys ``Σ_t p_h(r, t) k_h(t)`` (attention with values = keys) and, per
key, ``Σ_r p_h(r, t) C_h(r) q_h(r)`` (the value gradient of that attention): both are fused
attention calls, so no ``R × N_tgt`` block is ever formed.

Kernels: xformers' memory-efficient attention when installed and on CUDA, else torch's
efficient-attention kernel on CUDA, and torch's flash-attention kernel on CPU (which lets the
CPU tests compare this path with the chunked one).
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from ..utils.checks import compute_dtype


def xformers_available() -> bool:
    """True when xformers can be imported."""
    return importlib.util.find_spec("xformers") is not None


def row_logsumexp(query: torch.Tensor, key: torch.Tensor, scale: float) -> torch.Tensor:
    """``(B, H, R)`` log-sum-exp over the target keys of each query row, from a fused kernel."""
    rows = query.shape[2]
    if query.is_cuda:
        if xformers_available():
            from xformers.ops import fmha

            _, lse = fmha.memory_efficient_attention_forward_requires_grad(
                query.transpose(1, 2), key.transpose(1, 2), key.transpose(1, 2), scale=scale
            )
        else:
            _, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(
                query, key, key, None, True, scale=scale
            )
        return lse[:, :, :rows]
    _, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, key, scale=scale)
    return lse


class FusedPairStats(torch.autograd.Function):
    """``apply(query_rows, key, pair_batch, pair_pos, pair_target, scale, replay=False)`` with
    ``query_rows`` ``(B, H, R, D)`` (the annotated rows), ``key`` ``(B, H, N_tgt, D)`` and the flat
    pair indices; returns ``pair (n,)`` = ``logsumexp_h log p_h(r_i, v_i)`` in the compute dtype.

    As in `TargetSoftmaxStats`, only ``query_rows`` and ``key`` go through
    ``ctx.save_for_backward`` (read once in backward); the indices and the small statistics live
    on ``ctx``, and ``replay=True`` (a checkpoint's recomputation) saves the two tensors and
    computes nothing."""

    @staticmethod
    def forward(ctx: Any, query_rows, key, pair_batch, pair_pos, pair_target, scale: float, replay: bool = False):  # type: ignore[override]
        dtype = compute_dtype(query_rows.dtype)
        ctx.scale = scale
        ctx.save_for_backward(query_rows, key)  # the only tensors autograd's hooks see
        ctx.pair_index = (pair_batch, pair_pos, pair_target)
        ctx.lse = ctx.pair = None
        if replay or pair_pos.numel() == 0:  # replay, or no pairs (kernels reject empty rows)
            ctx.empty = pair_pos.numel() == 0
            return query_rows.new_empty(0, dtype=dtype)
        ctx.empty = False
        with torch.autocast(query_rows.device.type, enabled=False):
            lse = row_logsumexp(query_rows, key, scale).to(dtype)
            b, r, v = pair_batch, pair_pos, pair_target
            logits = (query_rows[b, :, r].to(dtype) * key[b, :, v].to(dtype)).sum(-1) * scale  # (n, H)
            pair = torch.logsumexp(logits - lse[b, :, r], dim=1)
        ctx.lse, ctx.pair = lse, pair.detach().clone()
        return pair

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_pair: torch.Tensor):  # type: ignore[override]
        query_rows, key = ctx.saved_tensors  # exactly once: checkpoint allows one unpack per tensor
        if ctx.empty:
            return None, None, None, None, None, None, None
        if ctx.lse is None:
            raise RuntimeError("Internal error: backward through a replayed capture block (it has no statistics).")
        b, r, v = ctx.pair_index
        with torch.autocast(query_rows.device.type, enabled=False):
            grads = FusedPairStats._backward(ctx, grad_pair, query_rows, key, b, r, v, ctx.lse, ctx.pair)
        return grads + (None,)

    @staticmethod
    def _backward(ctx: Any, grad_pair, query_rows, key, b, r, v, lse, pair):
        scale, dtype = ctx.scale, lse.dtype
        q_pair, k_pair = query_rows[b, :, r].to(dtype), key[b, :, v].to(dtype)  # (n, H, D)
        log_p = (q_pair * k_pair).sum(-1) * scale - lse[b, :, r]
        coef = grad_pair.to(dtype)[:, None] * torch.exp(log_p - pair[:, None])  # (n, H)
        batch, heads, rows, _ = query_rows.shape
        row_coef = lse.new_zeros(batch, rows, heads).index_put_((b, r), coef, accumulate=True).transpose(1, 2)

        # Σ_t p(r, t) k(t): attention with values = keys; and its value gradient for Σ_r p(r, t) C(r) q(r).
        values = key.detach().requires_grad_()
        with torch.enable_grad():
            attended = F.scaled_dot_product_attention(query_rows.detach(), key.detach(), values, scale=scale)
        upstream = (row_coef[..., None] * query_rows.to(dtype)).to(attended.dtype)
        (spread,) = torch.autograd.grad(attended, values, grad_outputs=upstream)

        grad_q = -scale * row_coef[..., None] * attended.detach().to(dtype)
        grad_q.permute(0, 2, 1, 3).index_put_((b, r), scale * coef[..., None] * k_pair, accumulate=True)
        grad_k = -scale * spread.to(dtype)
        grad_k.permute(0, 2, 1, 3).index_put_((b, v), scale * coef[..., None] * q_pair, accumulate=True)
        return grad_q.to(query_rows.dtype), grad_k.to(key.dtype), None, None, None, None
