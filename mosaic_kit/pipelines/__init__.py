"""Inference pipelines (diffusers style) and tiny random pipelines for tests and demos.

- `MosaicFluxPipeline`: prompt + K reference images → image, over a FLUX.1 base.
- `fit_on_white`, `load_reference_image`: the released reference preprocessing and input checks.
- `tiny_flux_components`, `tiny_mosaic_pipeline`: tiny random pipelines built in code.
"""

from .pipeline import (
    OUTPUT_TYPES,
    MosaicFluxPipeline,
    MosaicFluxPipelineOutput,
    fit_on_white,
    load_reference_image,
)
from .tiny import tiny_flux_components, tiny_mosaic_pipeline

__all__ = [
    "OUTPUT_TYPES",
    "MosaicFluxPipeline",
    "MosaicFluxPipelineOutput",
    "fit_on_white",
    "load_reference_image",
    "tiny_flux_components",
    "tiny_mosaic_pipeline",
]
