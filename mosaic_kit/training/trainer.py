"""`MosaicTrainer`: the reference-LoRA training loop on accelerate (what the training recipe runs).

One optimisation step, per process and micro-batch:

1. the next batch of good samples in the seeded, resumable order (`mosaic_kit.data.SkippingLoader`),
   caption and reference dropout from a seeded generator;
2. frozen encoders: CLIP + T5 prompt embeddings, VAE latents (distribution mode, as released) of
   the target and the K references, packed 2×2;
3. flow matching: sigma from a logit-normal density with FLUX's resolution shift, noisy latents
   ``(1 - σ)·x + σ·ε``, velocity target ``ε - x``;
4. the multi-reference forward (`MosaicFluxTransformer`) feeding `RefTargetCapture` (and, on log
   steps, `PointAttentionRows` for the alignment hit-rate);
5. `MosaicObjective` (eq. 15), backward into the LoRA only, grad-norm clipping, AdamW, LR schedule,
   EMA of the LoRA weights.

Every random draw comes from generators whose states are checkpointed (plus accelerate's RNG
states), and the data position is saved with each checkpoint, so ``resume="latest"`` continues
exactly as an uninterrupted run would.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..attention import PointAttentionRows, RefTargetCapture
from .. import check_finite, finite_checks
from ..losses import MosaicObjective
from ..models import (
    MosaicFluxTransformer,
    add_reference_lora,
    latent_image_ids,
    load_reference_lora,
    pack_latents,
    reference_lora_state_dict,
    reference_position_ids,
    save_reference_lora,
    write_lora_file,
)
from .checkpoints import (
    CHECKPOINT_PREFIX,
    CheckpointError,
    clean_stale_checkpoints,
    latest_intact_checkpoint,
    list_checkpoints,
    publish_checkpoint,
    remove_checkpoint,
    verify_checkpoint,
    write_checkpoint_digest,
)
from .config import TrainConfig, config_to_dict

log = logging.getLogger("mosaic_kit.training")

TRAINER_STATE_FILE = "trainer_state.json"
LORA_FILE = "pytorch_lora_weights.safetensors"
EMA_LORA_FILE = "ema_lora_weights.safetensors"
RAW_LORA_FILE = "lora_parameters.safetensors"


class NonFiniteTrainingError(FloatingPointError):
    """Training stopped on a NaN or inf: names the step, the process and the term that went bad
    (``flow_matching``, ``scal``, ``mdl``, the weighted total or the gradient norm), or the weight
    that is not finite when a checkpoint was about to be written. Raised before the optimiser
    step, so the weights and every saved checkpoint stay finite.

    Example:
        >>> raise NonFiniteTrainingError("step 3: `scal` is nan")
        Traceback (most recent call last):
        ...
        mosaic_kit.training.trainer.NonFiniteTrainingError: step 3: `scal` is nan
    """


def _write_text_atomic(path: Path, text: str) -> None:
    """Writes ``path`` through a temporary file renamed into place (never a half-written file)."""
    partial = path.with_name(f".tmp-{path.name}")
    with open(partial, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)


def _read_trainer_state(path: Path) -> dict:
    state = json.loads(path.read_text())
    if not isinstance(state, dict) or not {"step", "processes", "history"} <= set(state):
        raise ValueError(f"expected a mapping with step, processes and history, but got {str(state)[:200]}")
    return state


def _load_checkpoint_file(folder: Path, name: str, load: Callable[[Path], object]):
    """``load(folder / name)``, with any error re-raised as a `CheckpointError` naming both."""
    try:
        return load(folder / name)
    except CheckpointError:
        raise
    except Exception as error:
        raise CheckpointError(folder, name, f"cannot be loaded ({type(error).__name__}: {error})") from error


def flux_shift_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                  base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """FLUX's resolution-dependent shift ``μ`` (linear in the number of image tokens).

    Example:
        >>> round(flux_shift_mu(256), 3), round(flux_shift_mu(4096), 3)
        (0.5, 1.15)
    """
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + (base_shift - slope * base_seq_len)


def sample_sigmas(batch: int, generator: torch.Generator, image_seq_len: int | None, mean: float = 0.0,
                  std: float = 1.0) -> torch.Tensor:
    """Flow-matching noise levels: ``u = sigmoid(N(mean, std))`` (logit-normal), then FLUX's shift
    ``σ = e^μ / (e^μ + 1/u - 1)`` for ``image_seq_len`` target tokens (None: no shift).

    Args:
        batch: how many.
        generator: a CPU generator (advanced by ``batch`` normal draws).
        image_seq_len: target tokens, for the shift.
        mean: logit-normal mean.
        std: logit-normal std.

    Returns:
        ``(batch,)`` float32 sigmas in ``(0, 1)``.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> s = sample_sigmas(1000, g, 1024)
        >>> bool(((s > 0) & (s < 1)).all()), s.mean().item() > 0.5  # shifted towards noise
        (True, True)
    """
    u = torch.sigmoid(torch.randn(batch, generator=generator) * std + mean)
    if image_seq_len is None:
        return u
    mu = flux_shift_mu(image_seq_len)
    return math.exp(mu) / (math.exp(mu) + (1 / u - 1))


class TrainingForward(torch.nn.Module):
    """What the accelerator wraps (DDP): the multi-reference forward *and* the capture statistics.

    Returning the `CaptureResult` from ``forward`` makes every tensor the loss uses an output of
    the wrapped module, so DDP's unused-parameter search sees the gradient paths that reach the
    LoRA only through the captured attention (e.g. the last block's queries with
    ``capture_blocks="all"``).

    Args:
        model: the `MosaicFluxTransformer`.
    """

    def __init__(self, model: MosaicFluxTransformer) -> None:
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
    """Trains the reference LoRA of a FLUX model with the MOSAIC objective.

    Args:
        config: the resolved `TrainConfig`.
        on_step_end: optional ``callback(trainer, step)`` after every optimisation step.

    Call `train` (which calls `setup` first).
    """

    def __init__(self, config: TrainConfig, on_step_end: Callable[[MosaicTrainer, int], None] | None = None) -> None:
        if not isinstance(config, TrainConfig):
            raise ValueError(f"Expected `config` to be a TrainConfig, but got {type(config).__name__}.")
        self.config = config
        self.on_step_end = on_step_end
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
        self._build_models()
        self._build_data()
        self._build_optimisation()
        self.generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + acc.process_index)
        self.dropout_generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 7919 + acc.process_index)
        self.history: list[dict] = []
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            clean_stale_checkpoints(self.output_dir / "checkpoints")  # what a killed save or prune left
            for partial in self.output_dir.glob(".tmp-*"):  # what a killed atomic write (summary, LoRA files) left
                if partial.is_file():
                    partial.unlink()
            import yaml

            _write_text_atomic(self.output_dir / "config.yaml", yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        acc.wait_for_everyone()
        if cfg.tracker:
            acc.init_trackers("mosaic", config=_flat_config(cfg))
        self._ready = True

    def _build_models(self) -> None:
        from ..pipelines import MosaicFluxPipeline
        from ..pipelines.tiny import tiny_flux_components

        cfg = self.config.model
        if cfg.base is None:
            pipe = MosaicFluxPipeline(**tiny_flux_components(
                seed=cfg.tiny_seed, transformer_overrides=cfg.tiny_overrides, pixel_space=cfg.pixel_space))
        else:
            pipe = MosaicFluxPipeline.from_pretrained(cfg.base, torch_dtype=self.weight_dtype)
        pipe.set_progress_bar_config(disable=True)
        transformer = pipe.transformer
        if cfg.init_lora:
            load_reference_lora(transformer, cfg.init_lora)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.config.seed)
                add_reference_lora(transformer, rank=cfg.lora_rank, alpha=cfg.lora_alpha)
        for name, param in transformer.named_parameters():
            param.requires_grad_(".lora_" in name)
        for module in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
            module.requires_grad_(False).eval()
        if self.weight_dtype == torch.float32:
            pipe.to(self.device)
        else:
            pipe.to(self.device, self.weight_dtype)
        for param in transformer.parameters():  # LoRA weights train in float32
            if param.requires_grad:
                param.data = param.data.float()
        if cfg.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        self.pipe = pipe
        mosaic = MosaicFluxTransformer(
            transformer, reference_attention=cfg.reference_attention, capture_blocks=cfg.capture_blocks
        )
        pipe.__dict__["_mosaic_transformer"] = mosaic  # validation samples use the same settings
        self.model = TrainingForward(mosaic)
        self.lora_parameters = [p for p in transformer.parameters() if p.requires_grad]

    def _build_data(self) -> None:
        from ..data import ResumableSampler, SkippingLoader, collate_samples

        cfg, acc = self.config.data, self.accelerator
        self.dataset = build_dataset(self.config)
        self.sampler = ResumableSampler(len(self.dataset), seed=cfg.seed, rank=acc.process_index,
                                        world_size=acc.num_processes)
        collate = functools.partial(
            collate_samples, target_size=cfg.target_size, ref_size=cfg.ref_size, max_refs=cfg.max_refs,
            vae_scale_factor=self.pipe.vae_scale_factor,
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
        optimizer = optimizer_cls(self.lora_parameters, lr=opt.lr, betas=tuple(opt.betas), weight_decay=opt.weight_decay,
                                  eps=opt.eps)
        scheduler = get_scheduler(opt.schedule, optimizer, num_warmup_steps=opt.warmup_steps * self.accelerator.num_processes,
                                  num_training_steps=cfg.max_steps * self.accelerator.num_processes)
        self.objective = MosaicObjective.from_preset(cfg.objective.preset, **cfg.objective.overrides)
        self.model, self.optimizer, self.lr_scheduler = self.accelerator.prepare(self.model, optimizer, scheduler)
        from accelerate.utils import DistributedType

        if self.accelerator.distributed_type == DistributedType.FSDP:
            raise ValueError(
                "FSDP is not supported by the trainer yet. The model side works with every nn.Linear as an "
                "FSDP unit (exact forward and gradients, tests/test_fsdp.py), but FSDP units around whole "
                "blocks are never gathered (the forward calls block submodules per stream), and accelerate's "
                "save_state would write the whole base model under FSDP. Use DDP (multi_gpu.yaml) or "
                "DeepSpeed ZeRO-2 (deepspeed_zero2.yaml)."
            )
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
    @torch.no_grad()
    def encode_batch(self, batch) -> dict:
        """Frozen encoders: prompt embeddings and packed latents of targets and references."""
        pipe, device = self.pipe, self.device
        prompt_embeds, pooled, text_ids = pipe.encode_prompt(
            prompt=batch.captions, prompt_2=None, device=device, max_sequence_length=self._max_sequence_length()
        )
        vae = pipe.vae

        def latents_of(images: torch.Tensor) -> torch.Tensor:
            pixels = (images.to(device, vae.dtype) * 2 - 1)
            latents = vae.encode(pixels).latent_dist.mode()
            return (latents - vae.config.shift_factor) * vae.config.scaling_factor

        target = latents_of(batch.targets)
        b, k = batch.references.shape[:2]
        refs = latents_of(batch.references.flatten(0, 1))
        ref_tokens = pack_latents(refs).view(b, -1, refs.shape[1] * 4)
        h, w = target.shape[-2:]
        ref_h, ref_w = refs.shape[-2:]
        counts = ((ref_h // 2) * (ref_w // 2),) * k
        size = (ref_h * pipe.vae_scale_factor, ref_w * pipe.vae_scale_factor)
        return {
            "target": pack_latents(target).float(),
            "target_ids": latent_image_ids(h // 2, w // 2, device=device),
            "text_embeddings": prompt_embeds,
            "pooled_embeddings": pooled,
            "text_ids": text_ids,
            "reference_tokens": ref_tokens,
            "reference_ids": reference_position_ids([size] * k, device=device, pixels_per_token=2 * pipe.vae_scale_factor),
            "reference_token_counts": counts,
        }

    def _max_sequence_length(self) -> int:
        return 512 if self.config.model.base else 32

    def training_step(self, batch, log_step: bool) -> dict:
        """Forward, objective and backward of one micro-batch; returns the logged scalars."""
        from ..data import apply_condition_dropout
        from ..eval.localisation import attention_hit_rate

        cfg = self.config
        batch = apply_condition_dropout(batch, cfg.data.caption_dropout, cfg.data.image_dropout, self.dropout_generator)
        inputs = self.encode_batch(batch)
        latents = inputs.pop("target")
        bsz = latents.shape[0]
        shift_len = latents.shape[1] if cfg.objective.resolution_shift else None
        sigmas = sample_sigmas(bsz, self.generator, shift_len, cfg.objective.logit_mean, cfg.objective.logit_std)
        noise = torch.randn(latents.shape, generator=self.generator).to(self.device)
        sigmas = sigmas.to(self.device)
        noisy = (1 - sigmas[:, None, None]) * latents + sigmas[:, None, None] * noise
        corr = batch.corr.to(self.device)
        capture = None
        if self.objective.scal_weight(self.step) or self.objective.mdl_weight(self.step):
            capture = RefTargetCapture(corr, aggregate=self.objective.mdl_aggregate)
        rows = PointAttentionRows(corr) if log_step else None
        guidance = torch.full((bsz,), cfg.objective.guidance, device=self.device)
        model_inputs = {
            k: v.to(self.weight_dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() and "ids" not in k else v
            for k, v in inputs.items()
        }
        model_inputs.update(target_tokens=noisy.to(self.weight_dtype), timestep=sigmas.to(self.weight_dtype),
                            guidance=guidance)
        with self.accelerator.autocast():
            prediction, attention = self.model(model_inputs, capture, [rows] if rows is not None else None)
        out = self.objective(prediction.float(), noise, latents, attention, corr if capture is not None else None,
                             step=self.step)
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

        bar = tqdm(total=cfg.max_steps, initial=self.step, desc="training", disable=not acc.is_local_main_process,
                   dynamic_ncols=True)
        batches = iter(self.loader)
        start = time.perf_counter()
        self.model.train()
        while self.step < cfg.max_steps:
            log_step = (self.step + 1) % cfg.log_every == 0 or self.step + 1 == cfg.max_steps
            accum: dict[str, list] = {}
            checking = self.step < cfg.check_finite_steps  # hot-path checks in the first steps
            for _ in range(cfg.gradient_accumulation):
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
                        if cfg.optim.grad_clip > 0:
                            grad_norm = acc.clip_grad_norm_(self.lora_parameters, cfg.optim.grad_clip)
                        else:
                            grad_norm = torch.linalg.vector_norm(
                                torch.stack([p.grad.norm() for p in self.lora_parameters if p.grad is not None]))
                        if grad_norm is not None:  # DeepSpeed clips inside its own step
                            self._stop_if_not_finite({"grad_norm": torch.as_tensor(grad_norm)})
                    self.optimizer.step()
                    self.lr_scheduler.step()
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

    def _transformer(self):
        return self.accelerator.unwrap_model(self.model).model.transformer

    def save_checkpoint(self) -> Path:
        """Writes ``checkpoints/step-N`` so that it cannot lie (`mosaic_kit.training.checkpoints`):
        everything goes to a temporary folder, the digest of every file is written last, and the
        folder is renamed when complete; a crash leaves the previous checkpoints intact. Old
        checkpoints beyond ``keep_checkpoints`` are removed by rename-then-delete.

        Raises:
            NonFiniteTrainingError: when a LoRA weight (or its EMA) is NaN or inf: such a state is
                never saved.
        """
        acc = self.accelerator
        root = self.output_dir / "checkpoints"
        final = root / f"{CHECKPOINT_PREFIX}{self.step:07d}"
        tmp = root / f".tmp-{CHECKPOINT_PREFIX}{self.step:07d}"
        self._check_state_finite()
        if acc.is_main_process:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():  # left by a crash while saving this step
                shutil.rmtree(tmp)
            tmp.mkdir()
        acc.wait_for_everyone()
        # optimiser, LR schedule and RNG states of every process (accelerate); LoRA only, not the model
        from accelerate.utils import DistributedType

        extra = {"exclude_frozen_parameters": True} if acc.distributed_type == DistributedType.DEEPSPEED else {}
        acc.save_state(str(tmp), safe_serialization=True, **extra)
        rank = acc.process_index
        torch.save({"generator": self.generator.get_state(), "dropout_generator": self.dropout_generator.get_state(),
                    "loader": self.loader.state_dict()}, tmp / f"trainer_rank{rank}.pt")
        if acc.is_main_process:
            save_reference_lora(self._transformer(), tmp / LORA_FILE)  # for inference (alpha/rank folded in)
            write_lora_file(reference_lora_state_dict(self._transformer()), tmp / RAW_LORA_FILE)  # for resume
            if self.ema is not None:
                torch.save(self.ema.state_dict(), tmp / "ema.pt")
                self._save_ema_lora(tmp / EMA_LORA_FILE)
        acc.wait_for_everyone()
        if acc.is_main_process:
            with open(tmp / TRAINER_STATE_FILE, "w") as handle:
                json.dump({"step": self.step, "processes": acc.num_processes, "history": self.history}, handle)
            write_checkpoint_digest(tmp)  # fsyncs every file, then the digest, last
            publish_checkpoint(tmp, final)
            for old in list_checkpoints(root)[: -self.config.keep_checkpoints]:
                remove_checkpoint(old)
        acc.wait_for_everyone()
        return final

    def _check_state_finite(self) -> None:
        params = dict(self._transformer().named_parameters())
        for name, param in params.items():
            if param.requires_grad:
                try:
                    check_finite(name, param, force=True)
                except ValueError as error:
                    raise NonFiniteTrainingError(
                        f"Refusing to save a checkpoint at step {self.step}: {error} The last saved checkpoint "
                        f"is left as it was.") from error
        if self.ema is not None:
            for index, shadow in enumerate(self.ema.shadow_params):
                try:
                    check_finite(f"EMA shadow parameter {index}", shadow, force=True)
                except ValueError as error:
                    raise NonFiniteTrainingError(
                        f"Refusing to save a checkpoint at step {self.step}: {error} The last saved checkpoint "
                        f"is left as it was.") from error

    def _save_ema_lora(self, path: Path) -> None:
        params = self.lora_parameters
        self.ema.store(params)
        self.ema.copy_to(params)
        try:
            save_reference_lora(self._transformer(), path)
        finally:
            self.ema.restore(params)

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
        acc = self.accelerator
        root = self.output_dir / "checkpoints"
        required = (TRAINER_STATE_FILE, RAW_LORA_FILE, *(f"trainer_rank{r}.pt" for r in range(acc.num_processes)))
        error = None
        if acc.is_main_process:  # one process verifies, all use its choice
            try:
                if str(which) == "latest":
                    path = latest_intact_checkpoint(root, required)
                else:
                    path = Path(which)
                    verify_checkpoint(path, required)
            except CheckpointError as raised:
                error, path = (str(raised.folder), raised.file, raised.reason), None
        else:
            path = None
        if acc.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            path, error = broadcast_object_list([path, error], from_process=0)
        if error is not None:
            raise CheckpointError(*error)
        path = Path(path)
        state = _load_checkpoint_file(path, TRAINER_STATE_FILE, _read_trainer_state)
        if state["processes"] != acc.num_processes:
            raise CheckpointError(
                path, TRAINER_STATE_FILE, f"expected to resume with {state['processes']} processes (the checkpoint's), "
                f"but got {acc.num_processes}")
        from accelerate.utils import DistributedType

        _load_checkpoint_file(path, RAW_LORA_FILE, lambda f: load_reference_lora_values(self._transformer(), f))
        extra = {"load_module_strict": False} if acc.distributed_type == DistributedType.DEEPSPEED else {}
        try:
            acc.load_state(str(path), **extra)
        except Exception as raised:  # names the folder; accelerate's message names the file
            raise CheckpointError(path, None, "accelerate's load_state (optimizer.bin, scheduler.bin, random_states_*.pkl) "
                                  f"failed ({type(raised).__name__}: {raised})") from raised
        rank_file = f"trainer_rank{acc.process_index}.pt"
        rank_state = _load_checkpoint_file(path, rank_file, lambda f: torch.load(f, weights_only=True))
        try:
            self.generator.set_state(rank_state["generator"])
            self.dropout_generator.set_state(rank_state["dropout_generator"])
            self.loader.load_state_dict(rank_state["loader"])
        except (KeyError, TypeError, ValueError, RuntimeError) as raised:
            raise CheckpointError(path, rank_file, f"unusable trainer state ({type(raised).__name__}: {raised})") \
                from raised
        if self.ema is not None:
            ema_state = _load_checkpoint_file(path, "ema.pt", lambda f: torch.load(f, weights_only=True))
            try:
                self.ema.load_state_dict(ema_state)
            except (KeyError, TypeError, ValueError, RuntimeError) as raised:
                raise CheckpointError(path, "ema.pt", f"unusable EMA state ({type(raised).__name__}: {raised})") \
                    from raised
            self.ema.to(self.device)
        self.step = int(state["step"])
        self.history = list(state["history"])
        if acc.is_main_process:  # forget metrics logged after the checkpoint by the interrupted run
            lines = [json.dumps(r) for r in self.history]
            _write_text_atomic(self.output_dir / "metrics.jsonl", "".join(line + "\n" for line in lines))
        log.info("resumed from %s at step %d", path, self.step)
        return path

    # -- validation and the end --------------------------------------------------------------------
    def validate(self) -> Path | None:
        """Writes ``samples/step-N.png``: references, ground truth and a sample per validation
        item (EMA weights when enabled)."""
        acc = self.accelerator
        if not acc.is_main_process or self.config.validation_samples < 1:
            acc.wait_for_everyone()
            return None
        from ..eval.sheets import SheetRow, contact_sheet

        cfg = self.config
        pipe = self.pipe
        rows = []
        if self.ema is not None:
            self.ema.store(self.lora_parameters)
            self.ema.copy_to(self.lora_parameters)
        was_training = self.model.training
        self.model.eval()
        try:
            for index in range(cfg.validation_samples):
                sample = self.validation_dataset()[index]
                refs = [_to_pil(r) for r in sample.references]
                out = pipe(
                    sample.caption, refs, height=cfg.data.target_size, width=cfg.data.target_size,
                    ref_size=cfg.data.ref_size, num_inference_steps=cfg.validation_steps,
                    generator=torch.Generator().manual_seed(index), max_sequence_length=self._max_sequence_length(),
                    progress=False, guidance_scale=3.5,
                )
                rows.append(SheetRow(sample.caption, refs, [_to_pil(sample.target), out.images[0]]))
        finally:
            if self.ema is not None:
                self.ema.restore(self.lora_parameters)
            self.model.train(was_training)
        path = self.output_dir / "samples" / f"step-{self.step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        contact_sheet(rows, thumb_size=128, title=f"step {self.step}: references | ground truth | sample").save(path)
        acc.wait_for_everyone()
        return path

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
        if acc.is_main_process:
            from ..data import BadDataTally

            tally = BadDataTally()
            for state in tallies:
                tally = tally.merge(BadDataTally.from_state_dict(state))  # merge returns a new tally
            for name, save in ((LORA_FILE, lambda f: save_reference_lora(self._transformer(), f)),
                               (EMA_LORA_FILE, self._save_ema_lora if self.ema is not None else None)):
                if save is not None:  # through a temporary name: never a half-written LoRA file
                    partial = self.output_dir / f".tmp-{name}"
                    save(partial)
                    os.replace(partial, self.output_dir / name)
            curves = plot_loss_curves(self.history, self.output_dir / "loss_curves.png")
            summary = {
                "steps": self.step, "seconds": round(seconds, 2), "resumed_from": str(resumed_from) if resumed_from else None,
                "final": self.history[-1] if self.history else None, "bad_samples": tally.state_dict(),
                "lora": str(self.output_dir / LORA_FILE), "loss_curves": str(curves) if curves else None,
                "processes": acc.num_processes,
            }
            _write_text_atomic(self.output_dir / "summary.json", json.dumps(summary, indent=2))
            print(f"bad data: {tally.summary()}")
        acc.wait_for_everyone()
        acc.end_training()
        return summary


def load_reference_lora_values(transformer, path: Path) -> None:
    """Copies LoRA tensors from a file into the existing adapter (keeps optimiser references)."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    current = reference_lora_state_dict(transformer)
    if set(state) != set(current):
        raise ValueError(f"Expected the checkpoint's LoRA keys to match the model's, but {path} differs.")
    params = dict(transformer.named_parameters())
    with torch.no_grad():
        for key, value in state.items():
            module, part = key[len("transformer."):].rsplit(".lora_", 1)
            ab = part.split(".")[0]
            name = f"{module}.lora_{ab}.mosaic.weight"
            params[name].copy_(value.to(params[name].dtype))


