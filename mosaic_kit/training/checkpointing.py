"""The trainer's checkpoints: what a ``checkpoints/step-N`` folder holds, how it is written so that
it cannot lie (`mosaic_kit.training.checkpoints`: temporary folder, digest last, rename) and how
a run resumes from it exactly.

A checkpoint holds the trainable weights only (the reference LoRA, or every transformer weight
with ``model.trainable: all``), never the frozen base model, under DDP, DeepSpeed and FSDP alike:
the optimiser, LR schedule and RNG states of every process (accelerate's ``save_state``), the
LoRA for inference (``pytorch_lora_weights.safetensors``, alpha/rank folded in) and for resume
(``lora_parameters.safetensors``), the EMA, the data position and generators of every process
(``trainer_rank{r}.pt``) and the logged history (``trainer_state.json``); under FSDP the
optimiser state is gathered into ``fsdp_optimizer.pt`` (`mosaic_kit.training.fsdp`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .. import check_finite
from ..utils.atomic import write_text_atomic
from ..models import reference_lora_state_dict, save_reference_lora, write_lora_file
from .fsdp import FSDP_OPTIMIZER_FILE, copy_into, full_state, load_optimizer, save_optimizer
from .checkpoints import (
    CHECKPOINT_PREFIX,
    CheckpointError,
    latest_intact_checkpoint,
    list_checkpoints,
    publish_checkpoint,
    remove_checkpoint,
    verify_checkpoint,
    write_checkpoint_digest,
)

if TYPE_CHECKING:
    from torch import nn

    from .trainer import MosaicTrainer

log = logging.getLogger("mosaic_kit.training")

TRAINER_STATE_FILE = "trainer_state.json"
LORA_FILE = "pytorch_lora_weights.safetensors"
EMA_LORA_FILE = "ema_lora_weights.safetensors"
RAW_LORA_FILE = "lora_parameters.safetensors"
TRAINABLE_FILE = "trainable_parameters.safetensors"
"""With ``model.trainable: all``: every trainable transformer weight, by parameter name."""


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


def load_reference_lora_values(transformer: nn.Module, path: Path) -> None:
    """Copies LoRA tensors from a file into the existing adapter (keeps optimiser references).

    Args:
        transformer: the transformer holding the reference LoRA.
        path: a file written by ``write_lora_file(reference_lora_state_dict(transformer), path)``.

    Raises:
        ValueError: when the file's keys are not the model's.
    """
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
            copy_into(params[name], value)


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


def check_state_finite(trainer) -> None:
    """Raises `NonFiniteTrainingError` when a trainable weight (or its EMA) is NaN or inf."""
    trainable = {name: param.detach() for name, param in trainer._transformer().named_parameters() if param.requires_grad}
    for name, param in full_state(trainable).items():  # FSDP: gathered on every process
        try:
            check_finite(name, param, force=True)
        except ValueError as error:
            raise NonFiniteTrainingError(
                f"Refusing to save a checkpoint at step {trainer.step}: {error} The last saved checkpoint "
                f"is left as it was.") from error
    if trainer.ema is not None:
        for index, shadow in enumerate(trainer.ema.shadow_params):
            try:
                check_finite(f"EMA shadow parameter {index}", shadow, force=True)
            except ValueError as error:
                raise NonFiniteTrainingError(
                    f"Refusing to save a checkpoint at step {trainer.step}: {error} The last saved checkpoint "
                    f"is left as it was.") from error


def save_training_checkpoint(trainer: MosaicTrainer) -> Path:
    """Writes ``checkpoints/step-N`` of a `MosaicTrainer` (what `MosaicTrainer.save_checkpoint` runs):
    every process writes its own files into ``checkpoints/.tmp-step-N``, process 0 the LoRA files,
    the EMA and the history, then the digest (last) and renames the folder; old checkpoints beyond
    ``keep_checkpoints`` are removed. Every process calls it.

    Args:
        trainer: a set-up `MosaicTrainer` (its ``step`` names the folder).

    Returns:
        The published folder ``checkpoints/step-N``.

    Raises:
        NonFiniteTrainingError: a trainable weight or its EMA is NaN or inf (nothing is written).
    """
    acc = trainer.accelerator
    root = trainer.output_dir / "checkpoints"
    final = root / f"{CHECKPOINT_PREFIX}{trainer.step:07d}"
    tmp = root / f".tmp-{CHECKPOINT_PREFIX}{trainer.step:07d}"
    check_state_finite(trainer)
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
    torch.save(trainer.rank_state_dict(), tmp / f"trainer_rank{rank}.pt")
    transformer = trainer._transformer()
    if trainer.fsdp:  # every process gathers the LoRA (and the optimiser state); process 0 writes
        gathered = {scaled: full_state(reference_lora_state_dict(transformer, scaled=scaled)) for scaled in (True, False)}
        save_optimizer(acc.unwrap_model(trainer.model), trainer.optimizer, tmp / FSDP_OPTIMIZER_FILE, acc.is_main_process)
    if acc.is_main_process and trainer.fsdp:
        write_lora_file(gathered[True], tmp / LORA_FILE)
        write_lora_file(gathered[False], tmp / RAW_LORA_FILE)
    elif acc.is_main_process:
        save_reference_lora(transformer, tmp / LORA_FILE)  # for inference (alpha/rank folded in)
        write_lora_file(reference_lora_state_dict(transformer), tmp / RAW_LORA_FILE)  # for resume
        if trainer.config.model.trainable == "all":
            _save_trainable_values(transformer, tmp / TRAINABLE_FILE)
        if trainer.ema is not None:
            torch.save(trainer.ema.state_dict(), tmp / "ema.pt")
            trainer._save_ema_lora(tmp / EMA_LORA_FILE)
    acc.wait_for_everyone()
    if acc.is_main_process:
        with open(tmp / TRAINER_STATE_FILE, "w") as handle:
            json.dump({"step": trainer.step, "processes": acc.num_processes, "history": trainer.history}, handle)
        write_checkpoint_digest(tmp)  # fsyncs every file, then the digest, last
        publish_checkpoint(tmp, final)
        for old in list_checkpoints(root)[: -trainer.config.keep_checkpoints]:
            remove_checkpoint(old)
    acc.wait_for_everyone()
    return final


def load_training_checkpoint(trainer: MosaicTrainer, which: str | os.PathLike) -> Path:
    """Restores a `MosaicTrainer` from a checkpoint (what `MosaicTrainer.load_checkpoint` runs):
    process 0 verifies the files against the digest (``"latest"``: the newest intact checkpoint)
    and every process loads the trainable weights, accelerate's states, its generators and data
    position, the EMA and the history. Every process calls it.

    Args:
        trainer: a set-up `MosaicTrainer` with the checkpoint's number of processes.
        which: ``"latest"`` or a checkpoint folder.

    Returns:
        The checkpoint folder used.

    Raises:
        CheckpointError: naming the folder and the file, when it is damaged or cannot be loaded.
    """
    acc = trainer.accelerator
    root = trainer.output_dir / "checkpoints"
    required = (TRAINER_STATE_FILE, RAW_LORA_FILE, *(f"trainer_rank{r}.pt" for r in range(acc.num_processes)))
    if trainer.fsdp:
        required += (FSDP_OPTIMIZER_FILE,)
    if trainer.config.model.trainable == "all":
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
    state = _load_checkpoint_file(path, TRAINER_STATE_FILE, _read_trainer_state)
    if state["processes"] != acc.num_processes:
        raise CheckpointError(
            path, TRAINER_STATE_FILE, f"expected to resume with {state['processes']} processes (the checkpoint's), "
            f"but got {acc.num_processes}")
    from accelerate.utils import DistributedType

    transformer = trainer._transformer()
    _load_checkpoint_file(path, RAW_LORA_FILE, lambda f: load_reference_lora_values(transformer, f))
    if trainer.config.model.trainable == "all":
        _load_checkpoint_file(path, TRAINABLE_FILE, lambda f: _load_trainable_values(transformer, f))
    extra = {"load_module_strict": False} if acc.distributed_type == DistributedType.DEEPSPEED else {}
    try:
        acc.load_state(str(path), **extra)
    except Exception as raised:  # names the folder; accelerate's message names the file
        raise CheckpointError(path, None, "accelerate's load_state (optimizer.bin, scheduler.bin, random_states_*.pkl) "
                              f"failed ({type(raised).__name__}: {raised})") from raised
    if trainer.fsdp:
        _load_checkpoint_file(path, FSDP_OPTIMIZER_FILE, lambda f: load_optimizer(
            acc.unwrap_model(trainer.model), trainer.optimizer, f, acc.is_main_process))
    rank_file = f"trainer_rank{acc.process_index}.pt"
    rank_state = _load_checkpoint_file(path, rank_file, lambda f: torch.load(f, weights_only=True))
    try:
        trainer.load_rank_state_dict(rank_state)
    except (KeyError, TypeError, ValueError, RuntimeError) as raised:
        raise CheckpointError(path, rank_file, f"unusable trainer state ({type(raised).__name__}: {raised})") \
            from raised
    if trainer.ema is not None:
        ema_state = _load_checkpoint_file(path, "ema.pt", lambda f: torch.load(f, weights_only=True))
        try:
            trainer.ema.load_state_dict(ema_state)
        except (KeyError, TypeError, ValueError, RuntimeError) as raised:
            raise CheckpointError(path, "ema.pt", f"unusable EMA state ({type(raised).__name__}: {raised})") \
                from raised
        trainer.ema.to(trainer.device)
    trainer.step = int(state["step"])
    trainer.history = list(state["history"])
    if acc.is_main_process:  # forget metrics logged after the checkpoint by the interrupted run
        lines = [json.dumps(r) for r in trainer.history]
        write_text_atomic(trainer.output_dir / "metrics.jsonl", "".join(line + "\n" for line in lines))
    log.info("resumed from %s at step %d", path, trainer.step)
    return path
