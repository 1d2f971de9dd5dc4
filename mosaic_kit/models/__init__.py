"""FLUX with K reference images and the reference LoRA (needs the ``flux`` extra: diffusers, peft).

- `MosaicFluxTransformer`: the multi-reference forward over a stock diffusers
  `FluxTransformer2DModel` (eq. 4-7), feeding `mosaic_kit.attention.RefTargetCapture`.
- `add_reference_lora`, `load_reference_lora`, `save_reference_lora`: the reference LoRA through
  peft, in diffusers' LoRA safetensors layout (released checkpoints load unchanged); files the
  project writes carry a digest of their tensors (`read_lora_file` verifies it).
- `pack_latents`, `latent_image_ids`, `reference_position_ids`: packing and position ids.
- `install_capture_processors`, `SequenceLayout`, `CaptureProcessors` and the capture processors
  (`FluxCaptureProcessor`, `Flux2CaptureProcessor`, `Flux2ParallelCaptureProcessor`,
  `SD3CaptureProcessor`, `QwenCaptureProcessor`): MOSAIC's capture on stock diffusers DiTs that
  put the references in the target's sequence (Kontext, FLUX.2, SD3 in-context, Qwen-Image-Edit).
- `PixelAutoencoder`: pixel space behind the VAE interface, for CPU-sized experiments.
- `mosaic_kit.models.testing`: tiny random transformers and inputs.
"""

from .flux import (
    CAPTURE_BLOCKS,
    DEFAULT_ADAPTER,
    LORA_DIGEST_KEY,
    REFERENCE_ATTENTION,
    REFERENCE_LORA_TARGETS,
    MosaicFluxAttnProcessor,
    MosaicFluxTransformer,
    ReferenceKVCache,
    add_reference_lora,
    latent_image_ids,
    load_reference_lora,
    lora_state_digest,
    pack_latents,
    read_lora_file,
    reference_lora_state_dict,
    reference_position_ids,
    save_reference_lora,
    set_reference_lora_scale,
    unpack_latents,
    write_lora_file,
)
from .insequence import (
    CaptureProcessors,
    Flux2CaptureProcessor,
    Flux2ParallelCaptureProcessor,
    FluxCaptureProcessor,
    QwenCaptureProcessor,
    SD3CaptureProcessor,
    SequenceLayout,
    install_capture_processors,
)
from .pixel import PixelAutoencoder

__all__ = [
    "CAPTURE_BLOCKS",
    "CaptureProcessors",
    "DEFAULT_ADAPTER",
    "Flux2CaptureProcessor",
    "Flux2ParallelCaptureProcessor",
    "FluxCaptureProcessor",
    "LORA_DIGEST_KEY",
    "REFERENCE_ATTENTION",
    "REFERENCE_LORA_TARGETS",
    "MosaicFluxAttnProcessor",
    "MosaicFluxTransformer",
    "PixelAutoencoder",
    "QwenCaptureProcessor",
    "ReferenceKVCache",
    "SD3CaptureProcessor",
    "SequenceLayout",
    "add_reference_lora",
    "install_capture_processors",
    "latent_image_ids",
    "load_reference_lora",
    "lora_state_digest",
    "pack_latents",
    "read_lora_file",
    "reference_lora_state_dict",
    "reference_position_ids",
    "save_reference_lora",
    "set_reference_lora_scale",
    "unpack_latents",
    "write_lora_file",
]
