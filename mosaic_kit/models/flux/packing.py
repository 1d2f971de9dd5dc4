"""Packing and position ids of FLUX.1 tokens (pure torch: no diffusers or peft).

- `pack_latents`, `unpack_latents`: VAE latents ↔ 2×2-packed tokens, row-major.
- `latent_image_ids`, `reference_position_ids`: FLUX position ids of the target and of K
  references (shifted left along the width axis, as released).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """Packs VAE latents 2×2 into FLUX tokens, row-major (as diffusers' FLUX pipeline does).

    Args:
        latents: ``(B, C, h, w)`` with even ``h`` and ``w``.

    Returns:
        ``(B, h/2 · w/2, 4C)`` tokens; token ``r · w/2 + c`` holds the 2×2 patch at ``(r, c)``.

    Example:
        >>> latents = torch.randn(2, 16, 8, 6)
        >>> pack_latents(latents).shape
        torch.Size([2, 12, 64])
        >>> torch.equal(unpack_latents(pack_latents(latents), 8, 6), latents)
        True
    """
    if latents.ndim != 4 or latents.shape[2] % 2 or latents.shape[3] % 2:
        raise ValueError(f"Expected `latents` of shape (B, C, h, w) with even h and w, but got {tuple(latents.shape)}.")
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of `pack_latents`.

    Args:
        tokens: ``(B, height/2 · width/2, 4C)``.
        height: latent height ``h`` (even).
        width: latent width ``w`` (even).

    Returns:
        ``(B, C, h, w)`` latents.

    Example:
        >>> unpack_latents(torch.randn(1, 4, 64), 4, 4).shape
        torch.Size([1, 16, 4, 4])
    """
    b, n, d = tokens.shape
    if height % 2 or width % 2 or n != (height // 2) * (width // 2) or d % 4:
        raise ValueError(
            f"Expected `tokens` of shape (B, {height // 2}·{width // 2}, 4C) for a {height}×{width} latent, "
            f"but got {tuple(tokens.shape)}."
        )
    c = d // 4
    return tokens.view(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, height, width)


def latent_image_ids(
    token_rows: int, token_cols: int, col_shift: int = 0, device: torch.device | str | None = None
) -> torch.Tensor:
    """FLUX position ids of a packed token grid: ``(0, row, col + col_shift)`` per token, row-major.

    Args:
        token_rows: rows of packed tokens (image height / 16).
        token_cols: columns of packed tokens (image width / 16).
        col_shift: added to the column id (references are shifted left, see
            `reference_position_ids`).
        device: device of the result.

    Returns:
        ``(token_rows · token_cols, 3)`` float ids.

    Example:
        >>> latent_image_ids(2, 3, col_shift=-3)[:, 1:].tolist()
        [[0.0, -3.0], [0.0, -2.0], [0.0, -1.0], [1.0, -3.0], [1.0, -2.0], [1.0, -1.0]]
    """
    rows = torch.arange(token_rows, device=device, dtype=torch.float32)
    cols = torch.arange(token_cols, device=device, dtype=torch.float32) + col_shift
    ids = torch.zeros(token_rows, token_cols, 3, device=device)
    ids[..., 1] = rows[:, None]
    ids[..., 2] = cols[None, :]
    return ids.view(-1, 3)


def reference_position_ids(
    reference_sizes: Sequence[tuple[int, int]],
    ref_size: int | None = None,
    device: torch.device | str | None = None,
    pixels_per_token: int = 16,
) -> torch.Tensor:
    """Position ids of K references, as released: reference k's plain grid ids shifted along the
    width axis by ``-(ref_size // 16) · (k + 1)``.

    Args:
        reference_sizes: ``(height, width)`` in pixels of each reference (multiples of
            ``pixels_per_token``).
        ref_size: the shift unit in pixels; default: the first reference's width (the released
            code uses its square reference size, 512).
        device: device of the result.
        pixels_per_token: pixels per packed token side (16 for FLUX: 8× VAE, 2×2 packing).

    Returns:
        ``(N_ref, 3)`` float ids of the references concatenated in slot order.

    Example:
        >>> ids = reference_position_ids([(32, 32), (32, 32)])
        >>> ids.shape, ids[:, 2].min().item(), ids[:, 2].max().item()
        (torch.Size([8, 3]), -4.0, -1.0)
    """
    if not reference_sizes:
        raise ValueError("Expected at least one reference size, but got none.")
    if not isinstance(pixels_per_token, int) or pixels_per_token < 1:
        raise ValueError(f"Expected `pixels_per_token` to be a positive int, but got {pixels_per_token!r}.")
    unit_px = pixels_per_token
    sizes = [_check_image_size(f"reference_sizes[{k}]", s, unit_px) for k, s in enumerate(reference_sizes)]
    unit = sizes[0][1] if ref_size is None else ref_size
    if not isinstance(unit, int) or unit <= 0 or unit % unit_px:
        raise ValueError(f"Expected `ref_size` to be a positive multiple of {unit_px}, but got {unit!r}.")
    ids = [
        latent_image_ids(h // unit_px, w // unit_px, -(unit // unit_px) * (k + 1), device)
        for k, (h, w) in enumerate(sizes)
    ]
    return torch.cat(ids)


def _check_image_size(name: str, size: Any, multiple: int = 16) -> tuple[int, int]:
    ok = isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)
    if not ok or size[0] % multiple or size[1] % multiple:
        raise ValueError(
            f"Expected `{name}` to be (height, width) in pixels, multiples of {multiple}, but got {size!r}."
        )
    return int(size[0]), int(size[1])

