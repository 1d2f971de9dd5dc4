"""Ending a distributed run without torch's gloo teardown deadlock.

A gloo worker thread frees each finished collective while it holds the group's work mutex, and
freeing a collective's tensors takes the GIL. A DDP model's C++ ``Reducer`` holds the process
group, and pybind11 frees it *with the GIL held*: if it drops the last reference,
``~ProcessGroupGloo`` waits there for that mutex. When the trainer is released right after the
last collective, the worker (freeing the final barrier, which keeps the allgather before it
alive) waits for the GIL and the main thread waits for the mutex, for ever. It happened in about
one two-process CPU run in ten, after ``summary.json`` was written (``py-spy`` stacks: main
thread in ``~Reducer`` → ``~ProcessGroupGloo`` → ``pthread_mutex_lock``; worker in ``runLoop``
→ ``~AsyncBarrierWork`` → ``gil_scoped_acquire``; upstream: pytorch/pytorch#56297).

`final_barrier` ends a run with a barrier whose work handle Python keeps until the interpreter
exits. The worker's references to it (and, through it, to every collective still in flight when
it was queued) are then never the last ones, so after the barrier the worker never needs the GIL
again and the group can be freed from any thread. Keeping the process group itself alive instead
is not enough: the worker may still be waiting for the GIL when the interpreter finalizes, and
is then killed inside a destructor (``terminate called without an active exception``).
"""

from __future__ import annotations

import torch

_KEPT: list = []


def final_barrier() -> bool:
    """Synchronises every process one last time, safely for the process group's teardown.

    Call it after the run's last collective and before the models (and their DDP reducers) are
    released, in place of ``accelerator.wait_for_everyone()``: at the end of a run, and where every
    process has agreed to stop with an error (`MosaicTrainer` does both). Does nothing without a process
    group or with a single process.

    Returns:
        True when a barrier ran (a distributed run), False otherwise.

    Example:
        >>> final_barrier()  # a single process without a process group: nothing to synchronise
        False
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return False
    work = dist.barrier(async_op=True)
    work.wait()
    _KEPT.append(work)  # freed at exit by this thread, never by the gloo worker
    return True
