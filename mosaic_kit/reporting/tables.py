"""Plain-text tables, hardware facts, peak memory and JSON reports: what the benchmarks and recipes print."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from ..utils.atomic import write_text_atomic

__all__ = ["PeakMemory", "format_table", "hardware_info", "run_in_fresh_process", "write_report"]


def format_table(rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table: the first row is the header, columns padded to their widest cell.

    Example:
        >>> print(format_table([["method", "time"], ["dense", "12.5"]]))
        method | time
        -------+-----
        dense  | 12.5
    """
    if not rows:
        raise ValueError("Expected `rows` with at least a header row, but got none.")
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "-+-".join("-" * width for width in widths))
    return "\n".join(lines)


def hardware_info(device: str) -> dict:
    """Python, torch and kornia versions, CPU model, cores, torch threads, and the GPU when
    ``device`` is CUDA: what a benchmark report should state.

    Example:
        >>> info = hardware_info("cpu")
        >>> info["device"], isinstance(info["cores"], int)
        ('cpu', True)
    """
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
    }
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        import kornia

        info["kornia"] = kornia.__version__
    except ImportError:  # kornia is a core dependency; tolerate odd environments
        info["kornia"] = None
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _rss_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not found in /proc/self/status")


class PeakMemory:
    """Peak memory above the level at `start`, in MiB: CUDA's allocator peak on a GPU, the
    process's resident-set high-water mark on a CPU (Linux; reset through ``/proc/self/clear_refs``).

    CPU figures include the allocator's slack, so measure each method in a fresh process.

    Example:
        >>> meter = PeakMemory("cpu")
        >>> meter.start()
        >>> block = torch.ones(4 * 2**20)  # 16 MiB (memory the process already holds is not counted)
        >>> isinstance(meter.peak(), float)
        True
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.base = 0.0

    def start(self) -> None:
        """Resets the high-water mark and records the current level."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device) / 2**20
        else:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
            self.base = _rss_mib("VmRSS")

    def peak(self) -> float:
        """MiB above the level at `start`."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) / 2**20 - self.base
        return _rss_mib("VmHWM") - self.base


def run_in_fresh_process(script: str | os.PathLike, args: Sequence[str]) -> dict:
    """Runs ``python script *args`` in a fresh process and returns the JSON object its last output
    line holds: how the benchmarks measure each method without another one's memory around.

    Small allocations are kept out of glibc's arenas (``MALLOC_MMAP_THRESHOLD_``) so that freed
    memory leaves the resident set and the peak of one measurement does not hide the next.

    Args:
        script: the Python file to run.
        args: its command-line arguments.

    Returns:
        The parsed last line of its standard output.

    Raises:
        RuntimeError: if the process fails (with the end of its standard error).

    Example:
        >>> import tempfile
        >>> path = Path(tempfile.mkdtemp()) / "worker.py"
        >>> _ = path.write_text("import json, sys; print(json.dumps({'args': sys.argv[1:]}))")
        >>> run_in_fresh_process(path, ["a", "b"])
        {'args': ['a', 'b']}
    """
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {list(args)} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def write_report(report: dict, path: str | os.PathLike) -> Path:
    """Writes a benchmark report as indented JSON (creating the folder) and says where.

    Example:
        >>> import tempfile
        >>> out = write_report({"ok": True}, Path(tempfile.mkdtemp()) / "sub" / "r.json")  # doctest: +ELLIPSIS
        <BLANKLINE>
        wrote .../sub/r.json
        >>> json.loads(out.read_text())
        {'ok': True}
    """
    path = write_text_atomic(path, json.dumps(report, indent=2))
    print(f"\nwrote {path}")
    return path
