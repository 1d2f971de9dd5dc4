"""Inference pipelines (diffusers style) and tiny random pipelines for tests and demos.

- `MosaicFluxPipeline`: prompt + K reference images → image, over a FLUX.1 base (encoding and
  decoding through its model family, `mosaic_kit.models.MosaicFluxFamily`).
- `fit_on_white`, `load_reference_image`: the released reference preprocessing and input checks.
- `FamilySpec`, `register_family`, `get_family`, `family_names`, `build_family` (``registry``):
  the one plug-in point for model families, chosen by name.
- `tiny_flux_components`, `tiny_mosaic_pipeline`: tiny random pipelines built in code.
- `tiny_flux2_components`, `tiny_flux2_pipeline`, `tiny_qwen_tokenizer`, `Flux2PixelAutoencoder`: the
  same for FLUX.2 [klein] (tokenizer included, no downloads).
"""

from .. import models  # noqa: F401  (first: chooses the image processors before diffusers' pipelines load)
from .pipeline import (
    OUTPUT_TYPES,
    MosaicFluxPipeline,
    MosaicFluxPipelineOutput,
    fit_on_white,
    load_reference_image,
)
from .registry import FamilySpec, build_family, family_names, get_family, register_family
from .tiny import tiny_flux_components, tiny_mosaic_pipeline
from .tiny_flux2 import Flux2PixelAutoencoder, tiny_flux2_components, tiny_flux2_pipeline, tiny_qwen_tokenizer

__all__ = [
    "FamilySpec",
    "build_family",
    "family_names",
    "get_family",
    "register_family",
    "Flux2PixelAutoencoder",
    "OUTPUT_TYPES",
    "MosaicFluxPipeline",
    "MosaicFluxPipelineOutput",
    "fit_on_white",
    "load_reference_image",
    "tiny_flux_components",
    "tiny_mosaic_pipeline",
    "tiny_flux2_components",
    "tiny_flux2_pipeline",
    "tiny_qwen_tokenizer",
]
