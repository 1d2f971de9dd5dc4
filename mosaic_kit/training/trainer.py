"""`MosaicTrainer`: the reference-LoRA training loop on accelerate (what the training recipe runs).

One optimisation step, per process and micro-batch:

1. the next batch of good samples in the seeded, resumable order (`mosaic_kit.data.SkippingLoader`),
   caption and reference dropout from a seeded generator;
2. frozen encoders through the model boundary (``family.encode_batch``, a
   `mosaic_kit.models.ModelFamily` chosen by name from the registry, `mosaic_kit.pipelines.registry`):
   prompt embeddings, the packed latents of the target and the K references;
3. flow matching (the family's `sample_sigmas` and `noise`): sigma from diffusers' logit-normal
   density with the resolution shift, noisy latents ``(1 - σ)·x + σ·ε``, velocity target ``ε - x``;
4. the multi-reference forward (``family.model``) feeding `RefTargetCapture`
   (and, on log steps, `PointAttentionRows` for the alignment hit-rate);
5. `MosaicObjective` (eq. 15), backward into the LoRA only, grad-norm clipping, AdamW, LR schedule,
   EMA of the LoRA weights.

Every random draw comes from generators whose states are checkpointed (plus accelerate's RNG
states), and the data position is saved with each checkpoint, so ``resume="latest"`` continues
exactly as an uninterrupted run would. Each micro-batch slot of the global batch (process ×
accumulation step) has its own noise and dropout generators, so P processes with A accumulated
micro-batches draw what one process with P·A micro-batches draws.

Nothing here knows which family it drives. The jobs around the loop live in their own modules:
`mosaic_kit.training.checkpointing` (what a checkpoint holds, save and resume, through a narrow
`TrainingState`), `mosaic_kit.training.validation` (validation sheets),
`mosaic_kit.training.datasets` (`build_dataset`), `mosaic_kit.training.fsdp` (FSDP2 sharding and its
checkpoints) and `mosaic_kit.reporting` (loss curves, validation sheets, attention panels).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..attention import PointAttentionRows, RefTargetCapture
from .. import finite_checks
from ..losses import MosaicObjective
from ..models import ModelInputs
from ..pipelines.registry import get_family
from .checkpointing import (
    COMFYUI_LORA_FILE,
    EMA_COMFYUI_LORA_FILE,
    EMA_LORA_FILE,
    LORA_FILE,
    RAW_LORA_FILE,
    TRAINER_STATE_FILE,
    NonFiniteTrainingError,
    TrainingState,
    load_training_checkpoint,
    save_training_checkpoint,
)
from .checkpoint_folders import CheckpointError, clean_stale_checkpoints, list_checkpoints, verify_checkpoint
from .config import TrainConfig, check_fsdp_config, config_to_dict
from .cache import open_training_cache
from .offload import apply_offload
from .datasets import build_dataset
from .distributed import final_barrier
from .fsdp import is_sharded, shard_linear_units
from .validation import Validator
from ..reporting.training import plot_loss_curves
from ..utils.atomic import write_text_atomic

log = logging.getLogger("mosaic_kit.training")

class TrainingForward(torch.nn.Module):
    """What the accelerator wraps (DDP): the multi-reference forward *and* the capture statistics.

    Returning the `CaptureResult` from ``forward`` makes every tensor the loss uses an output of
    the wrapped module, so DDP's unused-parameter search sees the gradient paths that reach the
    LoRA only through the captured attention (e.g. the last block's queries with
    ``capture_blocks="all"``).

    Args:
        model: the family's denoiser (``family.model``).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: dict, capture: RefTargetCapture | None = None, diagnostics: list | None = None):
        """Returns ``(prediction, capture.result() or None)``; ``diagnostics`` are fed too."""
        captures = ([capture] if capture is not None else []) + list(diagnostics or [])
        prediction = self.model(**inputs, capture=captures or None)
        return prediction, None if capture is None else capture.result()


def _flat_config(config: TrainConfig) -> dict:
    flat = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}{key}.", inner)
        else:
            flat[prefix[:-1]] = value if isinstance(value, (int, float, str, bool)) else str(value)

    walk("", config_to_dict(config))
    return flat


