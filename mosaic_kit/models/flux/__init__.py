"""FLUX.1 with K reference images and the reference LoRA (needs the ``flux`` extra: diffusers, peft).

Split by job:

- ``packing.py``: `pack_latents`, `unpack_latents`, `latent_image_ids`, `reference_position_ids`
  (pure torch);
- ``lora.py``: the reference LoRA through peft and its file (`add_reference_lora`,
  `load_reference_lora`, `save_reference_lora`, `set_reference_lora_scale`,
  `reference_lora_state_dict`, `write_lora_file`, `read_lora_file`, `lora_state_digest`) and
  `FLUX1_COMFYUI_KEYS` (its ComfyUI key map);
- ``processor.py``: the stream attention of eq. 7 (pure torch) and `ReferenceKVCache`;
- ``_diffusers.py``: **everything that touches diffusers internals**: `MosaicFluxAttnProcessor`
  (the stock processor extended with the reference stream) and the block forwards;
- ``transformer.py``: `MosaicFluxTransformer`, the multi-reference forward's API and checks;
- ``family.py``: `MosaicFluxFamily`, FLUX.1 behind the model boundary
  (`mosaic_kit.models.ModelFamily`): the one owner of encoding and decoding.

Every name is importable from ``mosaic_kit.models.flux`` and ``mosaic_kit.models``.
"""

from ._diffusers import FluxTransformer2DModel, MosaicFluxAttnProcessor
from .family import MosaicFluxFamily
from .lora import (
    DEFAULT_ADAPTER,
    FLUX1_COMFYUI_KEYS,
    LORA_DIGEST_KEY,
    REFERENCE_LORA_TARGETS,
    add_reference_lora,
    load_reference_lora,
    lora_state_digest,
    read_lora_file,
    reference_lora_state_dict,
    save_reference_lora,
    scale_lora_state,
    set_reference_lora_scale,
    write_lora_file,
)
from .packing import latent_image_ids, pack_latents, reference_position_ids, unpack_latents
from .processor import ReferenceKVCache
from .transformer import CAPTURE_BLOCKS, REFERENCE_ATTENTION, MosaicFluxTransformer

__all__ = [
    "FLUX1_COMFYUI_KEYS",
    "CAPTURE_BLOCKS",
    "DEFAULT_ADAPTER",
    "LORA_DIGEST_KEY",
    "REFERENCE_ATTENTION",
    "REFERENCE_LORA_TARGETS",
    "MosaicFluxAttnProcessor",
    "MosaicFluxFamily",
    "MosaicFluxTransformer",
    "ReferenceKVCache",
    "add_reference_lora",
    "latent_image_ids",
    "load_reference_lora",
    "lora_state_digest",
    "pack_latents",
    "read_lora_file",
    "reference_lora_state_dict",
    "reference_position_ids",
    "save_reference_lora",
    "scale_lora_state",
    "set_reference_lora_scale",
    "unpack_latents",
    "write_lora_file",
]
