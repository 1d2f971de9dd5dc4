"""Training the reference LoRA with the MOSAIC objective (needs the ``flux`` extra).

- `TrainConfig` (and its sections), `load_config`: YAML configs with ``dotted.key=value``
  overrides, validated.
- `MosaicTrainer` (``trainer``): the accelerate training loop with exact resume;
  `NonFiniteTrainingError` when a loss term or the gradient norm goes NaN or inf.
- ``checkpointing``: what a trainer checkpoint holds, `TrainingState` (the narrow view of a run it
  saves and restores), `save_training_checkpoint`, `load_training_checkpoint`, the file names
  (`LORA_FILE`, ...).
- ``validation``: `Validator`, the validation sheets (samples from the family's own pipeline and
  the attention of each reference's points).
- ``fsdp``: FSDP2 with every ``nn.Linear`` its own unit (`shard_linear_units`; the ``fsdp`` setting
  or ``recipes/accelerate/fsdp.yaml``), LoRA-only checkpoints that resume exactly.
- ``distributed``: `final_barrier` (ends a run so that torch's gloo teardown cannot deadlock).
- ``datasets``: `build_dataset`, the data set a config names (the trainer builds its loader around it).
- ``cache``: cached conditioning (``data.cache_dir``, ``recipes/cache_conditioning.py``):
  `build_conditioning_cache` writes the frozen encoders' outputs of a data set once,
  `ConditioningCache` reads them in training (`cache_identity`, `CacheMismatchError`).
- ``offload``: `apply_offload`, the encoders on the CPU between uses (``model.offload_encoders``) and
  diffusers' group offloading of the transformer (``model.group_offload``).
- Checkpoints that cannot lie (``checkpoint_folders``): `write_checkpoint_digest`, `verify_checkpoint`,
  `latest_intact_checkpoint`, `list_checkpoints`, `publish_checkpoint`, `remove_checkpoint`,
  `clean_stale_checkpoints`, `CheckpointError` (see ``docs/reliability.md``).
- The training noise levels come from the model family (`mosaic_kit.models.ModelFamily.sample_sigmas`,
  one sampler with one resolution shift, `mosaic_kit.models.resolution_shift_mu`).
- `plot_loss_curves` lives in `mosaic_kit.reporting` (importable here too).
"""

from .checkpoint_folders import (
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
from .checkpointing import (
    COMFYUI_LORA_FILE,
    EMA_COMFYUI_LORA_FILE,
    EMA_LORA_FILE,
    LORA_FILE,
    RAW_LORA_FILE,
    TRAINABLE_FILE,
    TRAINER_STATE_FILE,
    NonFiniteTrainingError,
    TrainingState,
    load_training_checkpoint,
    save_training_checkpoint,
)
from .config import (
    DATA_KINDS,
    LR_SCHEDULES,
    MIXED_PRECISION,
    TRAINABLE,
    check_fsdp_config,
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
from ..reporting.training import plot_loss_curves
from .cache import CacheMismatchError, ConditioningCache, build_conditioning_cache, cache_identity
from .datasets import build_dataset
from .distributed import final_barrier
from .fsdp import FSDP_OPTIMIZER_FILE, shard_linear_units
from .trainer import MosaicTrainer, TrainingForward
from .offload import apply_offload
from .validation import Validator

__all__ = [
    "CacheMismatchError",
    "ConditioningCache",
    "apply_offload",
    "build_conditioning_cache",
    "cache_identity",
    "CHECKPOINT_PREFIX",
    "DIGEST_FILE",
    "CheckpointError",
    "final_barrier",
    "COMFYUI_LORA_FILE",
    "EMA_COMFYUI_LORA_FILE",
    "EMA_LORA_FILE",
    "FSDP_OPTIMIZER_FILE",
    "check_fsdp_config",
    "shard_linear_units",
    "LORA_FILE",
    "NonFiniteTrainingError",
    "RAW_LORA_FILE",
    "TRAINABLE",
    "TRAINABLE_FILE",
    "TRAINER_STATE_FILE",
    "TrainingForward",
    "TrainingState",
    "Validator",
    "load_training_checkpoint",
    "save_training_checkpoint",
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
    "load_config",
    "plot_loss_curves",
]
