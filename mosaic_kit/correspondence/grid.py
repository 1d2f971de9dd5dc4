"""Token grids of packed latents: pixel ↔ latent ↔ token index.

A FLUX-style DiT encodes an image of ``height × width`` pixels with a VAE that downsamples by
``vae_scale_factor`` (8 for FLUX) and then packs ``patch_size × patch_size`` latent cells (2×2)
into one token. Tokens are numbered row-major over the packed grid:
``index = row * cols + col``.

Conventions: points are ``(x, y)`` (column first, as in kornia), in pixels of the image or in
latent cells; ``(row, col)`` pairs are named as such.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..utils.checks import check_int, check_int_pair

__all__ = ["TokenGrid"]


def _as_points(name: str, xy: torch.Tensor) -> torch.Tensor:
    if not isinstance(xy, torch.Tensor):
        xy = torch.as_tensor(xy)
    if xy.ndim == 0 or xy.shape[-1] != 2:
        raise ValueError(f"Expected `{name}` of shape (..., 2) holding (x, y), but got {tuple(xy.shape)}.")
    return xy


def _check_index_range(name: str, index: torch.Tensor, size: int) -> None:
    if index.is_floating_point() or index.dtype == torch.bool:
        raise ValueError(f"Expected `{name}` to hold integers, but got dtype {index.dtype}.")
    if index.numel() and (bool((index < 0).any()) or bool((index >= size).any())):
        bad = index[(index < 0) | (index >= size)].flatten()[:5].tolist()
        raise ValueError(f"Expected `{name}` in [0, {size}), but got values {bad}.")


@dataclass(frozen=True)
class TokenGrid:
    """The packed token grid of one image size.

    Args:
        height: image height in pixels, a multiple of ``vae_scale_factor * patch_size``.
        width: image width in pixels, a multiple of ``vae_scale_factor * patch_size``.
        vae_scale_factor: pixels per latent cell (8 for FLUX).
        patch_size: latent cells per token side (2 for FLUX).

    Example:
        >>> grid = TokenGrid(512, 768)
        >>> grid.rows, grid.cols, grid.num_tokens
        (32, 48, 1536)
        >>> grid.pixel_to_token(torch.tensor([[20.0, 40.0]]))  # x=20 → col 1, y=40 → row 2
        tensor([97])
        >>> grid.token_to_pixel(torch.tensor([97]))  # centre of that token's 16×16 pixel patch
        tensor([[24., 40.]])
    """

    height: int
    width: int
    vae_scale_factor: int = 8
    patch_size: int = 2

    def __post_init__(self) -> None:
        for name in ("height", "width", "vae_scale_factor", "patch_size"):
            object.__setattr__(self, name, check_int(name, getattr(self, name), minimum=1))
        for name in ("height", "width"):
            value = getattr(self, name)
            if value % self.token_size:
                raise ValueError(
                    f"Expected `{name}` to be a multiple of vae_scale_factor * patch_size = {self.token_size}, "
                    f"but got {value}."
                )

    @property
    def token_size(self) -> int:
        """Pixels per token side (``vae_scale_factor * patch_size``, 16 for FLUX)."""
        return self.vae_scale_factor * self.patch_size

    @property
    def latent_height(self) -> int:
        """Latent cells along the height."""
        return self.height // self.vae_scale_factor

    @property
    def latent_width(self) -> int:
        """Latent cells along the width."""
        return self.width // self.vae_scale_factor

    @property
    def rows(self) -> int:
        """Token rows."""
        return self.height // self.token_size

    @property
    def cols(self) -> int:
        """Token columns."""
        return self.width // self.token_size

    @property
    def num_tokens(self) -> int:
        """Tokens in the grid (``rows * cols``)."""
        return self.rows * self.cols

    # -- token index ↔ (row, col) ---------------------------------------------------------------
    def rowcol_to_token(self, rowcol: torch.Tensor) -> torch.Tensor:
        """Token indices of ``(..., 2)`` integer ``(row, col)`` pairs; returns ``(...)`` long."""
        rowcol = torch.as_tensor(rowcol)
        if rowcol.ndim == 0 or rowcol.shape[-1] != 2:
            raise ValueError(f"Expected `rowcol` of shape (..., 2), but got {tuple(rowcol.shape)}.")
        _check_index_range("rowcol[..., 0] (row)", rowcol[..., 0], self.rows)
        _check_index_range("rowcol[..., 1] (col)", rowcol[..., 1], self.cols)
        return rowcol[..., 0].long() * self.cols + rowcol[..., 1].long()

    def token_to_rowcol(self, index: torch.Tensor) -> torch.Tensor:
        """``(..., 2)`` long ``(row, col)`` of token indices ``(...)``."""
        index = torch.as_tensor(index)
        _check_index_range("index", index, self.num_tokens)
        index = index.long()
        return torch.stack((index // self.cols, index % self.cols), dim=-1)

    # -- pixels -----------------------------------------------------------------------------------
    def pixel_to_token(self, xy: torch.Tensor, image_size: tuple[int, int] | None = None) -> torch.Tensor:
        """Token indices of pixel points.

        Args:
            xy: ``(..., 2)`` float ``(x, y)`` pixel coordinates, with ``0 <= x < W`` and
                ``0 <= y < H`` of the frame they are given in.
            image_size: ``(H, W)`` of the frame ``xy`` is given in, when it is not this grid's
                (for example a 64×64 feature grid or the original photo); points are rescaled to
                this grid first.

        Returns:
            ``(...)`` long token indices.
        """
        xy = _as_points("xy", xy).to(torch.float64)
        frame_h, frame_w = (self.height, self.width) if image_size is None else check_int_pair("image_size", image_size)
        x, y = xy[..., 0], xy[..., 1]
        outside = ~((x >= 0) & (x < frame_w) & (y >= 0) & (y < frame_h))
        if bool(outside.any()):
            bad = xy[outside][:3].tolist()
            raise ValueError(
                f"Expected `xy` inside the image of size (H, W) = ({frame_h}, {frame_w}), "
                f"i.e. 0 <= x < {frame_w} and 0 <= y < {frame_h}, but got points {bad}."
            )
        col = torch.div(x * (self.width / frame_w), self.token_size, rounding_mode="floor").long()
        row = torch.div(y * (self.height / frame_h), self.token_size, rounding_mode="floor").long()
        # Rescaling can land exactly on the far border in floating point; keep it in the last token.
        col = col.clamp_max(self.cols - 1)
        row = row.clamp_max(self.rows - 1)
        return row * self.cols + col

    def token_to_pixel(self, index: torch.Tensor) -> torch.Tensor:
        """``(..., 2)`` float ``(x, y)`` pixel centres of token indices ``(...)``."""
        rowcol = self.token_to_rowcol(index).to(torch.float32)
        return (rowcol.flip(-1) + 0.5) * self.token_size

    # -- latent cells -----------------------------------------------------------------------------
    def latent_to_token(self, xy: torch.Tensor) -> torch.Tensor:
        """Token indices of integer latent cells ``(..., 2)`` given as ``(x, y)``."""
        xy = _as_points("xy", xy)
        _check_index_range("xy[..., 0] (latent x)", xy[..., 0], self.latent_width)
        _check_index_range("xy[..., 1] (latent y)", xy[..., 1], self.latent_height)
        xy = xy.long()
        return (xy[..., 1] // self.patch_size) * self.cols + xy[..., 0] // self.patch_size

    def token_to_latent(self, index: torch.Tensor) -> torch.Tensor:
        """``(..., 2)`` long ``(x, y)`` of the top-left latent cell packed into each token."""
        return self.token_to_rowcol(index).flip(-1) * self.patch_size

    def pixel_to_latent(self, xy: torch.Tensor) -> torch.Tensor:
        """``(..., 2)`` long ``(x, y)`` latent cells holding pixel points ``(..., 2)`` of this grid.

        Example:
            >>> TokenGrid(64, 64).pixel_to_latent(torch.tensor([[17.5, 8.0]]))
            tensor([[2, 1]])
        """
        xy = _as_points("xy", xy).to(torch.float64)
        inside = (xy[..., 0] >= 0) & (xy[..., 0] < self.width) & (xy[..., 1] >= 0) & (xy[..., 1] < self.height)
        if not bool(inside.all()):
            raise ValueError(
                f"Expected `xy` inside the image of size (H, W) = ({self.height}, {self.width}), "
                f"but got points {xy[~inside][:3].tolist()}."
            )
        return torch.div(xy, self.vae_scale_factor, rounding_mode="floor").long()

    def latent_to_pixel(self, xy: torch.Tensor) -> torch.Tensor:
        """``(..., 2)`` float ``(x, y)`` pixel centres of integer latent cells ``(..., 2)``."""
        xy = _as_points("xy", xy)
        _check_index_range("xy[..., 0] (latent x)", xy[..., 0], self.latent_width)
        _check_index_range("xy[..., 1] (latent y)", xy[..., 1], self.latent_height)
        return (xy.to(torch.float32) + 0.5) * self.vae_scale_factor
