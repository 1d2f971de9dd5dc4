"""Flow-matching noise levels: diffusers' logit-normal density and FLUX's resolution shift."""

from __future__ import annotations


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
    """Flow-matching noise levels for ``image_seq_len`` FLUX.1 target tokens (None: no shift):
    `mosaic_kit.models.logit_normal_sigmas` (diffusers' logit-normal density, then the shift
    ``σ = e^μ / (e^μ + 1/u - 1)``) with ``μ = flux_shift_mu(image_seq_len)``. The trainer draws
    through its model family (`mosaic_kit.models.ModelFamily.sample_sigmas`), the same numbers.

    Args:
        batch: how many sigmas.
        generator: the random generator (CPU).
        image_seq_len: the number of target tokens, which sets ``μ`` (None: no shift).
        mean: the logit-normal mean, as in `mosaic_kit.models.logit_normal_sigmas`.
        std: the logit-normal standard deviation.

    Returns:
        ``(batch,)`` float32 sigmas in ``(0, 1)``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> sigmas = sample_sigmas(1000, g, 1024)
        >>> bool(((sigmas > 0) & (sigmas < 1)).all()), sigmas.mean().item() > 0.5  # shifted towards noise
        (True, True)
    """
    from ..models import logit_normal_sigmas

    return logit_normal_sigmas(batch, generator, None if image_seq_len is None else flux_shift_mu(image_seq_len),
                               mean, std)
