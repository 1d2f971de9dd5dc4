"""Training noise levels of FLUX-style flow matching, one for every family: the resolution shift
(`resolution_shift_mu`) and logit-normal sigmas (`logit_normal_sigmas`). Importable from
`mosaic_kit.models` and `mosaic_kit.models.family`."""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["logit_normal_sigmas", "resolution_shift_mu"]


def resolution_shift_mu(image_seq_len: int, scheduler_config: Any = None) -> float:
    """The resolution shift ``μ`` of FLUX-style flow matching, linear in the target's token count:
    diffusers' ``calculate_shift`` with the scheduler's ``base_image_seq_len``,
    ``max_image_seq_len``, ``base_shift`` and ``max_shift`` (defaults 256, 4096, 0.5, 1.15: FLUX's).
    The one place the shift is computed (training noise levels and the samplers).

    Args:
        image_seq_len: target tokens.
        scheduler_config: a scheduler's config (a mapping), or None for the defaults.

    Returns:
        ``μ``.

    Example:
        >>> round(resolution_shift_mu(256), 3), round(resolution_shift_mu(4096), 3)
        (0.5, 1.15)
    """
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    config = scheduler_config or {}
    return float(calculate_shift(image_seq_len, config.get("base_image_seq_len", 256),
                                 config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                 config.get("max_shift", 1.15)))


def logit_normal_sigmas(
    batch: int, generator: torch.Generator, mu: float | None = None, mean: float = 0.0, std: float = 1.0
) -> torch.Tensor:
    """Flow-matching noise levels: ``u = sigmoid(N(mean, std))`` drawn with diffusers'
    ``compute_density_for_timestep_sampling("logit_normal", ...)``, then the exponential time
    shift ``σ = e^μ / (e^μ + 1/u - 1)`` (FLUX's resolution shift; ``mu=None``: no shift).

    Args:
        batch: how many.
        generator: a CPU generator (advanced by ``batch`` normal draws).
        mu: the shift (diffusers' ``calculate_shift`` for FLUX.1), or None.
        mean: logit-normal mean.
        std: logit-normal std.

    Returns:
        ``(batch,)`` float32 sigmas in ``(0, 1)``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> s = logit_normal_sigmas(1000, g, mu=0.7)
        >>> bool(((s > 0) & (s < 1)).all()), s.mean().item() > 0.5  # shifted towards noise
        (True, True)
    """
    import math

    from diffusers.training_utils import compute_density_for_timestep_sampling

    u = compute_density_for_timestep_sampling("logit_normal", batch, logit_mean=mean, logit_std=std,
                                              generator=generator)
    if mu is None:
        return u
    return math.exp(mu) / (math.exp(mu) + (1 / u - 1))
