"""`final_barrier`: the last synchronisation of a run keeps its work handle, so the gloo worker
never frees the final collective (and never needs the GIL) while the DDP reducer frees the
process group (the teardown deadlock described in ``mosaic_kit/training/distributed.py``)."""

from __future__ import annotations

from pathlib import Path

from helpers import run_two_process_script

from mosaic_kit.training import final_barrier
from mosaic_kit.training import distributed

SCRIPT = r'''
import os, sys, time, torch, torch.distributed as dist, torch.multiprocessing as mp

def run(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from mosaic_kit.training import distributed
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 4))
    model(torch.randn(2, 4)).sum().backward()
    gathered = [None, None]
    dist.all_gather_object(gathered, {"rank": rank})
    if rank == 0:
        time.sleep(0.5)  # the other process must wait for this one
    start = time.perf_counter()
    ran = distributed.final_barrier()
    waited = time.perf_counter() - start
    kept = distributed._KEPT
    completed = all(work.is_completed() for work in kept)
    del model  # frees the reducer, and with it the last C++ reference to the group
    dist.destroy_process_group()
    with open(f"{out}.{rank}", "w") as handle:
        handle.write(f"{ran} {len(kept)} {completed} {waited:.3f} {sorted(g['rank'] for g in gathered)}")

if __name__ == "__main__":
    mp.spawn(run, args=(int(sys.argv[1]), sys.argv[2]), nprocs=2)
'''


def test_final_barrier_without_a_process_group_does_nothing():
    before = list(distributed._KEPT)
    assert final_barrier() is False
    assert distributed._KEPT == before


def test_final_barrier_synchronises_two_processes_and_keeps_its_work(tmp_path):
    out = tmp_path / "result"
    run_two_process_script(SCRIPT, tmp_path, str(out), timeout=120)
    results = [Path(f"{out}.{rank}").read_text().split(" ", 4) for rank in (0, 1)]
    for ran, kept, completed, waited, gathered in results:
        assert (ran, kept, completed, gathered) == ("True", "1", "True", "[0, 1]")
    assert float(results[1][3]) >= 0.4  # process 1 waited for process 0's sleep
