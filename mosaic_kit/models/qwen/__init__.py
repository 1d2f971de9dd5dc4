"""Qwen-Image-Edit-Plus (2509 and 2511) with K reference images: MOSAIC on the stock
`QwenImageTransformer2DModel`, laid out as diffusers' `QwenImageEditPlusPipeline` lays out its
references.

The pipeline uses every reference twice: the Qwen2.5-VL text encoder sees it (resized to about
384² pixels) as "Picture k" in its prompt, and the transformer sees its VAE latents, packed 2×2,
after the target's tokens, ``[target | ref 1 | … | ref K]``, with ``img_shapes`` listing each
image's ``(frames, rows, cols)`` for the per-image RoPE. `QwenEditPlusFamily` builds exactly those
inputs for a training batch by calling the pipeline's own encoding steps; everything else is the
in-sequence base's (`mosaic_kit.models.insequence.InSequenceFamily`): the forward, MOSAIC's capture
through the in-sequence capture processors with one `SequenceLayout`, building, and the LoRA, one
plain peft adapter that ``QwenImageEditPlusPipeline.load_lora_weights`` loads unchanged.

The package is split by job: ``denoiser`` (the base's denoiser under its Qwen name), ``family``
(`QwenEditPlusFamily`) and ``tiny`` (tiny random components built in code).
"""

from .denoiser import QwenEditPlusDenoiser
from .family import QWEN_ADAPTER, QWEN_LORA_FILE, QWEN_LORA_TARGETS, TINY_IMAGE_SIZES, QwenEditPlusFamily

__all__ = ["QWEN_ADAPTER", "QWEN_LORA_FILE", "QWEN_LORA_TARGETS", "TINY_IMAGE_SIZES", "QwenEditPlusDenoiser",
           "QwenEditPlusFamily"]
