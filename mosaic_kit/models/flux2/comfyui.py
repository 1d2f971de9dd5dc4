"""FLUX.2's ComfyUI LoRA key map: the original (BFL) module that ComfyUI runs for each diffusers
module of `Flux2Transformer2DModel` (the names of diffusers' own FLUX.2 checkpoint converter
``convert_flux2_transformer_checkpoint_to_diffusers``, which ComfyUI's FLUX.2 model loads
unchanged, and of diffusers' ``_convert_kohya_flux2_lora_to_diffusers``).

Only the double blocks' q/k/v are fused there (``img_attn.qkv``, ``txt_attn.qkv``); diffusers
already keeps a single block's ``to_qkv_mlp_proj`` fused (``linear1``, the same rows) and its
``attn.to_out`` is ``linear2``. The shared modulations keep their row order; the final layer's
``adaLN_modulation`` is left out (diffusers swaps its scale and shift rows).
"""

from __future__ import annotations

from ..comfyui import ComfyLoraKey

__all__ = ["FLUX2_COMFYUI_KEYS"]

_D = "transformer_blocks.{i}."
_S = "single_transformer_blocks.{i}."

FLUX2_COMFYUI_KEYS: tuple[ComfyLoraKey, ...] = (
    ComfyLoraKey("img_in", ("x_embedder",)),
    ComfyLoraKey("txt_in", ("context_embedder",)),
    ComfyLoraKey("time_in.in_layer", ("time_guidance_embed.timestep_embedder.linear_1",)),
    ComfyLoraKey("time_in.out_layer", ("time_guidance_embed.timestep_embedder.linear_2",)),
    ComfyLoraKey("guidance_in.in_layer", ("time_guidance_embed.guidance_embedder.linear_1",)),
    ComfyLoraKey("guidance_in.out_layer", ("time_guidance_embed.guidance_embedder.linear_2",)),
    ComfyLoraKey("double_stream_modulation_img.lin", ("double_stream_modulation_img.linear",)),
    ComfyLoraKey("double_stream_modulation_txt.lin", ("double_stream_modulation_txt.linear",)),
    ComfyLoraKey("single_stream_modulation.lin", ("single_stream_modulation.linear",)),
    ComfyLoraKey("double_blocks.{i}.img_attn.qkv", (_D + "attn.to_q", _D + "attn.to_k", _D + "attn.to_v")),
    ComfyLoraKey("double_blocks.{i}.img_attn.proj", (_D + "attn.to_out.0",)),
    ComfyLoraKey("double_blocks.{i}.img_mlp.0", (_D + "ff.linear_in",)),
    ComfyLoraKey("double_blocks.{i}.img_mlp.2", (_D + "ff.linear_out",)),
    ComfyLoraKey("double_blocks.{i}.txt_attn.qkv", (_D + "attn.add_q_proj", _D + "attn.add_k_proj",
                                                   _D + "attn.add_v_proj")),
    ComfyLoraKey("double_blocks.{i}.txt_attn.proj", (_D + "attn.to_add_out",)),
    ComfyLoraKey("double_blocks.{i}.txt_mlp.0", (_D + "ff_context.linear_in",)),
    ComfyLoraKey("double_blocks.{i}.txt_mlp.2", (_D + "ff_context.linear_out",)),
    ComfyLoraKey("single_blocks.{i}.linear1", (_S + "attn.to_qkv_mlp_proj",)),
    ComfyLoraKey("single_blocks.{i}.linear2", (_S + "attn.to_out",)),
    ComfyLoraKey("final_layer.linear", ("proj_out",)),
)
"""FLUX.2 (`Flux2Transformer2DModel`) modules → the original modules ComfyUI's FLUX.2 model has."""
