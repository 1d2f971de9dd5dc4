"""Everything of the FLUX.1 integration that touches diffusers internals: the stock modules of
`FluxTransformer2DModel` and its blocks (embedders, AdaLayerNorms, attention projections, the
feed-forwards, the output norm), the stock `FluxAttnProcessor`, ``dispatch_attention_fn``,
``apply_rotary_emb`` and the gradient-checkpointing function. When diffusers changes its FLUX
modules, this is the one file to update (``tests/models/test_models_flux*.py`` and the released-code
parity tests pin the numbers).

- `MosaicFluxAttnProcessor`: the processor installed with ``set_attn_processor``; its stream
  attention is in ``processor.py``.
- ``_FluxInternals``: the block forwards of `MosaicFluxTransformer` (double and single blocks
  run per stream, the reference embedding, the block stack).
"""

from __future__ import annotations

import torch
from torch import nn

from .lora import _apply
from .processor import ReferenceKVCache, _AttentionOutputs, _heads, _Streams, _StreamAttention

try:  # diffusers and peft are the `flux` extra
    from diffusers import FluxTransformer2DModel
    from diffusers.models.attention_dispatch import dispatch_attention_fn
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "mosaic_kit.models needs diffusers and peft: install them with `pip install mosaic_kit[flux]`."
    ) from error


class MosaicFluxAttnProcessor(_StreamAttention, FluxAttnProcessor):
    """Attention processor for `FluxAttention` modules that understands the reference stream.

    Installed on every attention module by `MosaicFluxTransformer` with diffusers'
    ``set_attn_processor``. Called without ``mosaic`` (a plain ``transformer(...)`` call) it is the
    stock `FluxAttnProcessor`. Called by the multi-reference forward, it projects each stream with
    its own weights (reference LoRA on reference tokens only), applies RoPE, and attends in two
    calls: text and target queries against all keys, then all reference queries in one batched
    call (keys: text, target and the query's own reference, or everything with
    ``reference_attention="full"``). Attention goes through diffusers' ``dispatch_attention_fn``,
    so ``transformer.set_attention_backend(...)`` selects the kernel.
    """

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        mosaic: _Streams | None = None,
    ):
        if mosaic is None:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        if getattr(attn, "fused_projections", False):
            raise ValueError("Expected unfused q/k/v projections with references; call `unfuse_qkv_projections()`.")
        double = encoder_hidden_states is not None or attn.added_kv_proj_dim is not None
        head_dim = attn.head_dim

        main_skip = mosaic.reference_adapter  # text/target tokens: every adapter but the reference one

        def project(x: torch.Tensor, skip: str | None) -> tuple[torch.Tensor, ...]:
            q = attn.norm_q(_heads(_apply(attn.to_q, x, skip), head_dim))
            k = attn.norm_k(_heads(_apply(attn.to_k, x, skip), head_dim))
            v = _heads(_apply(attn.to_v, x, skip), head_dim)
            return q, k, v

        # main stream: text + target (double blocks project text with the context weights)
        q_main = k_main = v_main = None
        if mosaic.main_present:
            q_main, k_main, v_main = project(hidden_states, main_skip)
            if double:
                q_txt = attn.norm_added_q(_heads(attn.add_q_proj(encoder_hidden_states), head_dim))
                k_txt = attn.norm_added_k(_heads(attn.add_k_proj(encoder_hidden_states), head_dim))
                v_txt = _heads(attn.add_v_proj(encoder_hidden_states), head_dim)
                q_main, k_main, v_main = (torch.cat(p, dim=1) for p in ((q_txt, q_main), (k_txt, k_main), (v_txt, v_main)))
            if image_rotary_emb is not None:
                q_main = apply_rotary_emb(q_main, image_rotary_emb, sequence_dim=1)
                k_main = apply_rotary_emb(k_main, image_rotary_emb, sequence_dim=1)

        q_ref = k_ref = v_ref = None
        if mosaic.references is not None:
            q_ref, k_ref, v_ref = project(mosaic.references, None)
            if mosaic.reference_rotary is not None:
                q_ref = apply_rotary_emb(q_ref, mosaic.reference_rotary, sequence_dim=1)
                k_ref = apply_rotary_emb(k_ref, mosaic.reference_rotary, sequence_dim=1)
        elif mosaic.cached is not None:
            k_ref, v_ref = mosaic.cached
        if mosaic.store is not None:
            mosaic.store[0].append(k_ref)
            mosaic.store[1].append(v_ref)

        backend, parallel = self._attention_backend, self._parallel_config

        def attend(q, k, v, mask=None):
            out = dispatch_attention_fn(q, k, v, attn_mask=mask, backend=backend, parallel_config=parallel)
            return out.flatten(2, 3).to(q.dtype)

        main_out, ref_out = self.attend_streams(attend, q_main, k_main, v_main, q_ref, k_ref, v_ref, mosaic)
        capture_query = capture_key = None
        if mosaic.captures:
            capture_query = q_ref.transpose(1, 2)
            capture_key = k_main[:, mosaic.text_tokens :].transpose(1, 2)

        text_out = None
        if double:
            if main_out is not None:
                text_out, main_out = main_out.split_with_sizes(
                    [mosaic.text_tokens, main_out.shape[1] - mosaic.text_tokens], dim=1
                )
                text_out = attn.to_add_out(text_out.contiguous())
                main_out = attn.to_out[1](_apply(attn.to_out[0], main_out.contiguous(), main_skip))
            if ref_out is not None:
                ref_out = attn.to_out[1](_apply(attn.to_out[0], ref_out, None))
        return _AttentionOutputs(main_out, text_out, ref_out, capture_query, capture_key)


