"""What an encoded batch is, whatever the family: `TokenLayout` (where the target's and each
reference's tokens are) and `ModelInputs` (what `mosaic_kit.models.ModelFamily.encode_batch`
returns). Importable from `mosaic_kit.models` and `mosaic_kit.models.family`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..correspondence.grid import TokenGrid

__all__ = ["ModelInputs", "TokenLayout"]


@dataclass(frozen=True)
class TokenLayout:
    """Where the target's and each reference's tokens are, for correspondences and the capture.

    Attributes:
        target_grid: the target's packed token grid (``N_tgt = target_grid.num_tokens``).
        reference_grids: one grid per reference, in slot order.

    Properties give each reference's token count and its range inside the concatenated
    reference tokens (the order a `mosaic_kit.attention.RefTargetCapture` sees them).

    Example:
        >>> layout = TokenLayout(TokenGrid(32, 48), (TokenGrid(32, 32), TokenGrid(16, 32)))
        >>> layout.reference_token_counts, layout.reference_ranges
        ((4, 2), (range(0, 4), range(4, 6)))
        >>> layout.num_reference_tokens, layout.target_grid.num_tokens
        (6, 6)
    """

    target_grid: TokenGrid
    reference_grids: tuple[TokenGrid, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.target_grid, TokenGrid):
            raise ValueError(f"Expected `target_grid` to be a TokenGrid, but got {type(self.target_grid).__name__}.")
        grids = tuple(self.reference_grids)
        bad = [k for k, g in enumerate(grids) if not isinstance(g, TokenGrid)]
        if bad:
            raise ValueError(
                f"Expected `reference_grids` to hold TokenGrids, but item {bad[0]} is "
                f"{type(grids[bad[0]]).__name__}."
            )
        object.__setattr__(self, "reference_grids", grids)

    @property
    def reference_token_counts(self) -> tuple[int, ...]:
        """Tokens of each reference (``N^(k)``)."""
        return tuple(g.num_tokens for g in self.reference_grids)

    @property
    def num_reference_tokens(self) -> int:
        """``N_ref = Σ N^(k)``."""
        return sum(self.reference_token_counts)

    @property
    def reference_ranges(self) -> tuple[range, ...]:
        """Each reference's token indices inside the concatenated reference tokens."""
        ranges, start = [], 0
        for count in self.reference_token_counts:
            ranges.append(range(start, start + count))
            start += count
        return tuple(ranges)


@dataclass
class ModelInputs:
    """What `ModelFamily.encode_batch` returns: the encoded batch, ready for the forward.

    Attributes:
        conditioning: the family's keyword arguments of the forward other than the noisy target,
            the timestep, the guidance and the capture (text embeddings, position ids, reference
            tokens, ...), already in the model's dtype and on its device. Opaque to the callers.
        layout: the token layout of target and references.
        target: ``(B, N_tgt, C)`` the clean packed target latents in float32 (the flow-matching
            target), or None when encoding for inference (no target image).
        extras: anything else a family wants to carry (not read by the callers).
        batch_size: ``B``, the samples encoded (what the forward's noisy latents and timesteps
            must have); None: the target's batch (or unknown without a target).

    Example:
        >>> inputs = ModelInputs({"text_ids": torch.zeros(4, 3)}, TokenLayout(TokenGrid(32, 32)))
        >>> inputs.target is None, inputs.layout.target_grid.num_tokens, inputs.batch_size
        (True, 4, None)
    """

    conditioning: dict[str, Any]
    layout: TokenLayout
    target: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    batch_size: int | None = None

    def __post_init__(self) -> None:
        if self.batch_size is None and isinstance(self.target, torch.Tensor):
            self.batch_size = int(self.target.shape[0])
