"""Tiny random FLUX transformers and inputs, for tests, doctests and CPU demos (no downloads)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .flux import FluxTransformer2DModel, latent_image_ids, reference_position_ids

TINY_TRANSFORMER_CONFIG = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 2,
    "num_single_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "pooled_projection_dim": 32,
    "guidance_embeds": True,
    "axes_dims_rope": (4, 6, 6),
}
"""A FLUX-architecture transformer with 2 double and 2 single blocks, 2 heads of 16 dims, 16
latent channels (64 packed) and 32-dim text embeddings."""


def tiny_flux_transformer(seed: int = 0, **overrides: object) -> FluxTransformer2DModel:
    """A randomly initialised tiny `FluxTransformer2DModel` (`TINY_TRANSFORMER_CONFIG`).

    Args:
        seed: initialisation seed.
        **overrides: config entries to change.

    Example:
        >>> tiny_flux_transformer(num_layers=1).config.num_layers
        1
    """
    config = {**TINY_TRANSFORMER_CONFIG, **overrides}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return FluxTransformer2DModel(**config).eval()


def random_packed_inputs(
    transformer: FluxTransformer2DModel,
    batch: int = 1,
    target_size: tuple[int, int] = (32, 32),
    reference_sizes: Sequence[tuple[int, int]] = (),
    text_tokens: int = 5,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> dict:
    """Random packed inputs for `MosaicFluxTransformer.forward` at the given pixel sizes.

    Args:
        transformer: gives the channel counts.
        batch: B.
        target_size: ``(H, W)`` of the target image in pixels (multiples of 16).
        reference_sizes: ``(H, W)`` of each reference (none: no references).
        text_tokens: N_txt.
        seed: generator seed.
        dtype: tensor dtype.

    Returns:
        Keyword arguments for the forward.

    Example:
        >>> inputs = random_packed_inputs(tiny_flux_transformer(), reference_sizes=[(32, 32)])
        >>> inputs["reference_tokens"].shape, inputs["reference_token_counts"]
        (torch.Size([1, 4, 64]), (4,))
    """
    config = transformer.config
    gen = torch.Generator().manual_seed(seed)
    h, w = target_size
    n_tgt = (h // 16) * (w // 16)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    inputs = {
        "target_tokens": rand(batch, n_tgt, config.in_channels),
        "text_embeddings": rand(batch, text_tokens, config.joint_attention_dim),
        "pooled_embeddings": rand(batch, config.pooled_projection_dim),
        "timestep": torch.rand(batch, generator=gen).to(dtype),
        "target_ids": latent_image_ids(h // 16, w // 16),
        "text_ids": torch.zeros(text_tokens, 3),
        "guidance": torch.full((batch,), 3.5, dtype=dtype) if config.guidance_embeds else None,
    }
    if reference_sizes:
        counts = tuple((rh // 16) * (rw // 16) for rh, rw in reference_sizes)
        inputs["reference_tokens"] = rand(batch, sum(counts), config.in_channels)
        inputs["reference_ids"] = reference_position_ids(list(reference_sizes))
        inputs["reference_token_counts"] = counts
    return inputs
