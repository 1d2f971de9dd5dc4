"""FLUX.1's ComfyUI LoRA key map: the original (BFL) module that ComfyUI runs for each diffusers
module of `FluxTransformer2DModel` (checked against ComfyUI's ``comfy/ldm/flux/layers.py`` and
diffusers' kohya converter ``_convert_kohya_flux_lora_to_diffusers``).

The fused modules: a double block's ``img_attn.qkv`` (``attn.to_q/to_k/to_v``) and
``txt_attn.qkv`` (``attn.add_q/k/v_proj``); a single block's ``linear1``, which computes q, k, v
(the hidden width each) and the MLP input (``proj_mlp``, the rest) in that order. The
modulation linears keep their row order (shift, scale, gate in both layouts). The final layer's
``adaLN_modulation`` is left out: its rows are ordered differently (diffusers swaps scale and
shift) and no mosaic_kit LoRA adapts it.
"""

from __future__ import annotations

from ..comfyui import ComfyLoraKey

__all__ = ["FLUX1_COMFYUI_KEYS"]

_D = "transformer_blocks.{i}."
_S = "single_transformer_blocks.{i}."

FLUX1_COMFYUI_KEYS: tuple[ComfyLoraKey, ...] = (
    ComfyLoraKey("img_in", ("x_embedder",)),
    ComfyLoraKey("txt_in", ("context_embedder",)),
    ComfyLoraKey("time_in.in_layer", ("time_text_embed.timestep_embedder.linear_1",)),
    ComfyLoraKey("time_in.out_layer", ("time_text_embed.timestep_embedder.linear_2",)),
    ComfyLoraKey("vector_in.in_layer", ("time_text_embed.text_embedder.linear_1",)),
    ComfyLoraKey("vector_in.out_layer", ("time_text_embed.text_embedder.linear_2",)),
    ComfyLoraKey("guidance_in.in_layer", ("time_text_embed.guidance_embedder.linear_1",)),
    ComfyLoraKey("guidance_in.out_layer", ("time_text_embed.guidance_embedder.linear_2",)),
    ComfyLoraKey("double_blocks.{i}.img_mod.lin", (_D + "norm1.linear",)),
    ComfyLoraKey("double_blocks.{i}.img_attn.qkv", (_D + "attn.to_q", _D + "attn.to_k", _D + "attn.to_v")),
    ComfyLoraKey("double_blocks.{i}.img_attn.proj", (_D + "attn.to_out.0",)),
    ComfyLoraKey("double_blocks.{i}.img_mlp.0", (_D + "ff.net.0.proj",)),
    ComfyLoraKey("double_blocks.{i}.img_mlp.2", (_D + "ff.net.2",)),
    ComfyLoraKey("double_blocks.{i}.txt_mod.lin", (_D + "norm1_context.linear",)),
    ComfyLoraKey("double_blocks.{i}.txt_attn.qkv", (_D + "attn.add_q_proj", _D + "attn.add_k_proj",
                                                   _D + "attn.add_v_proj")),
    ComfyLoraKey("double_blocks.{i}.txt_attn.proj", (_D + "attn.to_add_out",)),
    ComfyLoraKey("double_blocks.{i}.txt_mlp.0", (_D + "ff_context.net.0.proj",)),
    ComfyLoraKey("double_blocks.{i}.txt_mlp.2", (_D + "ff_context.net.2",)),
    ComfyLoraKey("single_blocks.{i}.modulation.lin", (_S + "norm.linear",)),
    ComfyLoraKey("single_blocks.{i}.linear1", (_S + "attn.to_q", _S + "attn.to_k", _S + "attn.to_v", _S + "proj_mlp"),
                 widths=("in", "in", "in", "rest")),
    ComfyLoraKey("single_blocks.{i}.linear2", (_S + "proj_out",)),
    ComfyLoraKey("final_layer.linear", ("proj_out",)),
)
"""FLUX.1 (`FluxTransformer2DModel`) modules → the original modules ComfyUI's FLUX model has."""
