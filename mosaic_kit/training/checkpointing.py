"""The trainer's checkpoints: what a ``checkpoints/step-N`` folder holds, how it is written so that
it cannot lie (`mosaic_kit.training.checkpoint_folders`: temporary folder, digest last, rename) and
how a run resumes from it exactly.

A checkpoint holds the trainable weights only (the LoRA, or every transformer weight with
``model.trainable: all``), never the frozen base model, under DDP, DeepSpeed and FSDP alike:
the optimiser, LR schedule and RNG states of every process (accelerate's ``save_state``), the
LoRA file for inference (``pytorch_lora_weights.safetensors``, written by the family's one
writer, ``family.save_lora``) and the raw LoRA values for resume (``lora_parameters.safetensors``,
keyed as ``family.lora_parameters()``), the EMA, the data position and generators of every
process (``trainer_rank{r}.pt``) and the logged history (``trainer_state.json``); under FSDP the
optimiser state is gathered into ``fsdp_optimizer.pt`` (`mosaic_kit.training.fsdp`).

Saving and resuming see only a `TrainingState`: the accelerator, the model family, the wrapped
module, the optimiser, the EMA, the generators and the loader (never the trainer).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import check_finite
from ..models import ModelFamily, write_lora_file
from ..utils.atomic import write_text_atomic
from .checkpoint_folders import (
    CHECKPOINT_PREFIX,
    CheckpointError,
    latest_intact_checkpoint,
    list_checkpoints,
    publish_checkpoint,
    remove_checkpoint,
    verify_checkpoint,
    write_checkpoint_digest,
)
from .fsdp import FSDP_OPTIMIZER_FILE, copy_into, full_state, load_optimizer, save_optimizer

log = logging.getLogger("mosaic_kit.training")

TRAINER_STATE_FILE = "trainer_state.json"
LORA_FILE = "pytorch_lora_weights.safetensors"
EMA_LORA_FILE = "ema_lora_weights.safetensors"
COMFYUI_LORA_FILE = "comfyui_lora_weights.safetensors"
"""With ``model.lora_format: comfyui``: the final LoRA in ComfyUI's format, beside `LORA_FILE`."""
EMA_COMFYUI_LORA_FILE = "ema_comfyui_lora_weights.safetensors"
"""With ``model.lora_format: comfyui`` and an EMA: the EMA LoRA in ComfyUI's format."""
RAW_LORA_FILE = "lora_parameters.safetensors"
TRAINABLE_FILE = "trainable_parameters.safetensors"
"""With ``model.trainable: all``: every trainable transformer weight, by parameter name."""


@dataclass
class TrainingState:
    """What checkpointing saves and restores: a narrow view of a training run.

    Attributes:
        accelerator: the run's ``accelerate.Accelerator``.
        output_dir: the run folder (checkpoints go to ``output_dir/checkpoints``).
        family: the `mosaic_kit.models.ModelFamily` (its LoRA file writer and LoRA parameters).
        model: the module the accelerator wraps (FSDP: its optimiser state).
        optimizer: the optimiser.
        ema: diffusers' ``EMAModel`` of the trainable parameters, or None.
        trainable_parameters: the parameters that train (the EMA's order).
        generators: ``(noise, dropout)`` generators of each micro-batch slot of this process.
        loader: the resumable loader (``state_dict``/``load_state_dict``).
        trainable: ``"lora"`` or ``"all"`` (the latter also saves every trainable weight).
        keep_checkpoints: how many checkpoints to keep.
        fsdp: whether the model is sharded with FSDP2.
    """

    accelerator: Any
    output_dir: Path
    family: ModelFamily
    model: Any
    optimizer: Any
    ema: Any
    trainable_parameters: list
    generators: list
    loader: Any
    trainable: str = "lora"
    keep_checkpoints: int = 2
    fsdp: bool = False

    def rank_state_dict(self) -> dict:
        """This process's data position and generators (``trainer_rank{r}.pt`` of a checkpoint)."""
        (generator, dropout), *more = self.generators
        state = {"generator": generator.get_state(), "dropout_generator": dropout.get_state(),
                 "loader": self.loader.state_dict()}
        if more:  # the generators of micro-batches 2.. (gradient accumulation)
            state["micro_batch_generators"] = [[g.get_state(), d.get_state()] for g, d in more]
        return state

    def load_rank_state_dict(self, state: dict) -> None:
        """Restores what `rank_state_dict` returned."""
        (generator, dropout), *more = self.generators
        generator.set_state(state["generator"])
        dropout.set_state(state["dropout_generator"])
        if more:
            saved = state["micro_batch_generators"]
            if len(saved) != len(more):
                raise ValueError(f"expected generators of {len(more) + 1} micro-batches, but got {len(saved) + 1}")
            for (g, d), (g_state, d_state) in zip(more, saved):
                g.set_state(g_state.clone())  # its own storage: set_state reads from the storage's start
                d.set_state(d_state.clone())
        self.loader.load_state_dict(state["loader"])

    def lora_values(self) -> dict[str, torch.Tensor]:
        """The raw LoRA values keyed as ``family.lora_parameters()`` (FSDP: gathered on every process)."""
        values = {key: param.detach() for key, param in self.family.lora_parameters().items()}
        return full_state(values) if self.fsdp else values

    def save_lora(self, path: Path, values: dict[str, torch.Tensor] | None = None, format: str = "diffusers") -> None:
        """The family's LoRA file (its one writer) of the current weights (FSDP: of ``values``,
        gathered by every process before the main one writes), in ``format`` (``"diffusers"``
        or ``"comfyui"``)."""
        self.family.save_lora(path, state_dict=values if self.fsdp else None, format=format)

    def save_ema_lora(self, path: Path, format: str = "diffusers") -> None:
        """The family's LoRA file of the EMA weights (the live weights are restored after)."""
        params = self.trainable_parameters
        self.ema.store(params)
        self.ema.copy_to(params)
        try:
            self.family.save_lora(path, format=format)
        finally:
            self.ema.restore(params)


