"""The memory options of a run's model (``model.offload_encoders``, ``model.group_offload``):
what `mosaic_kit.training.MosaicTrainer` applies once its model is prepared (see
`mosaic_kit.models.encoders` for the mechanisms and docs/guide/training.md for the trade-off)."""

from __future__ import annotations

from typing import Any

import torch

from ..models.encoders import enable_encoder_offload, enable_group_offload
from .config import ModelConfig

__all__ = ["apply_offload"]


def apply_offload(family: Any, config: ModelConfig, device: torch.device | str, processes: int = 1) -> None:
    """Keeps the encoders on the CPU between uses (``offload_encoders``) and group-offloads the
    transformer (``group_offload``, ``group_offload_blocks`` blocks per group) onto ``device``.

    Args:
        family: the run's model family.
        config: the ``model`` section.
        device: the training device.
        processes: the run's processes (group offloading needs one: its hooks move weights under DDP/FSDP).

    Raises:
        ValueError: group offloading with several processes, or a type the family refuses.
    """
    if config.offload_encoders:
        enable_encoder_offload(family, device)
    if config.group_offload is not None:
        if processes != 1:
            raise ValueError(f"Expected one training process with `model.group_offload: {config.group_offload}` (its "
                             f"hooks move weights that DDP/FSDP hold on the device), but got {processes}.")
        enable_group_offload(family, config.group_offload, config.group_offload_blocks, device)