class MosaicTrainer:
    """Trains the LoRA (or every weight) of any registered model family with the MOSAIC objective.

    Args:
        config: the resolved `TrainConfig`.
        on_step_end: optional ``callback(trainer, step)`` after every optimisation step.
        progress: show the training progress bar (on the local main process).

    Call `train` (which calls `setup` first).
    """

    def __init__(self, config: TrainConfig, on_step_end: Callable[[MosaicTrainer, int], None] | None = None,
                 progress: bool = True) -> None:
        if not isinstance(config, TrainConfig):
            raise ValueError(f"Expected `config` to be a TrainConfig, but got {type(config).__name__}.")
        self.config = config
        self.on_step_end = on_step_end
        self.progress = progress
        self.output_dir = Path(config.output_dir)
        self.step = 0
        self._ready = False

    # -- setup -------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Builds the accelerator, models, data, optimiser, schedule, EMA and trackers."""
        if self._ready:
            return
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

        cfg = self.config
        self.accelerator = Accelerator(
            cpu=not torch.cuda.is_available(),  # several CPU processes then train with gloo (MULTI_CPU)
            mixed_precision=cfg.mixed_precision,
            gradient_accumulation_steps=cfg.gradient_accumulation,
            log_with=cfg.tracker,
            project_config=ProjectConfiguration(project_dir=str(self.output_dir), logging_dir=str(self.output_dir / "logs")),
            # the last block's reference queries and MLP never reach the target: their LoRA gets no gradient
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
        )
        acc = self.accelerator

        # checkpoints hold the LoRA only: keep accelerate from saving or loading the whole model
        def skip_model_weights(models, weights, output_dir):
            weights.clear()

        def skip_model_loading(models, input_dir):
            models.clear()

        acc.register_save_state_pre_hook(skip_model_weights)
        acc.register_load_state_pre_hook(skip_model_loading)
        self.device = acc.device
        if cfg.cpu_threads is not None and self.device.type == "cpu":
            torch.set_num_threads(cfg.cpu_threads)
        self.weight_dtype = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.mixed_precision]
        from accelerate.utils import DistributedType

        self.fsdp = cfg.fsdp or acc.distributed_type == DistributedType.FSDP
        if acc.distributed_type == DistributedType.FSDP:
            check_fsdp_config(cfg)
            if acc.state.fsdp_plugin.fsdp_version != 2:
                raise ValueError("Expected accelerate's FSDP version 2 (fsdp_version: 2, as in "
                                 f"recipes/accelerate/fsdp.yaml), but got {acc.state.fsdp_plugin.fsdp_version}.")
        self._build_models()
        self._build_data()
        self._build_optimisation()
        apply_offload(self.family, cfg.model, self.device, acc.num_processes)  # model.offload_encoders, group_offload
        # one noise and one dropout generator per micro-batch slot of the global batch (slot = process +
        # processes x micro-batch): P processes x A micro-batches draw what P*A processes would draw
        slots = [acc.process_index + acc.num_processes * micro for micro in range(cfg.gradient_accumulation)]
        self.slot_generators = [(torch.Generator().manual_seed(cfg.seed * 1_000_003 + slot),
                                 torch.Generator().manual_seed(cfg.seed * 1_000_003 + 7919 + slot)) for slot in slots]
        self.generator, self.dropout_generator = self.slot_generators[0]
        self.history: list[dict] = []
        self.state = TrainingState(
            acc, self.output_dir, self.family, self.model, self.optimizer, self.ema, self.lora_parameters,
            self.slot_generators, self.loader, trainable=cfg.model.trainable, keep_checkpoints=cfg.keep_checkpoints,
            fsdp=self.fsdp)
        self.validator = Validator(
            acc, self.family, self.model, self.validation_dataset, self.output_dir, cfg.validation_samples,
            cfg.validation_steps, cfg.data.target_size, cfg.data.ref_size, cfg.objective.guidance, ema=self.ema,
            trainable_parameters=self.lora_parameters, fsdp=self.fsdp, sample_guidance=cfg.validation_guidance)
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            clean_stale_checkpoints(self.output_dir / "checkpoints")  # what a killed save or prune left
            for partial in self.output_dir.glob(".tmp-*"):  # what a killed atomic write (summary, LoRA files) left
                if partial.is_file():
                    partial.unlink()
            import yaml

            write_text_atomic(self.output_dir / "config.yaml", yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        acc.wait_for_everyone()
        if cfg.tracker:
            acc.init_trackers("mosaic", config=_flat_config(cfg))
        self._ready = True

    def _build_models(self) -> None:
        from diffusers.training_utils import cast_training_params

        cfg = self.config.model
        spec = get_family(cfg.family)  # the registry: everything model-specific is behind the family
        family = spec.build(cfg.base, torch_dtype=self.weight_dtype, seed=cfg.tiny_seed, tiny_overrides=cfg.tiny_overrides,
                            pixel_space=cfg.pixel_space, encoders=not self.config.data.cache_dir,  # cached: none
                            family_options=cfg.family_options, prediction=cfg.prediction,
                            **{name: getattr(cfg, name) for name in spec.config_extras})
        if cfg.init_lora:
            family.load_lora(cfg.init_lora)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.config.seed)
                family.add_lora(rank=cfg.lora_rank, alpha=cfg.lora_alpha)
        family.set_trainable(cfg.trainable)  # the LoRA, or every transformer weight; encoders and VAE frozen
        family.to(self.device, None if self.weight_dtype == torch.float32 else self.weight_dtype)
        transformer = family.transformer
        cast_training_params(transformer, dtype=torch.float32)  # trainable weights train in float32
        if cfg.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        self.family, self.cache = family, open_training_cache(self.config)  # data.cache_dir: encodings read from it
        self.pipe = family.pipe
        self.model = TrainingForward(family.model)
        self.lora_parameters = [p for p in transformer.parameters() if p.requires_grad]

    def _build_data(self) -> None:
        from ..data import ResumableSampler, SkippingLoader, collate_samples

        cfg, acc = self.config.data, self.accelerator
        self.dataset = build_dataset(self.config)
        self.sampler = ResumableSampler(len(self.dataset), seed=cfg.seed, rank=acc.process_index,
                                        world_size=acc.num_processes)
        collate = functools.partial(
            collate_samples, target_size=cfg.target_size, ref_size=cfg.ref_size, max_refs=cfg.max_refs,
            vae_scale_factor=self.family.vae_scale_factor,
        )
        self.loader = SkippingLoader(self.dataset, cfg.batch_size, collate_fn=collate, sampler=self.sampler,
                                     num_workers=cfg.num_workers)

    def _build_optimisation(self) -> None:
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import EMAModel

        cfg = self.config
        opt = cfg.optim
        if opt.use_8bit:
            try:
                import bitsandbytes as bnb
            except ImportError as error:
                raise ImportError("optim.use_8bit needs bitsandbytes: `pip install bitsandbytes`.") from error
            optimizer_cls = bnb.optim.AdamW8bit
        else:
            optimizer_cls = torch.optim.AdamW
        if self.fsdp:  # shard before the optimiser sees the parameters (they become DTensor shards)
            shard_linear_units(self.model, self.device.type, self.accelerator.num_processes)
            self.lora_parameters = [p for p in self.family.transformer.parameters() if p.requires_grad]
        optimizer = optimizer_cls(self.lora_parameters, lr=opt.lr, betas=tuple(opt.betas), weight_decay=opt.weight_decay,
                                  eps=opt.eps)
        scheduler = get_scheduler(opt.schedule, optimizer, num_warmup_steps=opt.warmup_steps * self.accelerator.num_processes,
                                  num_training_steps=cfg.max_steps * self.accelerator.num_processes)
        self.objective = MosaicObjective.from_preset(cfg.objective.preset, **cfg.objective.overrides)
        if self.fsdp:  # the sharded model and its optimiser stay out of accelerate (LoRA-only checkpoints)
            self.optimizer = optimizer
            self.lr_scheduler = self.accelerator.prepare(scheduler)
        else:
            self.model, self.optimizer, self.lr_scheduler = self.accelerator.prepare(self.model, optimizer, scheduler)
        from accelerate.utils import DistributedType

        if self.accelerator.distributed_type == DistributedType.DEEPSPEED:
            self._configure_deepspeed()
        self.ema = EMAModel(self.lora_parameters, decay=cfg.ema_decay) if cfg.ema_decay else None
        if self.ema is not None:
            self.ema.to(self.device)

    def _configure_deepspeed(self) -> None:
        """DeepSpeed reads batch size, accumulation and clipping from its own config: set them
        from ours (accelerate cannot infer the micro-batch without a prepared DataLoader)."""
        cfg = self.config
        plugin = self.accelerator.state.deepspeed_plugin
        ds = plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = cfg.data.batch_size
        ds["gradient_accumulation_steps"] = cfg.gradient_accumulation
        ds["gradient_clipping"] = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else 0.0
        ds.pop("train_batch_size", None)

    # -- one step ----------------------------------------------------------------------------------
    def encode_batch(self, batch) -> ModelInputs:
        """Frozen encoders through the model boundary (``family.encode_batch``): prompt embeddings,
        reference tokens and the clean packed target latents (from the conditioning cache with ``data.cache_dir``)."""
        return self.family.encode_batch(batch) if self.cache is None else self.cache.encode_batch(self.family, batch)

    def training_step(self, batch, log_step: bool) -> dict:
        """Forward, objective and backward of one micro-batch; returns the logged scalars."""
        from ..data import apply_condition_dropout
        from ..eval.localisation import attention_hit_rate

        cfg = self.config
        batch = apply_condition_dropout(batch, cfg.data.caption_dropout, cfg.data.image_dropout, self.dropout_generator)
        inputs = self.encode_batch(batch)
        latents = inputs.target
        bsz = latents.shape[0]
        layout = inputs.layout if cfg.objective.resolution_shift else None  # its target size sets the shift
        sigmas = self.family.sample_sigmas(bsz, self.generator, layout, cfg.objective.logit_mean, cfg.objective.logit_std)
        noise = torch.randn(latents.shape, generator=self.generator).to(self.device)
        sigmas = sigmas.to(self.device)
        noisy = self.family.noise(latents, noise, sigmas)
        corr = batch.corr.to(self.device)
        capture = None
        if self.objective.scal_weight(self.step) or self.objective.mdl_weight(self.step):
            capture = RefTargetCapture(corr, aggregate=self.objective.mdl_aggregate)
        rows = PointAttentionRows(corr) if log_step else None
        guidance = torch.full((bsz,), cfg.objective.guidance, device=self.device)
        model_inputs = self.family.model_kwargs(inputs, noisy, sigmas, guidance=guidance)
        with self.accelerator.autocast():
            prediction, attention = self.model(model_inputs, capture, [rows] if rows is not None else None)
        prediction = self.family.velocity(prediction, noisy, sigmas)  # x-prediction: converted
        out = self.objective(prediction.float(), noise, latents, attention, corr if capture is not None else None,
                             step=self.step, weights=self.family.loss_weights(sigmas))
        self._stop_if_not_finite(
            {"flow_matching": out.flow_matching, "scal": out.scal, "mdl": out.mdl, "loss": out.loss})
        self._terms_checked = True
        self.accelerator.backward(out.loss)
        scalars = {"loss": out.loss.detach(), "flow_matching": out.flow_matching.detach(), "scal": out.scal.detach(),
                   "mdl": out.mdl.detach(), "scal_weight": out.scal_weight, "mdl_weight": out.mdl_weight}
        if rows is not None:
            if bool(corr.point_mask.any()):
                scalars["hit_rate"] = attention_hit_rate(rows.result(), corr, batch.target_grid, radius=1).detach()
            else:
                scalars["hit_rate"] = torch.tensor(float("nan"), device=self.device)
        return scalars

    def _stop_if_not_finite(self, terms: dict[str, torch.Tensor], failed_check: ValueError | None = None) -> None:
        """Raises `NonFiniteTrainingError` on every process when a term is NaN or inf on any
        process (one scalar sync, plus one small all-gather with several processes).

        ``failed_check``: this process's hot-path check failed (``terms`` are then placeholders);
        the other processes learn it from the same all-gather, so every process stops together
        instead of waiting in the backward's all-reduce."""
        acc = self.accelerator
        values = torch.stack([t.detach().float().reshape(()).to(self.device) for t in terms.values()])
        flags = torch.cat([torch.isfinite(values), torch.tensor([failed_check is None], device=self.device)])
        if acc.num_processes > 1:
            flags = acc.gather(flags[None].to(torch.uint8)).bool()  # (processes, terms + 1)
        else:
            flags = flags[None]
        if bool(flags.all()):
            return
        final_barrier()  # every process stops here: end safely for the gloo teardown (training/distributed.py)
        if failed_check is not None:
            raise NonFiniteTrainingError(
                f"Training stopped at step {self.step + 1} (finite checks of the first "
                f"{self.config.check_finite_steps} steps): {failed_check} No optimiser step was taken with it; "
                f"{self._newest_checkpoint_note()}") from failed_check
        checked_elsewhere = (~flags[:, -1]).nonzero()
        if len(checked_elsewhere):
            raise NonFiniteTrainingError(
                f"Training stopped at step {self.step + 1}: a finite check failed on process "
                f"{int(checked_elsewhere[0])} (its error names the tensor). No optimiser step was taken; "
                f"{self._newest_checkpoint_note()}")
        finite = flags[:, :-1]
        process = int((~finite).any(dim=1).nonzero()[0])
        names = list(terms)
        bad = [name for name, ok in zip(names, finite[process].tolist()) if not ok]
        if len(bad) > 1 and "loss" in bad:  # the total is bad because a term is
            bad.remove("loss")
        bad = ", ".join(f"`{name}`" if name != "loss" else "`loss` (the weighted total; every term is finite)"
                        for name in bad)
        local = ", ".join(f"{name} = {float(v):.6g}" for name, v in zip(names, values.tolist()))
        raise NonFiniteTrainingError(
            f"Training stopped at step {self.step + 1}: {bad} is not finite on process {process} "
            f"(this process: {local}). No optimiser step was taken with it; {self._newest_checkpoint_note()} "
            f"Resume with `--resume latest` after lowering optim.lr, or raise check_finite_steps to find the "
            f"first tensor that goes bad.")

    def _newest_checkpoint_note(self) -> str:
        if not self.accelerator.is_main_process:
            return "the newest checkpoint is verified by process 0."
        found = self.checkpoints()
        if not found:
            return "no checkpoint was written yet."
        try:
            verify_checkpoint(found[-1])
        except CheckpointError as error:
            return f"the newest checkpoint is damaged ({error})."
        return f"the newest checkpoint {found[-1]} is intact (verified against its digest)."

    # -- loop --------------------------------------------------------------------------------------
    def train(self) -> dict:
        """Runs (or resumes) training to ``max_steps``; returns a summary."""
        self.setup()
        cfg, acc = self.config, self.accelerator
        resumed_from = None
        if getattr(self, "resume", None):
            resumed_from = self.load_checkpoint(self.resume)
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.max_steps, initial=self.step, desc="training",
                   disable=not (self.progress and acc.is_local_main_process),
                   dynamic_ncols=True)
        if self.step == 0:  # where attention starts, to compare with the last validation sheet
            self.attention_sheet()
        batches = iter(self.loader)
        start = time.perf_counter()
        self.model.train()
        while self.step < cfg.max_steps:
            log_step = (self.step + 1) % cfg.log_every == 0 or self.step + 1 == cfg.max_steps
            accum: dict[str, list] = {}
            checking = self.step < cfg.check_finite_steps  # hot-path checks in the first steps
            for micro in range(cfg.gradient_accumulation):
                self.generator, self.dropout_generator = self.slot_generators[micro]
                batch = next(batches)
                with acc.accumulate(self.model):
                    with finite_checks(True) if checking else contextlib.nullcontext():
                        self._terms_checked = False  # until training_step's collective check of the terms
                        try:
                            scalars = self.training_step(batch, log_step)
                        except ValueError as error:  # a hot-path check (`check_finite`) named the tensor
                            if "to hold only finite values" not in str(error):
                                raise
                            if self._terms_checked:  # past the collective check (the hit-rate): this process only
                                raise NonFiniteTrainingError(
                                    f"Training stopped at step {self.step + 1} on process {acc.process_index} (finite "
                                    f"checks of the first {cfg.check_finite_steps} steps): {error} "
                                    f"{self._newest_checkpoint_note()}") from error
                            nan = torch.tensor(float("nan"))
                            self._stop_if_not_finite(dict.fromkeys(("flow_matching", "scal", "mdl", "loss"), nan),
                                                     failed_check=error)
                            raise  # not reached: _stop_if_not_finite raised
                    grad_norm = None
                    if acc.sync_gradients:
                        if self.fsdp:  # DTensor gradients: torch's clipping reduces the norm over the shards
                            grad_norm = torch.nn.utils.clip_grad_norm_(
                                self.lora_parameters, cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf"))
                            grad_norm = grad_norm.full_tensor() if is_sharded(grad_norm) else grad_norm
                        elif cfg.optim.grad_clip > 0:
                            grad_norm = acc.clip_grad_norm_(self.lora_parameters, cfg.optim.grad_clip)
                        else:
                            grad_norm = torch.linalg.vector_norm(
                                torch.stack([p.grad.norm() for p in self.lora_parameters if p.grad is not None]))
                        if grad_norm is not None:  # DeepSpeed clips inside its own step
                            self._stop_if_not_finite({"grad_norm": torch.as_tensor(grad_norm)})
                    if acc.sync_gradients or not self.fsdp:  # accelerate's optimiser skips by itself
                        self.optimizer.step()
                    self.lr_scheduler.step()
                    if acc.sync_gradients or not self.fsdp:
                        self.optimizer.zero_grad(set_to_none=True)
                for key, value in scalars.items():
                    accum.setdefault(key, []).append(value)
            if self.ema is not None:
                self.ema.step(self.lora_parameters)
            self.step += 1
            bar.update(1)
            if log_step:
                self._log(accum, grad_norm, bar)
            if self.step % cfg.checkpoint_every == 0 or self.step == cfg.max_steps:
                self.save_checkpoint()
            if cfg.validate_every and self.step % cfg.validate_every == 0 and self.step != cfg.max_steps:
                self.validate()
            if self.on_step_end is not None:
                self.on_step_end(self, self.step)
        bar.close()
        seconds = time.perf_counter() - start
        self.validate()
        summary = self.finish(seconds, resumed_from)
        return summary

    def _log(self, accum: dict, grad_norm, bar) -> None:
        acc = self.accelerator
        values = {}
        for key, items in accum.items():
            tensor = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=self.device) for v in items]).mean()
            values[key] = tensor
        keys = sorted(values)
        stacked = torch.stack([values[k] for k in keys])
        gathered = acc.gather(stacked[None]).float()  # (processes, n)
        means = torch.nanmean(gathered, dim=0) if gathered.shape[0] > 1 else gathered[0]
        record = {k: float(v) for k, v in zip(keys, means.tolist())}
        record["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        record["lr"] = float(self.lr_scheduler.get_last_lr()[0])
        record["step"] = self.step
        self.history.append(record)
        if self.config.tracker:
            acc.log({k: v for k, v in record.items() if k != "step" and math.isfinite(v)}, step=self.step)
        if acc.is_main_process:
            with open(self.output_dir / "metrics.jsonl", "a") as handle:
                handle.write(json.dumps(record) + "\n")
        bar.set_postfix(loss=f"{record['loss']:.4f}", hit=f"{record.get('hit_rate', float('nan')):.2f}")

    # -- checkpoints -------------------------------------------------------------------------------
    def checkpoints(self) -> list[Path]:
        """Complete checkpoints of this run (with their digest file), oldest first; `load_checkpoint`
        verifies the bytes."""
        return list_checkpoints(self.output_dir / "checkpoints")

    def save_checkpoint(self) -> Path:
        """Writes ``checkpoints/step-N`` so that it cannot lie (`mosaic_kit.training.checkpoint_folders`):
        everything goes to a temporary folder, the digest of every file is written last, and the
        folder is renamed when complete; a crash leaves the previous checkpoints intact. Old
        checkpoints beyond ``keep_checkpoints`` are removed by rename-then-delete.

        Raises:
            NonFiniteTrainingError: when a LoRA weight (or its EMA) is NaN or inf: such a state is
                never saved.
        """
        return save_training_checkpoint(self.state, self.step, self.history)

    def rank_state_dict(self) -> dict:
        """This process's data position and generators (``trainer_rank{r}.pt`` of a checkpoint)."""
        return self.state.rank_state_dict()

    def load_rank_state_dict(self, state: dict) -> None:
        """Restores what `rank_state_dict` returned."""
        self.state.load_rank_state_dict(state)

    def load_checkpoint(self, which: str | os.PathLike) -> Path:
        """Restores LoRA, EMA, optimiser, LR schedule, RNG states, data position and history.

        Every file is first checked against the checkpoint's digest (`verify_checkpoint`). With
        ``"latest"``, a damaged or incomplete newest checkpoint gives a warning naming the folder and
        the file, and the newest intact one is used.

        Args:
            which: ``"latest"`` or a checkpoint folder.

        Returns:
            The checkpoint folder used.

        Raises:
            CheckpointError: (a ValueError) naming the folder and the file, when the named
                checkpoint (or, for ``"latest"``, every checkpoint) is damaged, or a file cannot be loaded.
        """
        self.setup()
        path, self.step, self.history = load_training_checkpoint(self.state, which)
        return path

    # -- validation and the end --------------------------------------------------------------------
    def validate(self) -> Path | None:
        """Writes ``samples/step-N.png`` (`mosaic_kit.training.validation.Validator`): per validation
        item, references, ground truth and a sample from the family's pipeline (EMA weights when
        enabled), then where each reference's annotated points attend in the target."""
        return self.validator.validate(self.step)

    def attention_sheet(self) -> Path | None:
        """Writes ``samples/attention-step-N.png``: the attention rows of every validation item alone
        (no sampling; `train` writes it before the first step, to compare with the last sheet)."""
        return self.validator.attention_sheet(self.step)

    def validation_dataset(self):
        """Held-out samples for the validation sheet (held-out identities for synthetic data)."""
        if not hasattr(self, "_validation"):
            self._validation = build_dataset(self.config, validation=True)
        return self._validation

    def finish(self, seconds: float, resumed_from) -> dict:
        """Final LoRA files, loss curves, bad-data tally and ``summary.json``."""
        acc = self.accelerator
        tallies = acc.gather_for_metrics([self.loader.tally.state_dict()], use_gather_object=True) \
            if acc.num_processes > 1 else [self.loader.tally.state_dict()]
        summary = {}
        raw = self.state.lora_values() if self.fsdp else None  # FSDP: every process gathers the LoRA
        if acc.is_main_process:
            from ..data import BadDataTally

            tally = BadDataTally()
            for state in tallies:
                tally = tally.merge(BadDataTally.from_state_dict(state))  # merge returns a new tally
            self.state.save_lora(self.output_dir / LORA_FILE, raw)  # the family's one writer, atomic
            comfyui = self.config.model.lora_format == "comfyui"
            if comfyui:  # the same LoRA in ComfyUI's key names, beside the diffusers file
                self.state.save_lora(self.output_dir / COMFYUI_LORA_FILE, raw, format="comfyui")
            if self.ema is not None:
                self.state.save_ema_lora(self.output_dir / EMA_LORA_FILE)
                if comfyui:
                    self.state.save_ema_lora(self.output_dir / EMA_COMFYUI_LORA_FILE, format="comfyui")
            curves = plot_loss_curves(self.history, self.output_dir / "loss_curves.png")
            summary = {
                "steps": self.step, "seconds": round(seconds, 2), "resumed_from": str(resumed_from) if resumed_from else None,
                "final": self.history[-1] if self.history else None, "bad_samples": tally.state_dict(),
                "lora": str(self.output_dir / LORA_FILE),
                "comfyui_lora": str(self.output_dir / COMFYUI_LORA_FILE) if comfyui else None, "loss_curves": str(curves) if curves else None,
                "processes": acc.num_processes,
            }
            write_text_atomic(self.output_dir / "summary.json", json.dumps(summary, indent=2))
            print(f"bad data: {tally.summary()}")
        final_barrier()  # not wait_for_everyone: the gloo teardown could deadlock (training/distributed.py)
        acc.end_training()
        return summary


__all__ = [
    "MosaicTrainer", "NonFiniteTrainingError", "TrainingForward", "build_dataset", "plot_loss_curves",
    "COMFYUI_LORA_FILE", "EMA_COMFYUI_LORA_FILE", "EMA_LORA_FILE", "LORA_FILE", "RAW_LORA_FILE", "TRAINER_STATE_FILE",
]
