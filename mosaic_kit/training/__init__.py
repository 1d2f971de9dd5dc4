"""Training the reference LoRA with the MOSAIC objective (needs the ``flux`` extra).

- `TrainConfig` (and its sections), `load_config`: YAML configs with ``dotted.key=value``
  overrides, validated.
- `MosaicTrainer`: the accelerate training loop with exact resume; `NonFiniteTrainingError` when a
  loss term or the gradient norm goes NaN or inf.
- Checkpoints that cannot lie: `write_checkpoint_digest`, `verify_checkpoint`,
  `latest_intact_checkpoint`, `list_checkpoints`, `publish_checkpoint`, `remove_checkpoint`,
  `clean_stale_checkpoints`, `CheckpointError` (see ``docs/reliability.md``).
- `sample_sigmas`, `flux_shift_mu`: flow-matching timesteps (logit-normal, resolution shift).
"""

from .checkpoints import (
    CHECKPOINT_PREFIX,
    DIGEST_FILE,
    CheckpointError,
    clean_stale_checkpoints,
    latest_intact_checkpoint,
    list_checkpoints,
    publish_checkpoint,
    remove_checkpoint,
    verify_checkpoint,
    write_checkpoint_digest,
)
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
    NonFiniteTrainingError,
    build_dataset,
    flux_shift_mu,
    plot_loss_curves,
    sample_sigmas,
)

__all__ = [
    "CHECKPOINT_PREFIX",
    "DIGEST_FILE",
    "CheckpointError",
    "NonFiniteTrainingError",
    "clean_stale_checkpoints",
    "latest_intact_checkpoint",
    "list_checkpoints",
    "publish_checkpoint",
    "remove_checkpoint",
    "verify_checkpoint",
    "write_checkpoint_digest",
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
