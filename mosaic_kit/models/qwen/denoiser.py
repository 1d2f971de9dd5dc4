"""The Qwen-Image-Edit-Plus denoiser the trainer wraps: the stock transformer over
``[target | ref 1 | … | ref K]`` with the capture processors installed on the chosen blocks, fed
during a forward when a capture is given. The in-sequence part (one `SequenceLayout` from the
token counts, the captures fed through `install_capture_processors`) is kept in `capture_context`."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ...attention import RefTargetCapture
from ..insequence import CaptureProcessors, SequenceLayout, install_capture_processors

__all__ = ["QwenEditPlusDenoiser"]


class _Captures(RefTargetCapture):
    """Several captures fed from one installation (the training capture and diagnostics such as
    `mosaic_kit.attention.PointAttentionRows`, which share ``add(query, key)``); the first one's
    correspondences fix the layout check."""

    def __init__(self, captures: Sequence[Any]) -> None:  # stores nothing of its own
        self.captures, self.corr, self.scale = list(captures), captures[0].corr, None

    def add(self, query: torch.Tensor, key: torch.Tensor) -> None:
        for capture in self.captures:
            capture.add(query, key)


class QwenEditPlusDenoiser(nn.Module):
    """The Qwen-Image-Edit-Plus denoiser as one module (what an accelerator wraps): the stock
    `QwenImageTransformer2DModel` forward over the target's tokens followed by each reference's,
    returning the target's prediction (the stock pipeline's ``noise_pred[:, :N_tgt]``).

    Args:
        transformer: the stock `QwenImageTransformer2DModel` (its LoRA included).
        capture_blocks: ``"all"`` or ``"double"`` (every Qwen-Image block is a double-stream
            block: both mean every block), or a list of block names (``"transformer_blocks.3"``).

    Raises:
        ValueError: an unknown ``capture_blocks``.

    Example:
        >>> from mosaic_kit.models.qwen import QwenEditPlusFamily
        >>> QwenEditPlusFamily.tiny().model.capture_handle().block_names
        ('transformer_blocks.0', 'transformer_blocks.1')
    """

    def __init__(self, transformer: nn.Module, capture_blocks: str | Sequence[str] = "all") -> None:
        super().__init__()
        if isinstance(capture_blocks, str) and capture_blocks not in ("all", "double"):
            raise ValueError(f"Expected `capture_blocks` 'all', 'double' or a list of block names, but got "
                             f"{capture_blocks!r}.")
        self.transformer = transformer
        self.capture_blocks = "all" if isinstance(capture_blocks, str) else list(capture_blocks)
        self._handle: CaptureProcessors | None = None

    def capture_handle(self) -> CaptureProcessors:
        """The capture processors on the chosen blocks (installed on first use; idle, the forward
        is the stock one bit for bit)."""
        if self._handle is None:
            self._handle = install_capture_processors(self.transformer, blocks=self.capture_blocks)
        return self._handle

    def capture_context(self, capture: Any, tgt_tokens: int, ref_tokens: Sequence[int]) -> Any:
        """The context in which a forward feeds ``capture`` (a `RefTargetCapture`, a list of
        captures, or None: no context) with the layout ``[target | ref 1 | … | ref K]``.

        Raises:
            ValueError: a capture without references.
        """
        captures = [] if capture is None else list(capture) if isinstance(capture, (list, tuple)) else [capture]
        if not captures:
            return contextlib.nullcontext()
        if not ref_tokens:
            raise ValueError("Expected references (`ref_tokens`) for a capture, but got none.")
        fed = captures[0] if len(captures) == 1 and isinstance(captures[0], RefTargetCapture) else _Captures(captures)
        return self.capture_handle().capture(fed, SequenceLayout.concatenated(tgt_tokens, ref_tokens))

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                encoder_hidden_states_mask: torch.Tensor | None, timestep: torch.Tensor, img_shapes: list,
                tgt_tokens: int, ref_tokens: Sequence[int] = (), guidance: torch.Tensor | None = None,
                capture: Any = None) -> torch.Tensor:
        """Runs the stock forward; returns ``(B, tgt_tokens, C)``, the target's prediction.

        Args:
            hidden_states: ``(B, N_tgt + N_ref, C)`` noisy target tokens, then each reference's.
            encoder_hidden_states: ``(B, L, D)`` the vision-language prompt embeddings.
            encoder_hidden_states_mask: ``(B, L)`` 1 for real tokens, 0 for padding, or None.
            timestep: ``(B,)`` flow-matching time in ``[0, 1]``.
            img_shapes: per sample ``[(1, rows, cols)]`` of the target, then of each reference.
            tgt_tokens: N_tgt.
            ref_tokens: N^(k) per reference slot.
            guidance: ``(B,)`` for a guidance-embedding transformer, else None.
            capture: a `RefTargetCapture`, a list of captures (diagnostics with the same
                ``add(query, key)`` included), or None.
        """
        with self.capture_context(capture, tgt_tokens, ref_tokens):
            out = self.transformer(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                                   encoder_hidden_states_mask=encoder_hidden_states_mask, timestep=timestep,
                                   img_shapes=img_shapes, guidance=guidance, return_dict=False)[0]
        return out[:, :tgt_tokens]