class NonFiniteTrainingError(FloatingPointError):
    """Training stopped on a NaN or inf: names the step, the process and the term that went bad
    (``flow_matching``, ``scal``, ``mdl``, the weighted total or the gradient norm), or the weight
    that is not finite when a checkpoint was about to be written. Raised before the optimiser
    step, so the weights and every saved checkpoint stay finite.

    Example:
        >>> raise NonFiniteTrainingError("step 3: `scal` is nan")
        Traceback (most recent call last):
        ...
        mosaic_kit.training.checkpointing.NonFiniteTrainingError: step 3: `scal` is nan
    """


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


def _save_trainable_values(transformer, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({name: param.detach().float().cpu().contiguous() for name, param in transformer.named_parameters()
               if param.requires_grad}, str(path))


def _load_trainable_values(transformer, path: Path) -> None:
    from safetensors.torch import load_file

    state = load_file(str(path))
    params = {name: param for name, param in transformer.named_parameters() if param.requires_grad}
    if set(state) != set(params):
        raise ValueError(f"Expected the checkpoint's trainable weights to match the model's, but {path} differs.")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value.to(params[name].dtype))


def check_state_finite(state: TrainingState, step: int) -> None:
    """Raises `NonFiniteTrainingError` when a trainable weight (or its EMA) is NaN or inf."""
    trainable = {name: param.detach() for name, param in state.family.transformer.named_parameters()
                 if param.requires_grad}
    for name, param in full_state(trainable).items():  # FSDP: gathered on every process
        try:
            check_finite(name, param, force=True)
        except ValueError as error:
            raise NonFiniteTrainingError(
                f"Refusing to save a checkpoint at step {step}: {error} The last saved checkpoint "
                f"is left as it was.") from error
    if state.ema is not None:
        for index, shadow in enumerate(state.ema.shadow_params):
            try:
                check_finite(f"EMA shadow parameter {index}", shadow, force=True)
            except ValueError as error:
                raise NonFiniteTrainingError(
                    f"Refusing to save a checkpoint at step {step}: {error} The last saved checkpoint "
                    f"is left as it was.") from error


def save_training_checkpoint(state: TrainingState, step: int, history: list[dict]) -> Path:
    """Writes ``checkpoints/step-N`` (what `MosaicTrainer.save_checkpoint` runs): every process
    writes its own files into ``checkpoints/.tmp-step-N``, process 0 the LoRA files, the EMA and
    the history, then the digest (last) and renames the folder; old checkpoints beyond
    ``keep_checkpoints`` are removed. Every process calls it.

    Args:
        state: the run's `TrainingState`.
        step: the optimisation steps taken (names the folder).
        history: the logged records so far.

    Returns:
        The published folder ``checkpoints/step-N``.

    Raises:
        NonFiniteTrainingError: a trainable weight or its EMA is NaN or inf (nothing is written).
    """
    acc = state.accelerator
    root = state.output_dir / "checkpoints"
    final = root / f"{CHECKPOINT_PREFIX}{step:07d}"
    tmp = root / f".tmp-{CHECKPOINT_PREFIX}{step:07d}"
    check_state_finite(state, step)
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
    torch.save(state.rank_state_dict(), tmp / f"trainer_rank{acc.process_index}.pt")
    raw = state.lora_values()  # FSDP: every process gathers the LoRA (and the optimiser state)
    if state.fsdp:
        save_optimizer(acc.unwrap_model(state.model), state.optimizer, tmp / FSDP_OPTIMIZER_FILE, acc.is_main_process)
    if acc.is_main_process:
        state.save_lora(tmp / LORA_FILE, raw)  # for inference: the family's own file
        write_lora_file(raw, tmp / RAW_LORA_FILE)  # for resume: the raw values
        if not state.fsdp:
            if state.trainable == "all":
                _save_trainable_values(state.family.transformer, tmp / TRAINABLE_FILE)
            if state.ema is not None:
                torch.save(state.ema.state_dict(), tmp / "ema.pt")
                state.save_ema_lora(tmp / EMA_LORA_FILE)
    acc.wait_for_everyone()
    if acc.is_main_process:
        with open(tmp / TRAINER_STATE_FILE, "w") as handle:
            json.dump({"step": step, "processes": acc.num_processes, "history": history}, handle)
        write_checkpoint_digest(tmp)  # fsyncs every file, then the digest, last
        publish_checkpoint(tmp, final)
        for old in list_checkpoints(root)[: -state.keep_checkpoints]:
            remove_checkpoint(old)
    acc.wait_for_everyone()
    return final


