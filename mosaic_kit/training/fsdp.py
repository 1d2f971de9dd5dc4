"""FSDP for the trainer: torch's FSDP2 (``fully_shard``) with every ``nn.Linear`` its own unit.

The multi-reference forward calls each block's submodules once per stream (target, text, each
reference) rather than the block's ``forward``, so a unit around a whole block would never be
gathered. With one unit per linear layer (the base layer and the LoRA's ``lora_A`` / ``lora_B``
alike) every weight is gathered exactly when it is used; the remaining weights (norms,
embeddings) belong to the root unit, gathered for the whole forward. Forward and gradients are
then exactly those of the unsharded model (``tests/training/test_fsdp.py``).

Checkpoints stay LoRA-only: the trainable weights are gathered with ``DTensor.full_tensor`` (a
LoRA is small), the optimiser state is saved as one full state dict by process 0
(``torch.distributed.checkpoint.state_dict``) and scattered back on resume, so a run resumes
exactly; the frozen base model is never gathered nor written.
"""

from __future__ import annotations

from pathlib import Path

import torch

FSDP_OPTIMIZER_FILE = "fsdp_optimizer.pt"
"""The full optimiser state of an FSDP run (written by process 0, LoRA parameters only)."""


def single_process_group(device_type: str) -> bool:
    """Starts a process group of one process (rank 0, world size 1) when none exists, so that
    ``fsdp: true`` runs under a plain ``python`` as under ``accelerate launch`` with one process.

    The group rendezvous in memory (a ``HashStore``: no address, port or environment variables).
    The trainer's run ends with accelerate's ``end_training``, which destroys it as it destroys a
    launcher's.

    Args:
        device_type: ``"cpu"`` (gloo) or ``"cuda"`` (nccl).

    Returns:
        True when a group was started, False when one existed already.

    Raises:
        ValueError: on another ``device_type``.

    Example:
        >>> import torch.distributed as dist
        >>> single_process_group("cpu"), dist.get_world_size()
        (True, 1)
        >>> single_process_group("cpu")  # one exists now
        False
        >>> dist.destroy_process_group()
    """
    dist = torch.distributed
    backends = {"cpu": "gloo", "cuda": "nccl"}
    if device_type not in backends:
        raise ValueError(f"Expected `device_type` to be one of {sorted(backends)}, but got {device_type!r}.")
    if dist.is_initialized():
        return False
    dist.init_process_group(backends[device_type], store=dist.HashStore(), rank=0, world_size=1)
    return True


def shard_linear_units(model: torch.nn.Module, device_type: str, world_size: int) -> torch.nn.Module:
    """Shards ``model`` in place with FSDP2: every ``nn.Linear`` its own unit, the rest the root.

    Args:
        model: the module to shard (its parameters on ``device_type``).
        device_type: ``"cpu"`` (gloo) or ``"cuda"`` (nccl).
        world_size: the number of processes sharing the model. Several need the launcher's
            process group; one process without a group gets one (`single_process_group`).

    Returns:
        ``model`` (now an FSDP module: its parameters are ``DTensor`` shards outside the forward).

    Raises:
        ValueError: ``world_size`` above 1 without a process group, or a group of another size.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist = torch.distributed
    if not dist.is_initialized():
        if world_size != 1:
            raise ValueError(f"Expected a process group of {world_size} processes (started by `accelerate launch`), "
                             "but none is initialised.")
        single_process_group(device_type)
    elif dist.get_world_size() != world_size:
        raise ValueError(f"Expected a process group of {world_size} processes, but the initialised one has "
                         f"{dist.get_world_size()}.")
    mesh = init_device_mesh(device_type, (world_size,))
    linears = [module for module in model.modules() if isinstance(module, torch.nn.Linear)]
    for module in reversed(linears):  # bottom-up, as FSDP2 expects
        fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (an FSDP2 shard)."""
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with every ``DTensor`` gathered into a plain tensor (a collective: every process
    must call it with the same keys); plain tensors pass through."""
    return {key: value.full_tensor() if is_sharded(value) else value for key, value in state.items()}


def copy_into(param: torch.Tensor, value: torch.Tensor) -> None:
    """``param.copy_(value)`` where ``param`` may be an FSDP2 shard of the full ``value`` (every
    process holds the same full ``value``; each keeps its own shard)."""
    value = value.to(device=param.device, dtype=param.dtype)
    if is_sharded(param):
        from torch.distributed.tensor import distribute_tensor

        value = distribute_tensor(value, param.device_mesh, param.placements)
    param.copy_(value)


def save_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, path: Path, is_main: bool) -> None:
    """Gathers the optimiser state of a sharded ``model`` (every process calls this) and writes it,
    from process 0, to ``path`` as a full state dict."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    state = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if is_main:
        torch.save(state, path)


def load_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, path: Path, is_main: bool) -> None:
    """Reads a full optimiser state written by `save_optimizer` on process 0 and scatters it into
    the sharded optimiser of every process (every process calls this)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    state = torch.load(path, weights_only=True) if is_main else {}
    # strict=False: a LoRA weight that never received a gradient (e.g. the last block's reference
    # queries) has no optimiser state, in the saved run as in the resumed one
    set_optimizer_state_dict(model, optimizer, state,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False))
