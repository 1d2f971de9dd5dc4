"""FLUX.2 with K reference images: MOSAIC on the stock `Flux2Transformer2DModel`.

FLUX.2 ([klein] and [dev]) takes references natively: diffusers' `Flux2KleinPipeline` and
`Flux2Pipeline` encode each reference with the FLUX.2 autoencoder (distribution mode, patchified
2×2, normalised by the autoencoder's latent batch-norm statistics), append its tokens after the
target's, ``[target | ref 1 | … | ref K]``, and tell them apart by the time axis of the 4-axis
position ids (reference ``k``, 0-based, at ``T = 10·(k + 1)``, the target at ``T = 0``).
`Flux2Family` builds exactly those inputs for a training batch, by calling the pipeline's own
encoding steps, so what is trained is what the stock pipeline runs.

MOSAIC's capture comes from the in-sequence capture processors
(`mosaic_kit.models.install_capture_processors`), which the family installs on the chosen blocks.
Reference and target tokens share every weight in FLUX.2, so the LoRA is one ordinary peft
adapter on the attention and feed-forward projections (no per-stream routing), saved in diffusers'
LoRA layout with its adapter metadata: ``Flux2KleinPipeline.load_lora_weights(folder)`` (or
``Flux2Pipeline``'s) loads the file unchanged, without mosaic_kit.

The package is split by job: ``lora`` (the adapter and its targets), ``denoiser`` (the stock
transformer with the capture processors) and ``family`` (`Flux2Family`).
"""

from .denoiser import Flux2Denoiser
from .family import FLUX2_LORA_FILE, FLUX2_REFERENCE_TIME_SCALE, Flux2Family
from .lora import FLUX2_ADAPTER, FLUX2_COMFYUI_KEYS, FLUX2_LORA_TARGETS, add_flux2_lora, flux2_lora_target_modules

__all__ = [
    "FLUX2_ADAPTER",
    "FLUX2_COMFYUI_KEYS",
    "FLUX2_LORA_FILE",
    "FLUX2_LORA_TARGETS",
    "FLUX2_REFERENCE_TIME_SCALE",
    "Flux2Denoiser",
    "Flux2Family",
    "add_flux2_lora",
    "flux2_lora_target_modules",
]
