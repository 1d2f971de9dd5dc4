"""The FLUX.2 denoiser the trainer wraps: the stock transformer with the capture processors
installed on the chosen blocks, fed during a forward when a capture is given."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ...attention import RefTargetCapture
from ..insequence import CaptureProcessors, SequenceLayout, install_capture_processors

__all__ = ["Flux2Denoiser"]


class _FanOut(RefTargetCapture):
    """Feeds several captures from one installation (the training capture and diagnostics such as
    `mosaic_kit.attention.PointAttentionRows`, which share ``add(query, key)``); the first one's
    correspondences fix the layout check."""

    def __init__(self, captures: Sequence[Any]) -> None:  # no super().__init__: nothing is stored here
        self.captures = list(captures)
        self.corr = self.captures[0].corr
        self.scale = None

    def add(self, query: torch.Tensor, key: torch.Tensor) -> None:
        for capture in self.captures:
            capture.add(query, key)


class Flux2Denoiser(nn.Module):
    """The FLUX.2 denoiser as one module (what an accelerator wraps): the stock transformer's
    forward over ``[target | ref 1 | … | ref K]``, returning the target's prediction and feeding
    MOSAIC's captures through the in-sequence capture processors.

    Args:
        transformer: the stock `Flux2Transformer2DModel` (its LoRA included).
        capture_blocks: ``"all"``, ``"double"`` or a list of block names.

    Example:
        >>> from mosaic_kit.models.flux2 import Flux2Family
        >>> family = Flux2Family.tiny()
        >>> isinstance(family.model, Flux2Denoiser), family.model.capture_handle().block_names[0]
        (True, 'transformer_blocks.0')
    """

    def __init__(self, transformer: nn.Module, capture_blocks: str | Sequence[str] = "all") -> None:
        super().__init__()
        if isinstance(capture_blocks, str) and capture_blocks not in ("all", "double"):
            raise ValueError(f"Expected `capture_blocks` 'all', 'double' or a list of block names, but got {capture_blocks!r}.")
        self.transformer = transformer
        self.capture_blocks = capture_blocks if isinstance(capture_blocks, str) else list(capture_blocks)
        self._handle: CaptureProcessors | None = None
        self._layouts: dict[tuple[int, tuple[int, ...]], SequenceLayout] = {}

    def layout(self, tgt_tokens: int, ref_tokens: Sequence[int]) -> SequenceLayout:
        """The `SequenceLayout` of ``[target | ref 1 | … | ref K]``, built once per token counts (its
        small index tensors are reused by every step of that size).

        Args:
            tgt_tokens: N_tgt.
            ref_tokens: N^(k) per reference slot.

        Example:
            >>> from mosaic_kit.models.flux2 import Flux2Family
            >>> Flux2Family.tiny().model.layout(4, [2, 2]).ref_index
            tensor([[4, 5, 6, 7]])
        """
        key = (int(tgt_tokens), tuple(int(n) for n in ref_tokens))
        if key not in self._layouts:
            self._layouts[key] = SequenceLayout.concatenated(tgt_tokens, ref_tokens)
        return self._layouts[key]

    def capture_handle(self) -> CaptureProcessors:
        """The capture processors on the chosen blocks (installed on first use, idle until a
        forward gets a capture; idle, the forward is the stock one bit for bit)."""
        if self._handle is None:
            blocks: str | list[str] | Callable[[str], bool] = self.capture_blocks
            if blocks == "double":
                blocks = lambda name: name.startswith("transformer_blocks.")  # noqa: E731
            self._handle = install_capture_processors(self.transformer, blocks=blocks)
        return self._handle

    def forward(self, hidden_states: torch.Tensor, img_ids: torch.Tensor, encoder_hidden_states: torch.Tensor,
                txt_ids: torch.Tensor, timestep: torch.Tensor, tgt_tokens: int, ref_tokens: Sequence[int] = (),
                guidance: torch.Tensor | None = None, capture: Any = None) -> torch.Tensor:
        """Runs the stock forward; returns ``(B, tgt_tokens, C)``, the target's prediction.

        Args:
            hidden_states: ``(B, N_tgt + N_ref, C)`` noisy target tokens, then the references'.
            img_ids: ``(B, N_tgt + N_ref, 4)`` position ids.
            encoder_hidden_states: ``(B, L, D)`` prompt embeddings.
            txt_ids: ``(B, L, 4)`` text ids.
            timestep: ``(B,)`` flow-matching time in ``[0, 1]``.
            tgt_tokens: N_tgt.
            ref_tokens: N^(k) per reference slot.
            guidance: ``(B,)`` embedded guidance ([dev]) or None ([klein]).
            capture: a `RefTargetCapture`, a list of captures (diagnostics with the same
                ``add(query, key)``, e.g. `PointAttentionRows`, included), or None.
        """
        captures = [] if capture is None else list(capture) if isinstance(capture, (list, tuple)) else [capture]
        context = contextlib.nullcontext()
        if captures:
            if not ref_tokens:
                raise ValueError("Expected references (`ref_tokens`) for a capture, but got none.")
            layout = self.layout(tgt_tokens, ref_tokens)
            fed = captures[0] if len(captures) == 1 and isinstance(captures[0], RefTargetCapture) else _FanOut(captures)
            context = self.capture_handle().capture(fed, layout)
        with context:
            out = self.transformer(hidden_states=hidden_states, img_ids=img_ids,
                                   encoder_hidden_states=encoder_hidden_states, txt_ids=txt_ids, timestep=timestep,
                                   guidance=guidance, return_dict=False)[0]
        return out[:, :tgt_tokens]
