"""The training configuration: dataclasses with help text, read from YAML with overrides."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..models.comfyui import LORA_FORMATS
from ..models.family import PREDICTIONS, TRAINABLE
from ..models.quantize import QUANTIZE
from ..utils.checks import check_option

DATA_KINDS = ("synthetic", "released", "manifest")
"""Allowed ``data.kind`` values."""

MIXED_PRECISION = ("no", "bf16", "fp16")
"""Allowed ``train.mixed_precision`` values."""

LR_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine")
"""Allowed ``optim.schedule`` values (diffusers' ``get_scheduler`` names)."""


def _help(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING):
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass
class ModelConfig:
    """The FLUX model and its reference LoRA."""

    family: str = _help(
        "model family, a name of the registry (mosaic_kit.pipelines.registry): flux1 (FLUX.1, references in their "
        "own branch, as released), flux2 (FLUX.2 [klein] / [dev], the stock pipeline's layout; docs/guide/flux2.md), …",
        "flux1")
    base: str | None = _help("base pipeline: local folder or hub id; null builds a tiny random model", None)
    tiny_seed: int = _help("seed of the tiny random model (base: null)", 0)
    tiny_overrides: dict = _help("tiny model: FluxTransformer2DModel config entries to change", factory=dict)
    pixel_space: int | None = _help("tiny model: pixel space with this factor instead of a random VAE", None)
    prediction: str = _help("what the model outputs: velocity (every pretrained model) or sample (x-prediction, "
                            "tiny models only: the clean target; trained with the clean-target loss)", "velocity")
    family_options: dict = _help(
        "options of the model family's builder that it declares (ModelFamily.family_options), e.g. "
        "{reference_method: index} for kontext (offset | index | uxo); recorded in the LoRA file", factory=dict)
    lora_rank: int = _help("reference LoRA rank (paper 128, released 512)", 128)
    lora_alpha: float | None = _help("LoRA alpha; null = rank (scale 1, as released)", None)
    reference_attention: str = _help("isolated (released) or full", "isolated")
    capture_blocks: str = _help("blocks feeding SCAL/MDL: double (released) or all", "double")
    gradient_checkpointing: bool = _help("diffusers gradient checkpointing of the transformer blocks", True)
    init_lora: str | None = _help("start from this LoRA file (e.g. the released checkpoint)", None)
    trainable: str = _help(
        "what trains: lora (the reference LoRA; the base stays frozen) or all (every transformer weight "
        "too, e.g. a tiny random model whose base cannot denoise)", "lora")
    quantize: str = _help(
        "frozen base of the transformer through diffusers' quantization configs, LoRA trained on top: none, int8 "
        "(torchao int8 weight-only; also on the CPU), fp8 (torchao float8 weight-only; GPU), nf4 (bitsandbytes "
        "NF4; GPU) or int8-bnb (bitsandbytes LLM.int8; GPU); needs trainable: lora (docs/guide/training.md)", "none")
    lora_format: str = _help(
        "LoRA files written at the end: diffusers (the family's own file, pytorch_lora_weights.safetensors) or "
        "comfyui (that file and the same LoRA in ComfyUI's key names beside it, comfyui_lora_weights.safetensors; "
        "docs/guide/training.md)", "diffusers")

    offload_encoders: bool = _help(
        "keep the text encoders and the VAE on the CPU, moved onto the training device only while encoding "
        "(less GPU memory, a host-device copy per step; docs/guide/training.md)", False)
    group_offload: str | None = _help(
        "diffusers' group offloading of the transformer: null, block_level (groups of blocks) or leaf_level (every "
        "leaf module) on the CPU, moved onto the device for their forward (docs/guide/training.md)", None)
    group_offload_blocks: int = _help("blocks per group of group_offload: block_level", 1)

    def __post_init__(self) -> None:
        from ..pipelines.registry import family_names

        check_option("model.family", self.family, family_names())
        if not isinstance(self.offload_encoders, bool):
            raise ValueError(f"Expected `model.offload_encoders` to be true or false, but got {self.offload_encoders!r}.")
        if self.group_offload is not None:
            from ..pipelines.registry import get_family

            family = get_family(self.family).family_class
            check_option("model.group_offload", self.group_offload, ("block_level", "leaf_level"))
            if self.group_offload not in family.group_offload_types:
                raise ValueError(f"Expected `model.group_offload` in {family.group_offload_types} or null for "
                                 f"`model.family: {self.family}`, but got {self.group_offload!r}: "
                                 f"{family.group_offload_reason}.")
        if isinstance(self.group_offload_blocks, bool) or not isinstance(self.group_offload_blocks, int) \
                or self.group_offload_blocks < 1:
            raise ValueError(f"Expected `model.group_offload_blocks` to be a positive int, but got "
                             f"{self.group_offload_blocks!r}.")
        self._check_family_options()
        check_option("model.trainable", self.trainable, TRAINABLE)
        check_option("model.lora_format", self.lora_format, LORA_FORMATS)
        check_option("model.quantize", self.quantize, QUANTIZE)
        if self.quantize != "none":
            from ..pipelines.registry import get_family

            if self.trainable != "lora":
                raise ValueError(f"Expected `model.trainable: lora` with `model.quantize: {self.quantize}` (quantized "
                                 f"weights do not train), but got {self.trainable!r}.")
            if "quantize" not in get_family(self.family).config_extras:
                raise ValueError(f"Expected `model.quantize: none` with `model.family: {self.family}`, but got "
                                 f"{self.quantize!r}: the family takes no `quantize` option.")
        if self.lora_format == "comfyui":
            from ..pipelines.registry import get_family

            if get_family(self.family).family_class.comfyui_lora_keys is None:
                raise ValueError(f"Expected `model.lora_format: diffusers` with `model.family: {self.family}`, but got "
                                 "'comfyui': the family declares no ComfyUI key map (comfyui_lora_keys).")
        check_option("model.reference_attention", self.reference_attention, ("isolated", "full"))
        check_option("model.capture_blocks", self.capture_blocks, ("double", "all"))
        if self.base is not None and (self.tiny_overrides or self.pixel_space):
            raise ValueError("Expected `model.tiny_overrides` and `model.pixel_space` only with `model.base: null`.")
        check_option("model.prediction", self.prediction, PREDICTIONS)
        if self.base is not None and self.prediction != "velocity":
            raise ValueError("Expected `model.prediction: sample` only with `model.base: null`: pretrained models "
                             "and their stock pipelines predict the velocity.")
        if not isinstance(self.lora_rank, int) or self.lora_rank < 1:
            raise ValueError(f"Expected `model.lora_rank` to be a positive int, but got {self.lora_rank!r}.")

    def _check_family_options(self) -> None:
        """``family_options`` against what the family declares (one line naming its options)."""
        from ..pipelines.registry import get_family

        try:
            get_family(self.family).check_options(self.family_options)
        except ValueError as error:
            raise ValueError(f"`model.family_options`: {error}") from None


@dataclass
class DataConfig:
    """Where samples come from and how batches are built."""

    kind: str = _help("synthetic (generated multi-subject world), released (SemAlign-MS layout) or manifest", "synthetic")
    root: str | None = _help("released layout folder, or the manifest .jsonl file", None)
    target_size: int = _help("target side in pixels (multiple of 16)", 512)
    ref_size: int = _help("reference side in pixels (multiple of 16; FLUX.2 with validation samples: at least 64, "
                          "the stock pipelines' minimum)", 512)
    batch_size: int = _help("samples per process and step", 1)
    max_refs: int | None = _help("pad every batch to this K (fixed shapes); null: the batch's largest K", None)
    compose: list[int] | None = _help("[min_k, max_k]: compose K-subject samples from single-subject ones", None)
    synthetic_refs: list[int] = _help("[min_k, max_k] references of synthetic samples", factory=lambda: [1, 4])
    synthetic_length: int = _help("samples in one synthetic epoch", 10_000)
    synthetic_world: dict = _help("other SyntheticWorldConfig fields of the synthetic world (e.g. identity_range, "
                                  "subject_style, background, target_rotation, occlusion)", factory=dict)
    synthetic_validation: str = _help("identities of the synthetic validation samples: held_out (never trained on) "
                                      "or seen (the training identities, in new layouts)", "held_out")
    num_workers: int = _help("loader worker processes (0: in the training process)", 0)
    caption_dropout: float = _help("probability of an empty caption (guidance-free training)", 0.0)
    image_dropout: float = _help("probability of dropping all references of a sample", 0.0)
    seed: int = _help("data order and composition seed", 0)
    cache_dir: str | None = _help(
        "conditioning cache of this data set (recipes/cache_conditioning.py): training then reads the text "
        "embeddings and VAE latents from it and never loads the text encoders or the VAE (docs/guide/training.md)",
        None)

    def __post_init__(self) -> None:
        check_option("data.kind", self.kind, DATA_KINDS)
        for name in ("target_size", "ref_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0 or value % 16:
                raise ValueError(f"Expected `data.{name}` to be a positive multiple of 16, but got {value!r}.")
        if self.kind != "synthetic" and not self.root:
            raise ValueError(f"Expected `data.root` for data.kind = {self.kind!r}, but got none.")
        check_option("data.synthetic_validation", self.synthetic_validation, ("held_out", "seen"))
        if not isinstance(self.synthetic_world, dict):
            raise ValueError(f"Expected `data.synthetic_world` to map SyntheticWorldConfig fields to values, but got "
                             f"{self.synthetic_world!r}.")
        reserved = sorted(set(self.synthetic_world) & {"image_size", "ref_size", "min_refs", "max_refs", "seed"})
        if reserved:
            raise ValueError(f"Expected `data.synthetic_world` without {reserved} (set by data.target_size, "
                             f"data.ref_size, data.synthetic_refs and data.seed), but got {self.synthetic_world!r}.")
        if self.synthetic_world:
            from ..data import SyntheticWorldConfig

            known = {f.name for f in dataclasses.fields(SyntheticWorldConfig)}
            unknown = sorted(set(self.synthetic_world) - known)
            if unknown:
                raise ValueError(f"Unknown settings in `data.synthetic_world`: {unknown}; expected among {sorted(known)}.")
        for name in ("caption_dropout", "image_dropout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(f"Expected `data.{name}` in [0, 1], but got {value!r}.")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"Expected `data.batch_size` to be a positive int, but got {self.batch_size!r}.")
        if self.cache_dir is not None and (not isinstance(self.cache_dir, str) or not self.cache_dir):
            raise ValueError(f"Expected `data.cache_dir` to be a folder or null, but got {self.cache_dir!r}.")


@dataclass
class ObjectiveConfig:
    """Eq. 15 and the flow-matching timesteps."""

    preset: str = _help("MosaicObjective preset: paper or released", "paper")
    overrides: dict = _help("keyword overrides of the preset (e.g. scal_weight: 0.2)", factory=dict)
    logit_mean: float = _help("logit-normal timestep density: mean", 0.0)
    logit_std: float = _help("logit-normal timestep density: std", 1.0)
    resolution_shift: bool = _help("FLUX's resolution-dependent shift of the sampled sigmas", True)
    guidance: float = _help("guidance embedded during training (released: 1)", 1.0)

    def __post_init__(self) -> None:
        check_option("objective.preset", self.preset, ("paper", "released"))


@dataclass
class OptimConfig:
    """AdamW, clipping and the learning-rate schedule."""

    lr: float = _help("learning rate (paper 1e-4, released 8e-5)", 1e-4)
    betas: list[float] = _help("AdamW betas", factory=lambda: [0.9, 0.999])
    weight_decay: float = _help("AdamW weight decay", 1e-2)
    eps: float = _help("AdamW eps", 1e-8)
    use_8bit: bool = _help("bitsandbytes 8-bit AdamW (GPU; needs bitsandbytes)", False)
    grad_clip: float = _help("max gradient norm (0: no clipping)", 1.0)
    schedule: str = _help("LR schedule: constant, constant_with_warmup, linear or cosine", "constant")
    warmup_steps: int = _help("LR warm-up steps", 0)

    def __post_init__(self) -> None:
        check_option("optim.schedule", self.schedule, LR_SCHEDULES)
        if not isinstance(self.lr, (int, float)) or self.lr <= 0:
            raise ValueError(f"Expected `optim.lr` > 0, but got {self.lr!r}.")


@dataclass
class TrainConfig:
    """Everything a run needs; see ``recipes/configs/*.yaml``."""

    output_dir: str = _help("run folder (checkpoints, logs, samples, curves)", "outputs/train/run")
    seed: int = _help("seed of model init, noise and dropout", 0)
    max_steps: int = _help("optimisation steps", 1000)
    gradient_accumulation: int = _help("micro-batches per optimisation step", 1)
    mixed_precision: str = _help("no, bf16 or fp16", "bf16")
    checkpoint_every: int = _help("save a checkpoint every N steps (and at the end)", 500)
    keep_checkpoints: int = _help("checkpoints kept (oldest removed)", 3)
    log_every: int = _help("log scalars every N steps", 10)
    validate_every: int = _help("write a validation contact sheet every N steps (0: only at the end)", 500)
    validation_samples: int = _help("samples on the validation sheet", 2)
    validation_steps: int = _help("denoising steps of validation samples", 28)
    validation_guidance: float | None = _help(
        "guidance of the validation samples (null: the family's inference default, e.g. FLUX.1's 3.5); a model "
        "trained from random weights has only seen the training guidance (objective.guidance)", None)
    tracker: str | None = _help("accelerate tracker: tensorboard, wandb, ... or null", "tensorboard")
    ema_decay: float | None = _help("EMA decay of the LoRA weights (null: no EMA)", 0.999)
    cpu_threads: int | None = _help(
        "torch threads when training on the CPU (null: torch's default); tiny models gain nothing from "
        "threads, and threads oversubscribed on a busy machine slow a step many times over", None)
    check_finite_steps: int = _help(
        "run the first N steps with mosaic_kit.finite_checks() on: a NaN or inf in a query, key, attention "
        "map, prediction or loss term raises a ValueError naming the tensor (one device sync per checked "
        "tensor); 0: off. The loss terms and the gradient norm are checked at every step regardless", 10)
    fsdp: bool = _help(
        "shard the transformer with FSDP2 (every nn.Linear its own unit; LoRA-only checkpoints). On GPUs "
        "`accelerate launch --config_file recipes/accelerate/fsdp.yaml` turns it on; true also shards the "
        "processes of a CPU (gloo) run, and under a plain `python` (one process) trains in a process group of one "
        "(the same path, nothing to shard). Needs model.trainable: lora and ema_decay: null", False)
    model: ModelConfig = _help("model", factory=ModelConfig)
    data: DataConfig = _help("data", factory=DataConfig)
    objective: ObjectiveConfig = _help("objective", factory=ObjectiveConfig)
    optim: OptimConfig = _help("optimiser", factory=OptimConfig)

    def __post_init__(self) -> None:
        check_option("mixed_precision", self.mixed_precision, MIXED_PRECISION)
        for name in ("max_steps", "checkpoint_every", "log_every", "gradient_accumulation", "keep_checkpoints"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Expected `{name}` to be a positive int, but got {value!r}.")
        if not isinstance(self.check_finite_steps, int) or isinstance(self.check_finite_steps, bool) \
                or self.check_finite_steps < 0:
            raise ValueError(f"Expected `check_finite_steps` to be a non-negative int, but got {self.check_finite_steps!r}.")
        if self.cpu_threads is not None and (not isinstance(self.cpu_threads, int) or self.cpu_threads < 1):
            raise ValueError(f"Expected `cpu_threads` to be a positive int or null, but got {self.cpu_threads!r}.")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"Expected `ema_decay` in (0, 1) or null, but got {self.ema_decay!r}.")
        if isinstance(self.validation_samples, bool) or not isinstance(self.validation_samples, int) \
                or self.validation_samples < 0:
            raise ValueError(f"Expected `validation_samples` to be a non-negative int, but got {self.validation_samples!r}.")
        guidance = self.validation_guidance
        if guidance is not None and (isinstance(guidance, bool) or not isinstance(guidance, (int, float))
                                     or not guidance >= 0 or guidance == float("inf")):
            raise ValueError(f"Expected `validation_guidance` to be a finite number >= 0 or null, but got {guidance!r}.")
        from ..pipelines.registry import get_family

        family = get_family(self.model.family).family_class
        side = family.min_sample_reference_side
        if self.validation_samples >= 1 and self.data.kind != "manifest" and self.data.ref_size < side:
            # (manifest references keep their files' sizes)
            raise ValueError(
                f"Expected `data.ref_size` >= {side} with `model.family: {family.name}` and validation samples, but "
                f"got {self.data.ref_size}: the validation sheet samples through the family's pipeline, and "
                f"{family.min_sample_reference_reason}, so the run would fail after training. Raise `data.ref_size` "
                "or set `validation_samples: 0`."
            )
        if self.validation_samples >= 1 and self.model.prediction != "velocity" and not family.samples_through_forward:
            raise ValueError(
                f"Expected `model.prediction: velocity` with `model.family: {family.name}` and validation samples, "
                f"but got {self.model.prediction!r}: the family samples through its stock pipeline, which expects a "
                "velocity. Set `validation_samples: 0` (the synthetic evaluation samples through the family's forward).")
        if self.data.cache_dir and self.model.offload_encoders:
            raise ValueError("Expected `model.offload_encoders: false` with `data.cache_dir`: a cached run never loads "
                             "the text encoders or the VAE, so there is nothing to offload.")
        if not isinstance(self.fsdp, bool):
            raise ValueError(f"Expected `fsdp` to be true or false, but got {self.fsdp!r}.")
        if self.fsdp:
            check_fsdp_config(self)


def check_fsdp_config(config: TrainConfig) -> None:
    """Raises a ValueError naming the setting when ``config`` cannot train under FSDP.

    Example:
        >>> check_fsdp_config(config_from_dict({"ema_decay": 0.9}))
        Traceback (most recent call last):
        ...
        ValueError: Expected `ema_decay: null` under FSDP (the EMA of sharded weights is not supported yet), but got 0.9.
    """
    if config.model.trainable != "lora":
        raise ValueError(f"Expected `model.trainable: lora` under FSDP (checkpoints gather the trainable weights), "
                         f"but got {config.model.trainable!r}.")
    if config.ema_decay is not None:
        raise ValueError(f"Expected `ema_decay: null` under FSDP (the EMA of sharded weights is not supported yet), "
                         f"but got {config.ema_decay!r}.")


_SECTIONS = {"model": ModelConfig, "data": DataConfig, "objective": ObjectiveConfig, "optim": OptimConfig}


def config_from_dict(values: dict) -> TrainConfig:
    """Builds a `TrainConfig` from nested dicts, rejecting unknown keys by name.

    Example:
        >>> config_from_dict({"max_steps": 2, "data": {"target_size": 64}}).data.target_size
        64
    """
    if not isinstance(values, dict):
        raise ValueError(f"Expected a mapping of settings, but got {type(values).__name__}.")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"Unknown settings {sorted(unknown)}; expected among {sorted(known)}.")
    kwargs = {}
    for name, value in values.items():
        if name in _SECTIONS:
            section = _SECTIONS[name]
            fields = {f.name for f in dataclasses.fields(section)}
            if not isinstance(value, dict) or set(value) - fields:
                bad = sorted(set(value) - fields) if isinstance(value, dict) else value
                raise ValueError(f"Unknown settings in `{name}`: {bad}; expected among {sorted(fields)}.")
            kwargs[name] = section(**value)
        else:
            kwargs[name] = value
    return TrainConfig(**kwargs)


def _parse_value(text: str) -> Any:
    """A YAML value; numbers YAML 1.1 reads as strings (``5e-4``) become floats."""
    import yaml

    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _copy_sections(values: dict) -> dict:
    """``values`` with every nested dict copied (at any depth; other values shared, never changed)."""
    return {key: _copy_sections(value) if isinstance(value, dict) else value for key, value in values.items()}


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """Applies ``dotted.key=value`` overrides (values parsed as YAML) to nested dicts, on a copy:
    ``values`` and the dicts nested in it, at any depth, are left unchanged.

    Args:
        values: the settings, nested dicts by section (``{"data": {"batch_size": 1}}``).
        overrides: ``dotted.key=value`` strings; a missing section is created.

    Returns:
        A new dict of the settings with the overrides applied.

    Raises:
        TypeError: ``values`` is not a dict, or ``overrides`` is not a list of strings.
        ValueError: an override without ``=``, or one that goes through a key that is not a section.

    Example:
        >>> apply_overrides({"data": {"batch_size": 1}}, ["data.batch_size=4", "max_steps=10"])
        {'data': {'batch_size': 4}, 'max_steps': 10}
    """
    if not isinstance(values, dict):
        raise TypeError(f"Expected `values` to be a dict of settings, but got {type(values).__name__}.")
    if isinstance(overrides, str) or not all(isinstance(item, str) for item in overrides):
        raise TypeError(f"Expected `overrides` to be a list of `key=value` strings, but got {overrides!r}.")
    values = _copy_sections(values)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"Expected an override `key=value` (e.g. optim.lr=8e-5), but got {item!r}.")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        target = values
        for part in parts[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ValueError(f"Override {item!r}: {part!r} is not a section.")
        target[parts[-1]] = _parse_value(text)
    return values


def load_config(paths: list[str | Path] | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Reads YAML files (later ones override earlier ones), applies overrides, validates.

    Args:
        paths: YAML files.
        overrides: ``dotted.key=value`` strings.

    Returns:
        The resolved `TrainConfig`.
    """
    import yaml

    values: dict = {}
    for path in paths or []:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"Expected {path} to hold a mapping of settings, but got {type(loaded).__name__}.")
        for key, value in loaded.items():
            if isinstance(value, dict) and isinstance(values.get(key), dict):
                values[key] = {**values[key], **value}
            else:
                values[key] = value
    return config_from_dict(apply_overrides(values, overrides or []))


def config_to_dict(config: TrainConfig) -> dict:
    """The config as plain nested dicts (what is saved as ``config.yaml`` in the run folder)."""
    return dataclasses.asdict(config)
