"""A pixel-space stand-in for the VAE: lossless pixel (un)shuffling, for CPU-sized experiments."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class _LatentDistribution:
    latents: torch.Tensor

    def mode(self) -> torch.Tensor:
        return self.latents

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.latents


@dataclass
class _EncoderOutput:
    latent_dist: _LatentDistribution


class PixelAutoencoder(nn.Module):
    """Pixel space behind the interface the FLUX pipeline and trainer use of ``AutoencoderKL``.

    ``encode`` folds each ``factor × factor`` pixel block into channels (`pixel_unshuffle`), so
    "latents" are the pixels themselves, ``3·factor²`` channels at ``1/factor`` resolution, and
    ``decode`` unfolds them exactly. With FLUX's 2×2 token packing one token covers
    ``2·factor`` pixels. No weights, nothing learned: the model sees real pixels, which keeps
    tiny experiments honest (a random VAE would scramble the subjects).

    Args:
        factor: pixels per latent cell along each side (the pipeline's ``vae_scale_factor``).

    Example:
        >>> ae = PixelAutoencoder(factor=2)
        >>> x = torch.rand(1, 3, 16, 16) * 2 - 1
        >>> z = ae.encode(x).latent_dist.mode()
        >>> z.shape, torch.equal(ae.decode(z, return_dict=False)[0], x)
        (torch.Size([1, 12, 8, 8]), True)
    """

    def __init__(self, factor: int = 2) -> None:
        super().__init__()
        if not isinstance(factor, int) or factor < 1 or factor & (factor - 1):
            raise ValueError(f"Expected `factor` to be a power of two >= 1, but got {factor!r}.")
        self.factor = factor
        levels = factor.bit_length()  # the pipeline reads 2 ** (len(block_out_channels) - 1)
        self.config = SimpleNamespace(
            latent_channels=3 * factor * factor, scaling_factor=1.0, shift_factor=0.0,
            block_out_channels=[1] * levels, force_upcast=False,
        )
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype latents are produced in."""
        return self._anchor.dtype

    @property
    def device(self) -> torch.device:
        """Where the module lives."""
        return self._anchor.device

    def encode(self, images: torch.Tensor, return_dict: bool = True):
        """``(B, 3, H, W)`` in ``[-1, 1]`` → latents ``(B, 3·f², H/f, W/f)``."""
        latents = F.pixel_unshuffle(images.to(self.dtype), self.factor)
        out = _EncoderOutput(_LatentDistribution(latents))
        return out if return_dict else (out.latent_dist,)

    def decode(self, latents: torch.Tensor, return_dict: bool = True):
        """Latents → ``(B, 3, H, W)`` images."""
        images = F.pixel_shuffle(latents, self.factor)
        return SimpleNamespace(sample=images) if return_dict else (images,)
