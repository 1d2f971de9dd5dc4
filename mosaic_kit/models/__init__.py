"""FLUX with K reference images and the reference LoRA (needs the ``flux`` extra: diffusers, peft).

- `ModelFamily`, `ModelInputs`, `TokenLayout`, `TRAINABLE`, `PREDICTIONS`, `MIN_SAMPLE_SIGMA`, `logit_normal_sigmas`, `resolution_shift_mu`: the model
  boundary (`family.py`) that the trainer, the pipelines and the evaluation use; one
  implementation per model family. `MosaicFluxFamily`: FLUX.1 with multi-branch references.
- `MosaicFluxTransformer` (package `flux/`, split by job): the multi-reference forward over a stock diffusers
  `FluxTransformer2DModel` (eq. 4-7), feeding `mosaic_kit.attention.RefTargetCapture`.
- `add_reference_lora`, `load_reference_lora`, `save_reference_lora`: the reference LoRA through
  peft, in diffusers' LoRA safetensors layout (released checkpoints load unchanged); files the
  project writes carry a digest of their tensors (`read_lora_file` verifies it) and the name of the
  family that wrote them (`LORA_FAMILY_KEY`: a family's ``load_lora`` refuses another family's file).
- `pack_latents`, `latent_image_ids`, `reference_position_ids`: packing and position ids.
- `install_capture_processors`, `SequenceLayout`, `CaptureProcessors` and the capture processors
  (`insequence/`: `layout`, `processors`, `install`; `FluxCaptureProcessor`, `Flux2CaptureProcessor`, `Flux2ParallelCaptureProcessor`,
  `SD3CaptureProcessor`, `QwenCaptureProcessor`): MOSAIC's capture on stock diffusers DiTs that
  put the references in the target's sequence (Kontext, FLUX.2, SD3 in-context, Qwen-Image-Edit).
- `Flux2Family` (`flux2/`: `lora`, `denoiser`, `family`): FLUX.2 [klein]/[dev] behind the same boundary, laid out exactly as the
  stock `Flux2KleinPipeline`/`Flux2Pipeline` (in-sequence references, a plain peft LoRA that the stock
  pipelines load with `load_lora_weights`).
- `QwenEditPlusFamily` (`qwen/`: `denoiser`, `family`, `tiny`): Qwen-Image-Edit-Plus 2509/2511 behind the same
  boundary, laid out exactly as the stock `QwenImageEditPlusPipeline` (each reference a "Picture k" of the
  vision-language prompt and VAE tokens after the target's; a plain peft LoRA the stock pipeline loads).
- `InSequenceFamily`, `InSequenceDenoiser` (`insequence/family.py`, `denoiser.py`): the base of the
  families whose references sit in the target's sequence (one `SequenceLayout` from encoding to the
  capture, one plain peft LoRA that the stock pipeline loads).
- `KontextFamily`, `kontext_reference_ids` (`kontext/`): FLUX.1-Kontext with K references placed by
  ComfyUI's ``offset``/``index``/``uxo`` methods, on the stock `FluxKontextPipeline` layout.
- `PixelAutoencoder`: pixel space behind the VAE interface, for CPU-sized experiments.
- `mosaic_kit.models.testing`: tiny random transformers and inputs.

Importing the package first binds the transformers image processors diffusers imports to their
PIL backends where torchvision is missing (`_image_processors`: no torchvision warnings).
"""

from ._image_processors import choose_image_processors  # first: before any module imports diffusers
from ._lora_origin import LORA_FAMILY_KEY
from .family import (
    MIN_SAMPLE_SIGMA,
    PREDICTIONS,
    TRAINABLE,
    ModelFamily,
    ModelInputs,
    TokenLayout,
    check_trainable,
    logit_normal_sigmas,
    resolution_shift_mu,
)
from .flux import (
    CAPTURE_BLOCKS,
    DEFAULT_ADAPTER,
    LORA_DIGEST_KEY,
    REFERENCE_ATTENTION,
    REFERENCE_LORA_TARGETS,
    MosaicFluxAttnProcessor,
    MosaicFluxFamily,
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
    scale_lora_state,
    set_reference_lora_scale,
    unpack_latents,
    write_lora_file,
)
from .insequence import (
    CaptureProcessors,
    InSequenceDenoiser,
    InSequenceFamily,
    Flux2CaptureProcessor,
    Flux2ParallelCaptureProcessor,
    FluxCaptureProcessor,
    QwenCaptureProcessor,
    SD3CaptureProcessor,
    SequenceLayout,
    install_capture_processors,
)
from .flux2 import (
    FLUX2_ADAPTER,
    FLUX2_LORA_FILE,
    FLUX2_LORA_TARGETS,
    FLUX2_REFERENCE_TIME_SCALE,
    Flux2Denoiser,
    Flux2Family,
    add_flux2_lora,
    flux2_lora_target_modules,
)
from .kontext import KontextFamily, kontext_reference_ids
from .pixel import PixelAutoencoder
from .qwen import QWEN_LORA_TARGETS, QwenEditPlusDenoiser, QwenEditPlusFamily

__all__ = [
    "FLUX2_ADAPTER",
    "FLUX2_LORA_FILE",
    "FLUX2_LORA_TARGETS",
    "FLUX2_REFERENCE_TIME_SCALE",
    "Flux2Denoiser",
    "Flux2Family",
    "add_flux2_lora",
    "flux2_lora_target_modules",
    "CAPTURE_BLOCKS",
    "CaptureProcessors",
    "DEFAULT_ADAPTER",
    "Flux2CaptureProcessor",
    "Flux2ParallelCaptureProcessor",
    "FluxCaptureProcessor",
    "InSequenceDenoiser",
    "InSequenceFamily",
    "KontextFamily",
    "LORA_DIGEST_KEY",
    "LORA_FAMILY_KEY",
    "REFERENCE_ATTENTION",
    "REFERENCE_LORA_TARGETS",
    "ModelFamily",
    "ModelInputs",
    "MosaicFluxAttnProcessor",
    "MosaicFluxFamily",
    "MosaicFluxTransformer",
    "PixelAutoencoder",
    "QWEN_LORA_TARGETS",
    "QwenCaptureProcessor",
    "QwenEditPlusDenoiser",
    "QwenEditPlusFamily",
    "ReferenceKVCache",
    "SD3CaptureProcessor",
    "SequenceLayout",
    "MIN_SAMPLE_SIGMA",
    "PREDICTIONS",
    "TRAINABLE",
    "TokenLayout",
    "add_reference_lora",
    "check_trainable",
    "install_capture_processors",
    "kontext_reference_ids",
    "latent_image_ids",
    "load_reference_lora",
    "logit_normal_sigmas",
    "lora_state_digest",
    "pack_latents",
    "read_lora_file",
    "reference_lora_state_dict",
    "reference_position_ids",
    "resolution_shift_mu",
    "save_reference_lora",
    "scale_lora_state",
    "set_reference_lora_scale",
    "unpack_latents",
    "write_lora_file",
]
