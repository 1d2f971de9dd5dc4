"""Tiny random FLUX.2 [klein] pipelines for tests and demos.

The tiny components live with their family (`mosaic_kit.models.flux2.tiny`); their names stay
importable here.
"""

from ..models.flux2.tiny import (
    TINY_FLUX2_TEXT_CONFIG,
    TINY_FLUX2_TEXT_OUT_LAYERS,
    TINY_FLUX2_TRANSFORMER_CONFIG,
    TINY_FLUX2_VAE_CONFIG,
    Flux2PixelAutoencoder,
    tiny_flux2_components,
    tiny_flux2_pipeline,
    tiny_qwen_tokenizer,
)

__all__ = [
    "Flux2PixelAutoencoder",
    "TINY_FLUX2_TEXT_CONFIG",
    "TINY_FLUX2_TEXT_OUT_LAYERS",
    "TINY_FLUX2_TRANSFORMER_CONFIG",
    "TINY_FLUX2_VAE_CONFIG",
    "tiny_flux2_components",
    "tiny_flux2_pipeline",
    "tiny_qwen_tokenizer",
]
