"""Training the reference LoRA with the MOSAIC objective (needs the ``flux`` extra).

- `TrainConfig` (and its sections), `load_config`: YAML configs with ``dotted.key=value``
  overrides, validated.
- `MosaicTrainer`: the accelerate training loop with exact resume.
- `sample_sigmas`, `flux_shift_mu`: flow-matching timesteps (logit-normal, resolution shift).
"""

from .config import (
    DATA_KINDS,
    LR_SCHEDULES,
    MIXED_PRECISION,
    DataConfig,
    ModelConfig,
    ObjectiveConfig,
    OptimConfig,
    TrainConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_config,
)
from .trainer import (
    MosaicTrainer,
    build_dataset,
    flux_shift_mu,
    plot_loss_curves,
    sample_sigmas,
)

__all__ = [
    "DATA_KINDS",
    "LR_SCHEDULES",
    "MIXED_PRECISION",
    "DataConfig",
    "ModelConfig",
    "MosaicTrainer",
    "ObjectiveConfig",
    "OptimConfig",
    "TrainConfig",
    "apply_overrides",
    "build_dataset",
    "config_from_dict",
    "config_to_dict",
    "flux_shift_mu",
    "load_config",
    "plot_loss_curves",
    "sample_sigmas",
]
