"""The FLUX.2 LoRA: one ordinary peft adapter on the attention and feed-forward projections (no
per-stream routing: reference and target tokens share every weight in FLUX.2)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..comfyui import ComfyLoraKey
from ..flux.lora import DEFAULT_ADAPTER
from ..insequence import linear_modules_matching

__all__ = ["FLUX2_ADAPTER", "FLUX2_COMFYUI_KEYS", "FLUX2_LORA_TARGETS", "add_flux2_lora", "flux2_lora_target_modules"]

FLUX2_LORA_TARGETS: tuple[str, ...] = (
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out",
    "to_qkv_mlp_proj", "attn.to_out",
)
"""Default LoRA targets, as name suffixes of `torch.nn.Linear` modules: the double-stream
blocks' attention (image and text projections; ``to_out.0`` because ``to_out`` is a
``ModuleList`` there) and feed-forward layers, and the parallel single-stream blocks' fused
``to_qkv_mlp_proj`` and ``attn.to_out`` (a plain linear there)."""

FLUX2_ADAPTER = DEFAULT_ADAPTER
"""The LoRA's peft adapter name, ``"mosaic"``: the FLUX.1 reference LoRA's, so the trainer's
checkpoints (raw LoRA values saved and restored by adapter name) serve both families."""


def flux2_lora_target_modules(transformer: torch.nn.Module, targets: Sequence[str] = FLUX2_LORA_TARGETS) -> list[str]:
    """The full names of the `torch.nn.Linear` modules whose name ends with one of ``targets``.

    Expanding the suffixes to full names lets one list hold ``attn.to_out`` (a linear in the
    single-stream blocks) without peft also matching the double-stream blocks' ``to_out``
    ``ModuleList`` (which peft refuses).

    Args:
        transformer: a `Flux2Transformer2DModel` (or any module).
        targets: module-name suffixes (matched at a ``.`` boundary or as the whole name).

    Returns:
        The matching module names, in module order.

    Raises:
        ValueError: if ``targets`` is empty, not strings, or matches no linear module.

    Example:
        >>> from diffusers import Flux2Transformer2DModel
        >>> from mosaic_kit.models.flux2.tiny import TINY_FLUX2_TRANSFORMER_CONFIG
        >>> model = Flux2Transformer2DModel(**TINY_FLUX2_TRANSFORMER_CONFIG)
        >>> flux2_lora_target_modules(model, ["to_out.0", "attn.to_out"])
        ['transformer_blocks.0.attn.to_out.0', 'single_transformer_blocks.0.attn.to_out', 'single_transformer_blocks.1.attn.to_out']
    """
    return linear_modules_matching(transformer, targets)


def add_flux2_lora(transformer: nn.Module, rank: int, alpha: float | None = None,
                   targets: Sequence[str] = FLUX2_LORA_TARGETS, init: str | bool = True) -> list[str]:
    """Adds a peft LoRA (adapter ``"mosaic"`` (`FLUX2_ADAPTER`)) on the target projections of a FLUX.2 transformer.

    Reference and target tokens share these weights (FLUX.2 has no reference branch), so there
    is no per-stream routing: one ordinary adapter, as diffusers' FLUX.2 LoRA loader expects.

    Args:
        transformer: a `Flux2Transformer2DModel`.
        rank: LoRA rank.
        alpha: LoRA alpha (None: ``rank``, scale 1).
        targets: module-name suffixes (`FLUX2_LORA_TARGETS`), expanded by `flux2_lora_target_modules`.
        init: peft's ``init_lora_weights`` (True: B = 0, the output is unchanged at first;
            False: random B, for tests that must see an effect).

    Returns:
        The full names of the wrapped modules.

    Raises:
        ValueError: a bad ``rank`` or ``targets``.

    Example:
        >>> from diffusers import Flux2Transformer2DModel
        >>> from mosaic_kit.models.flux2.tiny import TINY_FLUX2_TRANSFORMER_CONFIG
        >>> model = Flux2Transformer2DModel(**TINY_FLUX2_TRANSFORMER_CONFIG)
        >>> add_flux2_lora(model, rank=2, targets=["to_qkv_mlp_proj"])
        ['single_transformer_blocks.0.attn.to_qkv_mlp_proj', 'single_transformer_blocks.1.attn.to_qkv_mlp_proj']
    """
    from peft import LoraConfig

    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"Expected `rank` to be a positive int, but got {rank!r}.")
    names = flux2_lora_target_modules(transformer, targets)
    config = LoraConfig(r=rank, lora_alpha=rank if alpha is None else alpha, target_modules=names,
                        init_lora_weights=init)
    transformer.add_adapter(config, adapter_name=FLUX2_ADAPTER)
    return names

# -- ComfyUI key map (`ModelFamily.save_lora(..., format="comfyui")`) ------------------------------
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
"""FLUX.2 (`Flux2Transformer2DModel`) modules → the original modules ComfyUI's FLUX.2 model has.

FLUX.2's ComfyUI LoRA key map: the original (BFL) module that ComfyUI runs for each diffusers
module of `Flux2Transformer2DModel` (the names of diffusers' own FLUX.2 checkpoint converter
``convert_flux2_transformer_checkpoint_to_diffusers``, which ComfyUI's FLUX.2 model loads
unchanged, and of diffusers' ``_convert_kohya_flux2_lora_to_diffusers``).

Only the double blocks' q/k/v are fused there (``img_attn.qkv``, ``txt_attn.qkv``); diffusers
already keeps a single block's ``to_qkv_mlp_proj`` fused (``linear1``, the same rows) and its
``attn.to_out`` is ``linear2``. The shared modulations keep their row order; the final layer's
``adaLN_modulation`` is left out (diffusers swaps its scale and shift rows).
"""
