"""A model family's frozen encoders (text encoders, tokenizers, VAE: its
`ModelFamily.encoder_components`): left out when the conditioning is cached, kept on the CPU
between uses when offloaded, and diffusers' group offloading of the transformer.

- `encoder_loading_kwargs`: what ``from_pretrained`` passes to the pipeline so that it never
  loads (nor constructs) the encoders;
- `drop_encoders`: removes them from a built family (a tiny random family, whose random weights are
  drawn in one stream, is built whole and then dropped);
- `enable_encoder_offload` / `encoders_in_use`: the encoder modules live on the CPU and move onto
  the training device only while ``family.encode_batch`` or ``family.decode`` runs;
- `enable_group_offload`: diffusers' ``apply_group_offloading`` on the transformer.

Example:
    >>> from mosaic_kit.models import Flux2Family
    >>> family = drop_encoders(Flux2Family.tiny())
    >>> family.has_encoders, family.pipe.vae is None
    (False, True)
    >>> encoder_loading_kwargs(Flux2Family, encoders=False)
    {'text_encoder': None, 'tokenizer': None, 'vae': None}
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

__all__ = ["GROUP_OFFLOAD", "drop_encoders", "enable_encoder_offload", "enable_group_offload", "encoder_loading_kwargs",
           "encoder_modules", "encoders_in_use"]

GROUP_OFFLOAD = ("block_level", "leaf_level")
"""diffusers' group-offloading types (``model.group_offload``)."""


def encoder_loading_kwargs(family_class: type, encoders: bool) -> dict[str, None]:
    """``{component: None}`` for each of the family's `encoder_components` when ``encoders`` is
    False (diffusers' ``from_pretrained`` then neither loads nor constructs them), else ``{}``.

    Raises:
        ValueError: ``encoders`` is not a bool.
    """
    if not isinstance(encoders, bool):
        raise ValueError(f"Expected `encoders` to be true or false, but got {encoders!r}.")
    return {} if encoders else {name: None for name in family_class.encoder_components}


def drop_encoders(family: Any) -> Any:
    """Removes the family's `encoder_components` from its pipeline (they are set to None); returns
    the family, whose ``has_encoders`` is then False."""
    for name in family.encoder_components:
        if getattr(family.pipe, name, None) is not None:
            setattr(family.pipe, name, None)
    return family


def encoder_modules(family: Any) -> list[nn.Module]:
    """The family's encoder components that are modules (text encoders and VAE; not tokenizers)."""
    modules = (getattr(family.pipe, name, None) for name in family.encoder_components)
    return [module for module in modules if isinstance(module, nn.Module)]


def enable_encoder_offload(family: Any, device: torch.device | str) -> None:
    """Keeps the family's encoder modules on the CPU; `encoders_in_use` (which
    ``family.encode_batch`` and ``family.decode`` enter) moves them onto ``device`` and back.
    ``family.device`` is ``device`` from then on.

    Raises:
        ValueError: the family has no encoders (cached conditioning needs no offload).
    """
    if not family.has_encoders:
        raise ValueError("Expected a family with its encoders to offload them, but it was built without them "
                         "(data.cache_dir: the conditioning is cached, nothing to offload).")
    family._offload_device = torch.device(device)
    for module in encoder_modules(family):
        module.to("cpu")


@contextlib.contextmanager
def encoders_in_use(family: Any) -> Iterator[None]:
    """While inside: the offloaded encoder modules on the family's device (nothing happens without
    `enable_encoder_offload`); back on the CPU after."""
    device = getattr(family, "_offload_device", None)
    if device is None:
        yield
        return
    modules = encoder_modules(family)
    for module in modules:
        module.to(device)
    try:
        yield
    finally:
        for module in modules:
            module.to("cpu")


def enable_group_offload(family: Any, offload_type: str, num_blocks_per_group: int, device: torch.device | str) -> None:
    """diffusers' group offloading (``diffusers.hooks.apply_group_offloading``) of the family's
    transformer: groups of blocks (``"block_level"``, ``num_blocks_per_group`` blocks each) or every
    leaf module (``"leaf_level"``) wait on the CPU and move onto ``device`` for their forward.

    Raises:
        ValueError: an unknown ``offload_type``, a type the family refuses (its
            ``group_offload_types``), or a bad ``num_blocks_per_group``.
    """
    from diffusers.hooks import apply_group_offloading

    if offload_type not in GROUP_OFFLOAD:
        raise ValueError(f"Expected `model.group_offload` in {GROUP_OFFLOAD} or null, but got {offload_type!r}.")
    allowed = family.group_offload_types
    if offload_type not in allowed:
        raise ValueError(f"Expected `model.group_offload` in {allowed} for the {family.name} family, but got "
                         f"{offload_type!r}: {family.group_offload_reason}")
    if isinstance(num_blocks_per_group, bool) or not isinstance(num_blocks_per_group, int) or num_blocks_per_group < 1:
        raise ValueError(f"Expected `model.group_offload_blocks` to be a positive int, but got {num_blocks_per_group!r}.")
    apply_group_offloading(family.transformer, onload_device=torch.device(device), offload_device=torch.device("cpu"),
                           offload_type=offload_type,
                           num_blocks_per_group=num_blocks_per_group if offload_type == "block_level" else None)