def load_training_checkpoint(state: TrainingState, which: str | os.PathLike) -> tuple[Path, int, list[dict]]:
    """Restores a run from a checkpoint (what `MosaicTrainer.load_checkpoint` runs): process 0
    verifies the files against the digest (``"latest"``: the newest intact checkpoint) and every
    process loads the trainable weights, accelerate's states, its generators and data position,
    the EMA; the history is returned. Every process calls it.

    Args:
        state: the run's `TrainingState`, with the checkpoint's number of processes.
        which: ``"latest"`` or a checkpoint folder.

    Returns:
        ``(folder, step, history)``: the checkpoint folder used, its step and logged history.

    Raises:
        CheckpointError: naming the folder and the file, when it is damaged or cannot be loaded.
    """
    acc = state.accelerator
    root = state.output_dir / "checkpoints"
    required = (TRAINER_STATE_FILE, RAW_LORA_FILE, *(f"trainer_rank{r}.pt" for r in range(acc.num_processes)))
    if state.fsdp:
        required += (FSDP_OPTIMIZER_FILE,)
    if state.trainable == "all":
        required += (TRAINABLE_FILE,)
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
    saved = _load_checkpoint_file(path, TRAINER_STATE_FILE, _read_trainer_state)
    if saved["processes"] != acc.num_processes:
        raise CheckpointError(
            path, TRAINER_STATE_FILE, f"expected to resume with {saved['processes']} processes (the checkpoint's), "
            f"but got {acc.num_processes}")
    from accelerate.utils import DistributedType
    from safetensors.torch import load_file

    family = state.family
    _load_checkpoint_file(path, RAW_LORA_FILE, lambda f: family.load_lora_values(load_file(str(f)), copy=copy_into))
    if state.trainable == "all":
        _load_checkpoint_file(path, TRAINABLE_FILE, lambda f: _load_trainable_values(family.transformer, f))
    extra = {"load_module_strict": False} if acc.distributed_type == DistributedType.DEEPSPEED else {}
    try:
        acc.load_state(str(path), **extra)
    except Exception as raised:  # names the folder; accelerate's message names the file
        raise CheckpointError(path, None, "accelerate's load_state (optimizer.bin, scheduler.bin, random_states_*.pkl) "
                              f"failed ({type(raised).__name__}: {raised})") from raised
    if state.fsdp:
        _load_checkpoint_file(path, FSDP_OPTIMIZER_FILE, lambda f: load_optimizer(
            acc.unwrap_model(state.model), state.optimizer, f, acc.is_main_process))
    rank_file = f"trainer_rank{acc.process_index}.pt"
    rank_state = _load_checkpoint_file(path, rank_file, lambda f: torch.load(f, weights_only=True))
    try:
        state.load_rank_state_dict(rank_state)
    except (KeyError, TypeError, ValueError, RuntimeError) as raised:
        raise CheckpointError(path, rank_file, f"unusable trainer state ({type(raised).__name__}: {raised})") \
            from raised
    if state.ema is not None:
        ema_state = _load_checkpoint_file(path, "ema.pt", lambda f: torch.load(f, weights_only=True))
        try:
            state.ema.load_state_dict(ema_state)
        except (KeyError, TypeError, ValueError, RuntimeError) as raised:
            raise CheckpointError(path, "ema.pt", f"unusable EMA state ({type(raised).__name__}: {raised})") \
                from raised
        state.ema.to(acc.device)
    step, history = int(saved["step"]), list(saved["history"])
    if acc.is_main_process:  # forget metrics logged after the checkpoint by the interrupted run
        lines = [json.dumps(r) for r in history]
        write_text_atomic(state.output_dir / "metrics.jsonl", "".join(line + "\n" for line in lines))
    log.info("resumed from %s at step %d", path, step)
    return path, step, history
