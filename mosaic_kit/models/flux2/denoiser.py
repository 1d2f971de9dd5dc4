"""The FLUX.2 denoiser the trainer wraps: the in-sequence base's denoiser
(`mosaic_kit.models.insequence.InSequenceDenoiser`) under its FLUX.2 name."""

from __future__ import annotations

from ..insequence import InSequenceDenoiser

__all__ = ["Flux2Denoiser"]


class Flux2Denoiser(InSequenceDenoiser):
    """The FLUX.2 denoiser as one module (what an accelerator wraps): the stock
    `Flux2Transformer2DModel`'s forward over ``[target | ref 1 | … | ref K]``, returning the
    target's prediction and feeding MOSAIC's captures through the in-sequence capture processors
    with the batch's `SequenceLayout` (everything is `InSequenceDenoiser`'s).

    Args:
        transformer: the stock `Flux2Transformer2DModel` (its LoRA included).
        capture_blocks: ``"all"``, ``"double"`` or a list of block names.

    Example:
        >>> from mosaic_kit.models.flux2 import Flux2Family
        >>> family = Flux2Family.tiny()
        >>> isinstance(family.model, Flux2Denoiser), family.model.capture_handle().block_names[0]
        (True, 'transformer_blocks.0')
    """