def _ada_norm(norm: nn.Module, x: torch.Tensor, emb: torch.Tensor, chunks: int, skip: str | None) -> list[torch.Tensor]:
    """diffusers' AdaLayerNormZero(Single) with the modulation linear called per stream."""
    params = _apply(norm.linear, norm.silu(emb), skip).chunk(chunks, dim=1)
    shift, scale = params[0], params[1]
    return [norm.norm(x) * (1 + scale[:, None]) + shift[:, None], *params[2:]]


def _feed_forward(ff: nn.Module, x: torch.Tensor, skip: str | None) -> torch.Tensor:
    for module in ff.net:
        x = _apply(module, x, skip)
    return x


def _feed_captures(streams: _Streams, out: _AttentionOutputs) -> None:
    """Feeds the block's post-RoPE reference queries ``(B, H, N_ref, D)`` and target keys
    ``(B, H, N_tgt, D)`` to its captures, inside the block's function: under gradient checkpointing
    they are then freed with the block's other intermediates and recomputed in backward (the
    recomputation calls ``add`` again, which `RefTargetCapture` and `PointAttentionRows` replay
    without counting the block twice), instead of staying alive as the block's outputs until the
    loss."""
    for capture in streams.captures:
        capture.add(out.capture_query, out.capture_key)


def _clip_fp16(x: torch.Tensor | None) -> torch.Tensor | None:
    return x.clip(-65504, 65504) if x is not None and x.dtype == torch.float16 else x



