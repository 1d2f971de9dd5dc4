"""The Qwen-Image-Edit-Plus denoiser the trainer wraps: the in-sequence base's denoiser
(`mosaic_kit.models.insequence.InSequenceDenoiser`) under its Qwen name."""

from __future__ import annotations

from ..insequence import InSequenceDenoiser

__all__ = ["QwenEditPlusDenoiser"]


class QwenEditPlusDenoiser(InSequenceDenoiser):
    """The Qwen-Image-Edit-Plus denoiser as one module (what an accelerator wraps): the stock
    `QwenImageTransformer2DModel`'s forward over ``[target | ref 1 | … | ref K]`` (``img_shapes``
    listing each image), returning the target's prediction (the stock pipeline's
    ``noise_pred[:, :N_tgt]``) and feeding MOSAIC's captures through the in-sequence capture
    processors with the batch's `SequenceLayout` (everything is `InSequenceDenoiser`'s).

    Args:
        transformer: the stock `QwenImageTransformer2DModel` (its LoRA included).
        capture_blocks: ``"all"`` or ``"double"`` (every Qwen-Image block is a double-stream
            block: both mean every block), or a list of block names (``"transformer_blocks.3"``).

    Example:
        >>> from mosaic_kit.models.qwen import QwenEditPlusFamily
        >>> QwenEditPlusFamily.tiny().model.capture_handle().block_names
        ('transformer_blocks.0', 'transformer_blocks.1')
    """
