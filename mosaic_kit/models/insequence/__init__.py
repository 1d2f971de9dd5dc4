"""Capture processors for diffusers DiTs that put the reference tokens in the target's sequence.

FLUX.1-Kontext, FLUX.2, Qwen-Image-Edit-Plus, OmniGen2, UNO and in-context LoRAs on SD3 run the
target and the K references through the same attention: the references are extra image tokens
of one joint sequence. MOSAIC then needs, per chosen block, the post-RoPE queries of the
reference tokens and the post-RoPE keys of the target tokens, exactly as the model's softmax
sees them. The only place where they exist is the attention processor, so this package offers:

- `SequenceLayout`: where the target and each reference sit in the image part of the joint
  sequence (per sample when they differ), and the gather that turns the joint queries and keys
  into the ``(B, H, N_ref_total, D)`` / ``(B, H, N_tgt, D)`` that `RefTargetCapture.add` takes.
- `install_capture_processors`: installs, through diffusers' ``set_attn_processor``, one capture
  processor per chosen block, picked by the attention's stock processor class, and returns a
  `CaptureProcessors` handle (``with handle.capture(capture, layout): ...``; ``handle.remove()``).
- `InSequenceFamily` (``family``): the base of the model families whose references sit in the
  target's sequence (FLUX.2, FLUX.1-Kontext, Qwen-Image-Edit-Plus): the layout from the stock pipeline's steps as one
  `SequenceLayout` from encoding to the capture, the `InSequenceDenoiser` (``denoiser``), and one
  plain peft LoRA that the stock pipeline loads.
- The processors: `FluxCaptureProcessor` (`FluxTransformer2DModel`, double and single blocks),
  `Flux2CaptureProcessor` and `Flux2ParallelCaptureProcessor` (`Flux2Transformer2DModel`),
  `SD3CaptureProcessor` (`SD3Transformer2DModel`, joint attention) and `QwenCaptureProcessor`
  (`QwenImageTransformer2DModel`). Each subclasses the stock processor: with no capture active it
  *is* the stock call (bit-identical output); with one active it runs a copy of the stock body
  that hands the post-norm, post-RoPE query and key to the capture just before the softmax.

All five stock processors call the softmax with its default scale, ``1/sqrt(D)`` (none of them
reads ``attn.scale``), which is also `RefTargetCapture`'s default; a capture built with another
``scale`` is refused. SD3.5-style blocks have a second, image-only attention ``attn2``: it keeps
its stock processor and never feeds, so every chosen block feeds exactly once per forward.

The package is split by job: ``layout`` (pure torch), ``processors`` (the one file that touches
diffusers' attention internals), ``install``, ``denoiser`` and ``family``.
"""

from .denoiser import InSequenceDenoiser
from .family import IN_SEQUENCE_ADAPTER, IN_SEQUENCE_LORA_FILE, InSequenceFamily, linear_modules_matching
from .install import CaptureProcessors, install_capture_processors
from .layout import SequenceLayout
from .processors import (
    Flux2CaptureProcessor,
    Flux2ParallelCaptureProcessor,
    FluxCaptureProcessor,
    QwenCaptureProcessor,
    SD3CaptureProcessor,
)

__all__ = [
    "IN_SEQUENCE_ADAPTER",
    "IN_SEQUENCE_LORA_FILE",
    "CaptureProcessors",
    "InSequenceDenoiser",
    "InSequenceFamily",
    "linear_modules_matching",
    "Flux2CaptureProcessor",
    "Flux2ParallelCaptureProcessor",
    "FluxCaptureProcessor",
    "QwenCaptureProcessor",
    "SD3CaptureProcessor",
    "SequenceLayout",
    "install_capture_processors",
]
