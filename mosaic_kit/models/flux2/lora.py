"""The FLUX.2 LoRA: one ordinary peft adapter on the attention and feed-forward projections (no
per-stream routing: reference and target tokens share every weight in FLUX.2)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..flux.lora import DEFAULT_ADAPTER
from ..insequence import linear_modules_matching

__all__ = ["FLUX2_ADAPTER", "FLUX2_LORA_TARGETS", "add_flux2_lora", "flux2_lora_target_modules"]

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