def _to_pil(image: torch.Tensor):
    from PIL import Image

    array = (image.detach().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8")
    return Image.fromarray(array)


def plot_loss_curves(history: list[dict], path: Path) -> Path | None:
    """Loss terms, LR, grad norm and hit-rate against the step, as a PNG (needs matplotlib)."""
    if not history:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no loss curves (pip install mosaic_kit[train])")
        return None
    steps = [r["step"] for r in history]
    panels = [("loss", ["loss", "flow_matching"]), ("MOSAIC terms", ["scal", "mdl"]),
              ("attention hit-rate", ["hit_rate"]), ("optimiser", ["grad_norm", "lr"])]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2))
    for ax, (title, keys) in zip(axes, panels):
        for key in keys:
            values = [r.get(key, float("nan")) for r in history]
            if key == "lr":  # its own scale
                twin = ax.twinx()
                twin.plot(steps, values, label=key, color="tab:orange")
                twin.set_ylabel("lr", fontsize=8)
                twin.legend(fontsize=8, loc="lower right")
            else:
                ax.plot(steps, values, label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=8, loc="upper left")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def build_dataset(config: TrainConfig, validation: bool = False):
    """The dataset a config names: the synthetic world (held-out identities for validation), the
    released layout or a manifest, optionally through the multi-subject composer."""
    from .. import data
    from .. import data as world

    cfg = config.data
    if cfg.kind == "synthetic":
        world_cfg = world.SyntheticWorldConfig(
            image_size=cfg.target_size, ref_size=cfg.ref_size, min_refs=cfg.synthetic_refs[0],
            max_refs=cfg.synthetic_refs[1], seed=cfg.seed + (1 if validation else 0),
            identity_range=world.HELD_OUT_IDENTITIES if validation else world.TRAIN_IDENTITIES,
        )
        return world.SyntheticDataset(world.SyntheticWorld(world_cfg), cfg.synthetic_length)
    if cfg.kind == "released":
        base = data.ReleasedDataset(cfg.root, target_size=cfg.target_size, ref_size=cfg.ref_size)
    else:
        base = data.ManifestDataset(cfg.root)
    if cfg.compose:
        return data.ComposedDataset(base, num_subjects=tuple(cfg.compose), canvas_size=cfg.target_size, seed=cfg.seed)
    return base
