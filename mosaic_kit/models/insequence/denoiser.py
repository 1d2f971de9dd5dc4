"""The denoiser of an in-sequence family (what the trainer wraps): the stock transformer with the
capture processors on the chosen blocks, fed during a forward with the batch's `SequenceLayout`."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ...attention import RefTargetCapture
from .install import CaptureProcessors, install_capture_processors
from .layout import SequenceLayout

__all__ = ["InSequenceDenoiser"]

CAPTURE_BLOCK_CHOICES = ("all", "double")
"""``capture_blocks`` names: every attention block, or the double-stream (``transformer_blocks.*``) ones."""


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


class InSequenceDenoiser(nn.Module):
    """A stock diffusers transformer whose image stream holds the target and the references,
    as one module: its forward returns the target's prediction and feeds MOSAIC's captures
    through the in-sequence capture processors (`install_capture_processors`).

    Args:
        transformer: the stock transformer (its LoRA included).
        capture_blocks: ``"all"``, ``"double"`` (blocks named ``transformer_blocks.*``) or a list
            of block names.

    Raises:
        ValueError: an unknown ``capture_blocks`` name.

    Example:
        >>> from diffusers import FluxTransformer2DModel
        >>> from mosaic_kit.models.flux.tiny import TINY_TRANSFORMER_CONFIG
        >>> model = InSequenceDenoiser(FluxTransformer2DModel(**TINY_TRANSFORMER_CONFIG), "double")
        >>> model.capture_handle().block_names
        ('transformer_blocks.0', 'transformer_blocks.1')
    """

    def __init__(self, transformer: nn.Module, capture_blocks: str | Sequence[str] = "all") -> None:
        super().__init__()
        if isinstance(capture_blocks, str) and capture_blocks not in CAPTURE_BLOCK_CHOICES:
            raise ValueError(f"Expected `capture_blocks` 'all', 'double' or a list of block names, but got {capture_blocks!r}.")
        self.transformer = transformer
        self.capture_blocks = capture_blocks if isinstance(capture_blocks, str) else list(capture_blocks)
        self._handle: CaptureProcessors | None = None

    def capture_handle(self) -> CaptureProcessors:
        """The capture processors on the chosen blocks (installed on first use, idle until a
        forward gets a capture; idle, the forward is the stock one bit for bit)."""
        if self._handle is None:
            blocks: str | list[str] | Callable[[str], bool] = self.capture_blocks
            if blocks == "double":
                blocks = lambda name: name.startswith("transformer_blocks.")  # noqa: E731
            self._handle = install_capture_processors(self.transformer, blocks=blocks)
        return self._handle

    def forward(self, sequence_layout: SequenceLayout | None = None, capture: Any = None,
                **transformer_kwargs: Any) -> torch.Tensor:
        """Runs the stock forward; returns the target's prediction ``(B, N_tgt, C)``.

        Args:
            sequence_layout: where the target and each reference sit in ``hidden_states`` (from
                the family's encoding), or None without references (the whole output is the target's).
            capture: a `RefTargetCapture`, a list of captures (diagnostics with the same
                ``add(query, key)``, e.g. `PointAttentionRows`, included), or None.
            **transformer_kwargs: the stock transformer's keyword arguments (``return_dict`` excluded).

        Raises:
            ValueError: a capture without references, or a layout that does not fit the capture.
        """
        captures = [] if capture is None else list(capture) if isinstance(capture, (list, tuple)) else [capture]
        context = contextlib.nullcontext()
        if captures:
            if sequence_layout is None:
                raise ValueError("Expected references (a `sequence_layout`) for a capture, but got none.")
            fed = captures[0] if len(captures) == 1 and isinstance(captures[0], RefTargetCapture) else _FanOut(captures)
            context = self.capture_handle().capture(fed, sequence_layout)
        with context:
            out = self.transformer(**transformer_kwargs, return_dict=False)[0]
        if sequence_layout is None:
            return out
        index = sequence_layout.target_index
        if sequence_layout.target_start is not None:  # e.g. the stock pipelines' cut: the target comes first
            return out.narrow(1, sequence_layout.target_start, index.shape[1])
        index = index.to(out.device)
        if sequence_layout.shared:
            return out.index_select(1, index[0])
        return out.gather(1, index[..., None].expand(-1, -1, out.shape[-1]))
