"""Flow-matching noise levels: diffusers' logit-normal density and FLUX's resolution shift."""

from __future__ import annotations

import math

import torch


def flux_shift_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                  base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """FLUX's resolution-dependent shift ``μ`` (linear in the number of image tokens): diffusers'
    ``calculate_shift`` with FLUX.1's defaults.

    Example:
        >>> round(flux_shift_mu(256), 3), round(flux_shift_mu(4096), 3)
        (0.5, 1.15)
    """
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    return calculate_shift(image_seq_len, base_seq_len, max_seq_len, base_shift, max_shift)


def sample_sigmas(batch: int, generator: torch.Generator, image_seq_len: int | None, mean: float = 0.0,
                  std: float = 1.0) -> torch.Tensor:
    """Flow-matching noise levels: ``u = sigmoid(N(mean, std))`` (logit-normal, diffusers'
    ``compute_density_for_timestep_sampling``), then FLUX's shift ``σ = e^μ / (e^μ + 1/u - 1)``
    for ``image_seq_len`` target tokens (None: no shift).

    Args:
        batch: how many.
        generator: a CPU generator (advanced by ``batch`` normal draws).
        image_seq_len: target tokens, for the shift.
        mean: logit-normal mean.
        std: logit-normal std.

    Returns:
        ``(batch,)`` float32 sigmas in ``(0, 1)``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> s = sample_sigmas(1000, g, 1024)
        >>> bool(((s > 0) & (s < 1)).all()), s.mean().item() > 0.5  # shifted towards noise
        (True, True)
    """
    from diffusers.training_utils import compute_density_for_timestep_sampling

    u = compute_density_for_timestep_sampling("logit_normal", batch, logit_mean=mean, logit_std=std,
                                              generator=generator)
    if image_seq_len is None:
        return u
    mu = flux_shift_mu(image_seq_len)
    return math.exp(mu) / (math.exp(mu) + (1 / u - 1))
