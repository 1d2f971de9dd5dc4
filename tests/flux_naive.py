"""A plain re-implementation of the MOSAIC FLUX forward (eq. 4-7), for tests only.

Deliberately naive: every stream is projected with explicit weight matrices (the LoRA merged in
as ``W + s·B·A`` for reference tokens), RoPE is written out from its definition, and attention is
one full ``N × N`` softmax over all streams with a boolean mask. It shares nothing with
`mosaic_kit.models.flux` except the stock embedding modules (timestep/text embedders).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def linear(module, x, lora: bool, adapter: str = "mosaic"):
    """``x @ W.T + b`` with the reference adapter merged in on reference tokens (``lora``) and
    every other active adapter (a user's style LoRA) merged in on every token."""
    base = module.base_layer if hasattr(module, "base_layer") else module
    weight = base.weight
    if lora and hasattr(module, "lora_A") and adapter in module.lora_A:
        a = module.lora_A[adapter].weight
        b = module.lora_B[adapter].weight
        weight = weight + module.scaling[adapter] * (b @ a)
    if hasattr(module, "lora_A") and not module.disable_adapters:
        for other in module.active_adapters:
            if other != adapter and other in module.lora_A:
                weight = weight + module.scaling[other] * (module.lora_B[other].weight @ module.lora_A[other].weight)
    out = x @ weight.T
    return out if base.bias is None else out + base.bias


def layer_norm(x):
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def rms_norm(x, norm):
    variance = x.pow(2).mean(-1, keepdim=True)
    return x * torch.rsqrt(variance + norm.eps) * norm.weight


def rope(x, ids, axes_dims, theta=10000.0):
    """x: (B, N, H, D); ids: (N, 3). Pairs (2i, 2i+1) rotate by pos · theta^(-2i/d) per axis."""
    angles = []
    for axis, dim in enumerate(axes_dims):
        freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        angles.append(ids[:, axis].double()[:, None] * freqs[None, :])
    angle = torch.cat(angles, dim=1)  # (N, D/2)
    # diffusers' FLUX applies RoPE in float32 whatever the model dtype
    cos = angle.cos().float()[None, :, None, :]
    sin = angle.sin().float()[None, :, None, :]
    even, odd = x[..., 0::2].float(), x[..., 1::2].float()
    out = torch.stack([even * cos - odd * sin, odd * cos + even * sin], dim=-1)
    return out.flatten(-2).to(x.dtype)


def attention(q, k, v, allowed):
    """q, k, v: (B, N, H, D); allowed: (N_q, N_k) bool."""
    logits = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    logits = logits.masked_fill(~allowed, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", logits.softmax(-1), v).flatten(2)


def gelu(x):
    return F.gelu(x, approximate="tanh")


def naive_forward(transformer, inputs: dict, reference_attention: str = "isolated", reference_timestep: float = 0.0,
                  reference_guidance=None, record=None):
    """The MOSAIC forward, stream by stream. ``record`` (a list) receives per double block the
    post-RoPE reference queries and target keys ``(B, H, N, D)``."""
    t = transformer
    cfg = t.config
    heads, head_dim = cfg.num_attention_heads, cfg.attention_head_dim
    target_tokens = inputs["target_tokens"]
    refs_in = inputs.get("reference_tokens")
    counts = inputs.get("reference_token_counts") or ()
    batch = target_tokens.shape[0]
    dtype = target_tokens.dtype
    guidance = inputs.get("guidance")

    def embed(timestep, g):
        ts = timestep.to(dtype) * 1000
        if cfg.guidance_embeds:
            return t.time_text_embed(ts, g.to(dtype) * 1000, inputs["pooled_embeddings"])
        return t.time_text_embed(ts, inputs["pooled_embeddings"])

    temb = embed(inputs["timestep"], guidance)
    ref_g = guidance if reference_guidance is None else torch.full((batch,), float(reference_guidance))
    temb_ref = embed(torch.full((batch,), reference_timestep), ref_g)

    # streams: name, tokens, embedding, lora flag, ids
    streams = [
        ["text", t.context_embedder(inputs["text_embeddings"]), temb, False, inputs["text_ids"]],
        ["target", linear(t.x_embedder, target_tokens, False), temb, False, inputs["target_ids"]],
    ]
    if refs_in is not None:
        ref_x = linear(t.x_embedder, refs_in, True)
        ref_ids = inputs["reference_ids"]
        start = 0
        for k, n in enumerate(counts):
            streams.append([f"ref{k}", ref_x[:, start : start + n], temb_ref, True, ref_ids[start : start + n]])
            start += n
    sizes = [s[1].shape[1] for s in streams]
    owner = torch.repeat_interleave(torch.arange(len(streams)), torch.tensor(sizes))
    is_ref = owner >= 2
    allowed = torch.ones(len(owner), len(owner), dtype=torch.bool)
    if reference_attention == "isolated":
        allowed = ~(is_ref[:, None] & is_ref[None, :] & (owner[:, None] != owner[None, :]))
    elif reference_attention == "self":  # the KV-cache mode: references see only themselves
        allowed = ~(is_ref[:, None] & (owner[:, None] != owner[None, :]))
    ids_all = torch.cat([s[4] for s in streams])

    def heads_of(x):
        return x.unflatten(-1, (heads, head_dim))

    for block in t.transformer_blocks:
        qs, ks, vs, mods = [], [], [], []
        for name, x, emb, lora, _ in streams:
            norm = block.norm1_context if name == "text" else block.norm1
            params = linear(norm.linear, F.silu(emb), lora).chunk(6, dim=1)
            shift, scale = params[0], params[1]
            xn = layer_norm(x) * (1 + scale[:, None]) + shift[:, None]
            mods.append(params)
            if name == "text":
                a = block.attn
                q = rms_norm(heads_of(linear(a.add_q_proj, xn, False)), a.norm_added_q)
                k = rms_norm(heads_of(linear(a.add_k_proj, xn, False)), a.norm_added_k)
                v = heads_of(linear(a.add_v_proj, xn, False))
            else:
                a = block.attn
                q = rms_norm(heads_of(linear(a.to_q, xn, lora)), a.norm_q)
                k = rms_norm(heads_of(linear(a.to_k, xn, lora)), a.norm_k)
                v = heads_of(linear(a.to_v, xn, lora))
            qs.append(q), ks.append(k), vs.append(v)
        q = rope(torch.cat(qs, 1), ids_all, cfg.axes_dims_rope)
        k = rope(torch.cat(ks, 1), ids_all, cfg.axes_dims_rope)
        v = torch.cat(vs, 1)
        if record is not None and refs_in is not None:
            n_txt, n_tgt = sizes[0], sizes[1]
            record.append((q[:, n_txt + n_tgt :].transpose(1, 2), k[:, n_txt : n_txt + n_tgt].transpose(1, 2)))
        out = attention(q, k, v, allowed).split(sizes, dim=1)
        for i, (name, x, emb, lora, ids) in enumerate(streams):
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[i]
            if name == "text":
                o = linear(block.attn.to_add_out, out[i], False)
                x = x + gate_msa[:, None] * o
                xn = layer_norm(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
                ff = block.ff_context.net
                x = x + gate_mlp[:, None] * linear(ff[2], gelu(linear(ff[0].proj, xn, False)), False)
            else:
                o = linear(block.attn.to_out[0], out[i], lora)
                x = x + gate_msa[:, None] * o
                xn = layer_norm(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
                ff = block.ff.net
                x = x + gate_mlp[:, None] * linear(ff[2], gelu(linear(ff[0].proj, xn, False)), lora)
            streams[i][1] = x

    for block in t.single_transformer_blocks:
        qs, ks, vs, extra = [], [], [], []
        for name, x, emb, lora, _ in streams:
            shift, scale, gate = linear(block.norm.linear, F.silu(emb), lora).chunk(3, dim=1)
            xn = layer_norm(x) * (1 + scale[:, None]) + shift[:, None]
            mlp = gelu(linear(block.proj_mlp, xn, lora))
            a = block.attn
            qs.append(rms_norm(heads_of(linear(a.to_q, xn, lora)), a.norm_q))
            ks.append(rms_norm(heads_of(linear(a.to_k, xn, lora)), a.norm_k))
            vs.append(heads_of(linear(a.to_v, xn, lora)))
            extra.append((mlp, gate))
        q = rope(torch.cat(qs, 1), ids_all, cfg.axes_dims_rope)
        k = rope(torch.cat(ks, 1), ids_all, cfg.axes_dims_rope)
        out = attention(q, k, torch.cat(vs, 1), allowed).split(sizes, dim=1)
        for i, (name, x, emb, lora, ids) in enumerate(streams):
            mlp, gate = extra[i]
            streams[i][1] = x + gate[:, None] * linear(block.proj_out, torch.cat([out[i], mlp], dim=2), lora)

    target = streams[1][1]
    scale, shift = linear(t.norm_out.linear, F.silu(temb), False).chunk(2, dim=1)
    target = layer_norm(target) * (1 + scale[:, None]) + shift[:, None]
    return linear(t.proj_out, target, False)