class _FluxInternals:
    """The block forwards of `MosaicFluxTransformer` (a mixin: it reads ``self.transformer``,
    ``self.reference_timestep``, ``self.reference_attention``, ``self.capture_blocks`` and
    ``self.reference_adapter``)."""

    transformer: FluxTransformer2DModel

    def _input_modules(self) -> dict[str, nn.Module]:
        """The first module each input meets (for dtype checks)."""
        t = self.transformer
        return {"tokens": t.x_embedder, "text": t.context_embedder, "pooled": t.time_text_embed.text_embedder.linear_1}

    def _num_blocks(self) -> int:
        t = self.transformer
        return len(t.transformer_blocks) + len(t.single_transformer_blocks)

    # -- embeddings ----------------------------------------------------------------------------------
    def _embed_time(self, timestep, guidance, pooled, dtype) -> torch.Tensor:
        t = self.transformer
        timestep = timestep.to(dtype) * 1000
        if t.config.guidance_embeds:
            if guidance is None:
                raise ValueError("Expected `guidance` for a guidance-distilled transformer (guidance_embeds=True).")
            return t.time_text_embed(timestep, guidance.to(dtype) * 1000, pooled)
        return t.time_text_embed(timestep, pooled)

    def _reference_embedding(self, batch, pooled, guidance, reference_guidance, dtype, device) -> torch.Tensor:
        ref_t = torch.full((batch,), self.reference_timestep, device=device)
        if reference_guidance is None:
            ref_g = guidance
        else:
            ref_g = torch.as_tensor(reference_guidance, device=device, dtype=torch.float32).expand(batch)
        return self._embed_time(ref_t, ref_g, pooled, dtype)

    # -- blocks --------------------------------------------------------------------------------------
    def _double_block(self, block, text, target, refs, temb, temb_ref, streams: _Streams, rotary):
        if streams.main_present:
            n_target, gate_msa, shift_mlp, scale_mlp, gate_mlp = _ada_norm(block.norm1, target, temb, 6, streams.reference_adapter)
            n_text, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = block.norm1_context(text, emb=temb)
        else:
            n_target = n_text = None
        streams.references = None
        if refs is not None:
            n_refs, r_gate_msa, r_shift_mlp, r_scale_mlp, r_gate_mlp = _ada_norm(block.norm1, refs, temb_ref, 6, None)
            streams.references = n_refs
        out: _AttentionOutputs = block.attn(
            hidden_states=n_target, encoder_hidden_states=n_text, image_rotary_emb=rotary, mosaic=streams
        )
        if streams.main_present:
            target = target + gate_msa.unsqueeze(1) * out.main
            normed = block.norm2(target) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
            target = target + gate_mlp.unsqueeze(1) * _feed_forward(block.ff, normed, streams.reference_adapter)
            text = text + c_gate_msa.unsqueeze(1) * out.text
            normed = block.norm2_context(text) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
            text = _clip_fp16(text + c_gate_mlp.unsqueeze(1) * block.ff_context(normed))
        if refs is not None:
            refs = refs + r_gate_msa.unsqueeze(1) * out.references
            normed = block.norm2(refs) * (1 + r_scale_mlp[:, None]) + r_shift_mlp[:, None]
            refs = refs + r_gate_mlp.unsqueeze(1) * _feed_forward(block.ff, normed, None)
        _feed_captures(streams, out)
        return text, target, refs

    def _single_block(self, block, text, target, refs, temb, temb_ref, streams: _Streams, rotary):
        def mlp_and_out(attn_out, normed, gate, residual, skip):
            mlp = block.act_mlp(_apply(block.proj_mlp, normed, skip))
            merged = torch.cat([attn_out, mlp], dim=2)
            return _clip_fp16(residual + gate.unsqueeze(1) * _apply(block.proj_out, merged, skip))

        main = normed_main = None
        if streams.main_present:
            main = torch.cat([text, target], dim=1)
            normed_main, gate = _ada_norm(block.norm, main, temb, 3, streams.reference_adapter)
        streams.references = None
        if refs is not None:
            normed_refs, r_gate = _ada_norm(block.norm, refs, temb_ref, 3, None)
            streams.references = normed_refs
        out: _AttentionOutputs = block.attn(hidden_states=normed_main, image_rotary_emb=rotary, mosaic=streams)
        if streams.main_present:
            main = mlp_and_out(out.main, normed_main, gate, main, streams.reference_adapter)
            text, target = main[:, : streams.text_tokens], main[:, streams.text_tokens :]
        if refs is not None:
            refs = mlp_and_out(out.references, normed_refs, r_gate, refs, None)
        _feed_captures(streams, out)
        return text, target, refs

    def _run_block(self, kind, block, *args):
        fn = self._double_block if kind == "double" else self._single_block
        t = self.transformer
        if torch.is_grad_enabled() and t.gradient_checkpointing:
            return t._gradient_checkpointing_func(lambda *a: fn(block, *a), *args)
        return fn(block, *args)

    def _run_stack(self, target_tokens, text_embeddings, pooled_embeddings, timestep, target_ids, text_ids,
                   reference_tokens, reference_ids, counts, guidance, reference_guidance, capture, captures,
                   reference_cache) -> torch.Tensor:
        """The multi-reference forward after its input checks (`MosaicFluxTransformer.forward`)."""
        t = self.transformer
        batch = target_tokens.shape[0]
        target = _apply(t.x_embedder, target_tokens, self.reference_adapter)
        dtype = target.dtype  # as stock: the embedded tokens' dtype (differs from the input's under autocast)
        temb = self._embed_time(timestep, guidance, pooled_embeddings, dtype)
        text = t.context_embedder(text_embeddings)
        rotary = t.pos_embed(torch.cat([text_ids, target_ids]))
        refs = temb_ref = ref_rotary = None
        if reference_tokens is not None:
            refs = t.x_embedder(reference_tokens)
            temb_ref = self._reference_embedding(batch, pooled_embeddings, guidance, reference_guidance, dtype, refs.device)
            ref_rotary = t.pos_embed(reference_ids)

        cache_layers = iter(())
        if reference_cache is not None:
            cache_layers = iter(zip(reference_cache.keys, reference_cache.values))
        for kind, blocks in (("double", t.transformer_blocks), ("single", t.single_transformer_blocks)):
            for block in blocks:
                cached = next(cache_layers, None)
                if cached is not None and cached[0].shape[0] != batch:
                    cached = tuple(c.expand(batch, *c.shape[1:]) for c in cached)
                feed = capture is not None and (kind == "double" or self.capture_blocks == "all")
                streams = _Streams(None, ref_rotary, counts, text.shape[1], self.reference_attention,
                                   tuple(captures) if feed else (), cached, reference_adapter=self.reference_adapter)
                text, target, refs = self._run_block(kind, block, text, target, refs, temb, temb_ref, streams, rotary)
        return _apply(t.proj_out, t.norm_out(target, temb), self.reference_adapter)

    def _run_reference_stack(self, reference_tokens, reference_ids, pooled_embeddings, counts, guidance,
                             reference_guidance) -> ReferenceKVCache:
        """The reference stream alone (`MosaicFluxTransformer.build_reference_cache` after its checks)."""
        t = self.transformer
        batch = reference_tokens.shape[0]
        refs = t.x_embedder(reference_tokens)
        temb_ref = self._reference_embedding(batch, pooled_embeddings, guidance, reference_guidance, refs.dtype, refs.device)
        ref_rotary = t.pos_embed(reference_ids)
        cache = ReferenceKVCache(reference_token_counts=counts)
        store = (cache.keys, cache.values)
        for kind, blocks in (("double", t.transformer_blocks), ("single", t.single_transformer_blocks)):
            fn = self._double_block if kind == "double" else self._single_block
            for block in blocks:
                streams = _Streams(None, ref_rotary, counts, 0, "isolated", (), None, store, main_present=False,
                                   reference_adapter=self.reference_adapter)
                _, _, refs = fn(block, None, None, refs, None, temb_ref, streams, None)
        return cache
