"""Tiny random FLUX.1 pipelines for tests and demos.

The tiny components live with their family (`mosaic_kit.models.flux.tiny`); their names stay
importable here. `tiny_mosaic_pipeline` builds a `MosaicFluxPipeline` over them.
"""

from __future__ import annotations

from typing import Any

from ..models.flux.tiny import (
    TINY_CLIP_TEXT_CONFIG,
    TINY_T5_CONFIG,
    TINY_TRANSFORMER_CONFIG,
    TINY_VAE_CONFIG,
    tiny_clip_tokenizer,
    tiny_flux_components,
    tiny_t5_tokenizer,
)

__all__ = [
    "TINY_CLIP_TEXT_CONFIG",
    "TINY_T5_CONFIG",
    "TINY_TRANSFORMER_CONFIG",
    "TINY_VAE_CONFIG",
    "tiny_clip_tokenizer",
    "tiny_flux_components",
    "tiny_mosaic_pipeline",
    "tiny_t5_tokenizer",
]


def tiny_mosaic_pipeline(seed: int = 0, lora_rank: int = 4) -> Any:
    """A tiny random `MosaicFluxPipeline` with a fresh reference LoRA, on the CPU in float32.

    It exercises the whole inference path (prompt encoding, reference encoding, the
    multi-reference transformer, the scheduler, decoding) in well under a second per step; its
    images are noise, since nothing is trained.

    Args:
        seed: seed of every random weight.
        lora_rank: rank of the reference LoRA.

    Returns:
        The pipeline.

    Example:
        >>> pipe = tiny_mosaic_pipeline()
        >>> "mosaic" in pipe.transformer.peft_config
        True
    """
    from ..models import add_reference_lora
    from .pipeline import MosaicFluxPipeline

    pipe = MosaicFluxPipeline(**tiny_flux_components(seed))
    add_reference_lora(pipe.transformer, rank=lora_rank)
    pipe.set_progress_bar_config(leave=False)
    return pipe
