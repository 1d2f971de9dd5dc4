"""Benchmark: released-style dense attention capture vs `RefTargetCapture`.

Both methods get the same inputs (per block: reference queries and target keys, as leaf tensors,
i.e. the activations a model holds anyway) and compute the same loss with the released settings
(SCAL pooled with eps 1e-9, weight 0.1; MDL as Jensen-Shannon over all tokens, weight 1.0), then
run backward. Reported: peak memory above the inputs during forward + backward, and time, as the
median of several runs; and the ratios. Peak memory is measured twice: with the gradients of the
queries and keys kept (leaf ``.grad``, as in a plain benchmark) and with each of them consumed as
soon as it is produced (as inside a model, where it flows on into the block's own backward); the
second is what the capture itself costs.

- ``released``: per block and reference, the head-averaged softmax over target keys is kept for
  the loss (autograd also keeps the per-head probabilities); SCAL is a per-point Python loop;
  MDL is JSD over the rows of all tokens.
- ``mosaic_kit``: `RefTargetCapture(aggregate="all")` + `scal` + `mdl` with the same settings.
- ``mosaic_kit-points``: the paper's settings (per-ref SCAL, symmetric KL over point rows).

With checkpointing (``--checkpointing on``, part of the default ``both``) the same methods run
as in training with diffusers' ``enable_gradient_checkpointing()``: each block is a function
checkpointed with ``torch.utils.checkpoint(..., use_reentrant=False)`` that projects the block's
input tokens (a leaf, which checkpointing keeps) to the reference queries and target keys and
feeds the capture inside; the checkpoint frees the queries and keys and recomputes them in
backward. The released-style capture then keeps its head-averaged maps across blocks (they are
outputs the loss needs) and recomputes one block's per-head probabilities at a time; it ignores
the recomputation's second call, as `RefTargetCapture` does (the released code would append the
maps again), so the comparison is fair to it.

A second table times SCAL alone (forward + backward) on one dense map with many points: the
released per-point loop against the vectorised `scal`.

Each measurement runs in a fresh subprocess so that peak memory is not polluted by another
method. On CPU the peak is the process's resident-set high-water mark (reset through
``/proc/self/clear_refs``) above the resident size before the step; on CUDA it is
``torch.cuda.max_memory_allocated`` above the allocated memory before the step.

Usage::

    python benchmarks/bench_capture.py                      # small CPU default (checkpointing off and on)
    python benchmarks/bench_capture.py --preset flux-1024   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

PRESETS = {
    # name: blocks, heads, head dim, target tokens, reference tokens each, references, points per ref, dtype
    "tiny": dict(blocks=2, heads=2, dim=8, tgt_tokens=64, ref_tokens=16, refs=3, points=8, dtype="float32"),
    "cpu": dict(blocks=4, heads=8, dim=64, tgt_tokens=1024, ref_tokens=256, refs=4, points=64, dtype="float32"),
    "flux-512": dict(blocks=19, heads=24, dim=128, tgt_tokens=1024, ref_tokens=1024, refs=4, points=256, dtype="bfloat16"),
    "flux-1024": dict(blocks=19, heads=24, dim=128, tgt_tokens=4096, ref_tokens=1024, refs=4, points=256, dtype="bfloat16"),
}
METHODS = ("released", "mosaic_kit", "mosaic_kit-points")


@dataclass
class Measurement:
    method: str
    peak_mib: float
    peak_consumed_mib: float
    time_ms: float
    loss: float
    runs: int


# ---------------------------------------------------------------------------------------- worker
def _inputs(cfg: dict, device, seed: int = 0):
    import torch

    from mosaic_kit.correspondence import Correspondences

    rng = random.Random(seed)
    refs, n_ref, n_tgt, points = cfg["refs"], cfg["ref_tokens"], cfg["tgt_tokens"], cfg["points"]
    targets = rng.sample(range(n_tgt), min(n_tgt, refs * points))  # disjoint across references (eq. 2)
    dicts = []
    for k in range(refs):
        us = rng.sample(range(n_ref), points)
        vs = [targets[(k * points + j) % len(targets)] for j in range(points)]
        dicts.append(dict(zip(us, vs)))
    corr = Correspondences.from_dicts([dicts], [n_ref] * refs, n_tgt)
    dtype = getattr(torch, cfg["dtype"])
    g = torch.Generator(device="cpu").manual_seed(seed)
    queries, keys = [], []
    for _ in range(cfg["blocks"]):
        queries.append(torch.randn(1, cfg["heads"], refs * n_ref, cfg["dim"], generator=g).to(device, dtype).requires_grad_())
        keys.append(torch.randn(1, cfg["heads"], n_tgt, cfg["dim"], generator=g).to(device, dtype).requires_grad_())
    return dicts, corr, queries, keys


class ReleasedStyleCapture:
    """The released code's capture, restated: per block and reference, the head-averaged softmax
    over the target keys is kept for the loss (in the model dtype).

    A call during a backward pass (a non-reentrant checkpoint's recomputation) runs the same ops,
    so that the checkpoint recomputes its saved tensors, but keeps nothing."""

    def __init__(self, ref_tokens):
        self.ref_tokens = list(ref_tokens)
        self.maps = [[] for _ in self.ref_tokens]

    def add(self, q, k):
        import torch

        replay = torch._C._current_graph_task_id() != -1
        scale = q.shape[-1] ** -0.5
        offset = 0
        for ref, n in enumerate(self.ref_tokens):
            logits = q[:, :, offset : offset + n] @ k.transpose(-1, -2) * scale  # in the model dtype
            probs = logits.softmax(dim=-1).mean(dim=1)[0]  # (n, N_tgt), kept for the loss
            if not replay:
                self.maps[ref].append(probs)
            offset += n

    def loss(self, dicts, scal_weight=0.1, mdl_weight=1.0):
        """SCAL as a per-point loop, MDL as JSD over the rows of all tokens (released settings)."""
        import torch

        attn = [torch.stack(m).to(torch.promote_types(m[0].dtype, torch.float32)).mean(0) for m in self.maps]
        scal_value, count = 0.0, 0
        for ref, pairs in enumerate(dicts):
            for u, v in pairs.items():
                scal_value = scal_value - torch.log(attn[ref][u, v] + 1e-9)
                count += 1
        scal_value = scal_value / count
        rows = [a.mean(0) for a in attn]
        rows = [r / r.sum() for r in rows]
        mdl_value, pairs_seen = 0.0, 0
        for i in range(len(rows)):
            for j in range(len(rows)):
                if i == j:
                    continue
                mid = 0.5 * (rows[i] + rows[j])
                jsd = 0.5 * (rows[i] * (torch.log(rows[i] + 1e-8) - torch.log(mid + 1e-8))).sum() + 0.5 * (
                    rows[j] * (torch.log(rows[j] + 1e-8) - torch.log(mid + 1e-8))
                ).sum()
                mdl_value = mdl_value - jsd
                pairs_seen += 1
        mdl_value = mdl_value / max(pairs_seen, 1)
        return scal_weight * scal_value + mdl_weight * mdl_value


def released_style_loss(dicts, ref_tokens, queries, keys, scal_weight=0.1, mdl_weight=1.0):
    """The released code's capture and losses, restated: dense maps kept per block and reference."""
    capture = ReleasedStyleCapture(ref_tokens)
    for q, k in zip(queries, keys):
        capture.add(q, k)
    return capture.loss(dicts, scal_weight, mdl_weight)


def mosaic_capture(corr, paper: bool):
    from mosaic_kit.attention import RefTargetCapture

    return RefTargetCapture(corr, aggregate="points" if paper else "all")


def mosaic_terms(capture, corr, paper: bool):
    from mosaic_kit.losses.functional import mdl, scal

    out = capture.result()
    if paper:
        return 0.4 * scal(out, corr) + 0.6 * mdl(out, corr)
    return 0.1 * scal(out, corr, reduction="pooled", eps=1e-9) + 1.0 * mdl(out, corr, divergence="jsd")


def mosaic_loss(corr, queries, keys, paper: bool):
    capture = mosaic_capture(corr, paper)
    for q, k in zip(queries, keys):
        capture.add(q, k)
    return mosaic_terms(capture, corr, paper)


def _block_inputs(cfg: dict, device, seed: int = 0):
    """Per block: input tokens ``(1, N_ref_total + N_tgt, H·D)`` and the q and k projections,
    as leaves (what a checkpointed model keeps: block inputs and weights)."""
    import torch

    dtype = getattr(torch, cfg["dtype"])
    width = cfg["heads"] * cfg["dim"]
    tokens = cfg["refs"] * cfg["ref_tokens"] + cfg["tgt_tokens"]
    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    hidden, weights = [], []
    for _ in range(cfg["blocks"]):
        hidden.append(torch.randn(1, tokens, width, generator=g).to(device, dtype).requires_grad_())
        for _ in range(2):
            weights.append((torch.randn(width, width, generator=g) * width**-0.5).to(device, dtype).requires_grad_())
    return hidden, weights


def checkpointed_loss(method: str, cfg: dict, dicts, corr, hidden, weights):
    """The loss with every block's capture feed inside a non-reentrant checkpoint."""
    from torch.utils.checkpoint import checkpoint

    heads, dim, n_ref = cfg["heads"], cfg["dim"], cfg["refs"] * cfg["ref_tokens"]
    paper = method == "mosaic_kit-points"
    capture = ReleasedStyleCapture(corr.ref_tokens) if method == "released" else mosaic_capture(corr, paper)

    def block(tokens, to_q, to_k):
        q = (tokens[:, :n_ref] @ to_q).view(1, n_ref, heads, dim).transpose(1, 2)  # (1, H, N_ref_total, D)
        k = (tokens[:, n_ref:] @ to_k).view(1, -1, heads, dim).transpose(1, 2)  # (1, H, N_tgt, D)
        capture.add(q, k)

    for index, tokens in enumerate(hidden):
        checkpoint(block, tokens, weights[2 * index], weights[2 * index + 1], use_reentrant=False)
    if method == "released":
        return capture.loss(dicts)
    return mosaic_terms(capture, corr, paper)


def _worker(method: str, cfg: dict, device_name: str, repeats: int, checkpointing: bool = False) -> Measurement:
    import torch

    torch.manual_seed(0)
    device = torch.device(device_name)
    dicts, corr, queries, keys = _inputs(cfg, device)
    if checkpointing:  # the leaves are the blocks' input tokens and projections instead
        del queries, keys
        corr = corr.to(device)
        hidden, weights = _block_inputs(cfg, device)
        leaves = hidden + weights
    else:
        leaves = queries + keys
    from mosaic_kit.reporting import PeakMemory

    memory = PeakMemory(device)
    consume = {"on": False}

    def drop_grad(tensor):
        if consume["on"]:
            tensor.grad = None

    for tensor in leaves:
        tensor.register_post_accumulate_grad_hook(drop_grad)
    results: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    loss_value = math.nan
    for run in range(2 * (repeats + 1)):  # per policy, the first run warms up
        consume["on"] = run % 2 == 1
        for t in leaves:
            t.grad = None
        memory.start()
        start = time.perf_counter()
        if checkpointing:
            loss = checkpointed_loss(method, cfg, dicts, corr, hidden, weights)
        elif method == "released":
            loss = released_style_loss(dicts, corr.ref_tokens, queries, keys)
        else:
            loss = mosaic_loss(corr, queries, keys, paper=method == "mosaic_kit-points")
        loss.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        peak = memory.peak()
        loss_value = float(loss.detach())
        del loss
        if run >= 2:
            results[consume["on"]].append((peak, elapsed * 1e3))
    kept, consumed = results[False], results[True]
    return Measurement(
        method,
        peak_mib=statistics.median(p for p, _ in kept),
        peak_consumed_mib=statistics.median(p for p, _ in consumed),
        time_ms=statistics.median(t for _, t in kept + consumed),
        loss=loss_value,
        runs=repeats,
    )


def _scal_worker(points_total: int, device_name: str, repeats: int) -> dict:
    """SCAL alone, forward + backward, on one dense map: per-point loop vs vectorised."""
    import torch

    from mosaic_kit.correspondence import Correspondences
    from mosaic_kit.losses.functional import scal

    rng = random.Random(0)
    refs, n_ref, n_tgt = 4, 1024, 256
    per_ref = points_total // refs
    dicts = [{u: rng.randrange(n_tgt) for u in rng.sample(range(n_ref), per_ref)} for _ in range(refs)]
    corr = Correspondences.from_dicts([dicts], [n_ref] * refs, n_tgt).to(device_name)
    dense = torch.rand(1, refs * n_ref, n_tgt, device=device_name).softmax(-1).requires_grad_()

    def loop():
        total, count = 0.0, 0
        for k, pairs in enumerate(dicts):
            block = dense[0, k * n_ref : (k + 1) * n_ref]
            for u, v in pairs.items():
                total = total - torch.log(block[u, v] + 1e-9)
                count += 1
        return total / count

    def vectorised():
        return scal(dense, corr, reduction="pooled", eps=1e-9)

    result = {}
    for name, fn in (("loop", loop), ("vectorised", vectorised)):
        times, value = [], math.nan
        # The loop is slow (one autograd node and one full-size gradient per point): at most 3 runs.
        for run in range((min(repeats, 3) if name == "loop" else repeats) + 1):
            dense.grad = None
            start = time.perf_counter()
            loss = fn()
            loss.backward()
            if dense.is_cuda:
                torch.cuda.synchronize()
            if run:
                times.append((time.perf_counter() - start) * 1e3)
            value = float(loss)
        result[name] = {"time_ms": statistics.median(times), "loss": value}
    result["points"] = per_ref * refs
    return result


# ---------------------------------------------------------------------------------------- parent
def _run_worker(args: list[str]) -> dict:
    from mosaic_kit.reporting import run_in_fresh_process

    return run_in_fresh_process(__file__, args)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="problem size (default: cpu)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda when available)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per method after one warm-up (median)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {METHODS}")
    parser.add_argument("--checkpointing", choices=("off", "on", "both"), default="both",
                        help="feed the capture inside non-reentrant checkpointed blocks: off, on or both tables (default)")
    parser.add_argument("--scal-points", type=int, default=3072, help="points of the SCAL-only timing (0: skip)")
    parser.add_argument("--out", type=Path, default=None, help="JSON output (default: benchmarks/results/capture-<preset>.json)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    import torch

    from mosaic_kit.reporting import format_table, hardware_info, write_report

    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device)
    cfg = PRESETS[args.preset]
    if args.worker:
        torch.set_num_threads(1)  # one thread per measurement (shared machines; comparable times)
    if args.worker == "scal":
        print(json.dumps(_scal_worker(args.scal_points, device, args.repeats)))
        return {}
    if args.worker:
        print(json.dumps(asdict(_worker(args.worker, cfg, device, args.repeats, args.checkpointing == "on"))))
        return {}

    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(METHODS)
    if unknown:
        parser.error(f"--methods: unknown {sorted(unknown)}; choose from {METHODS}")
    print(f"bench_capture: preset {args.preset} {cfg} on {device}, median of {args.repeats} runs", flush=True)
    common = ["--preset", args.preset, "--device", device, "--repeats", str(args.repeats)]
    report = {"preset": args.preset, "config": cfg, "hardware": hardware_info(device), "repeats": args.repeats,
              "worker_threads": 1}
    settings = {"off": [False], "on": [True], "both": [False, True]}[args.checkpointing]
    for checkpointing in settings:
        flag = ["--checkpointing", "on" if checkpointing else "off"]
        results = {m: _run_worker(["--worker", m, *common, *flag]) for m in methods}
        suffix = "_checkpointing" if checkpointing else ""
        report["capture" + suffix] = results
        print()
        print("with non-reentrant checkpointing (each block's feed inside torch.utils.checkpoint):" if checkpointing
              else "without checkpointing (queries and keys are leaves):")
        ratios = _print_table(results)
        if ratios is not None:
            report["ratios" + suffix] = ratios

    if args.scal_points:
        scal_result = _run_worker(["--worker", "scal", "--scal-points", str(args.scal_points), *common])
        ratio = scal_result["loop"]["time_ms"] / scal_result["vectorised"]["time_ms"]
        scal_result["speed_ratio"] = ratio
        print()
        print(format_table([
            ["SCAL fwd+bwd", "points", "time (ms)", "speed ratio"],
            ["released loop", str(scal_result["points"]), f"{scal_result['loop']['time_ms']:.2f}", "1.00x"],
            ["mosaic_kit scal", str(scal_result["points"]), f"{scal_result['vectorised']['time_ms']:.3f}", f"{ratio:.0f}x"],
        ]))
        report["scal"] = scal_result
    write_report(report, args.out or Path(__file__).parent / "results" / f"capture-{args.preset}.json")
    return report


def _print_table(results: dict) -> dict | None:
    """Prints one table of measurements; returns the ratios against ``released`` (None without it)."""
    from mosaic_kit.reporting import format_table

    base = results.get("released")
    rows = [["method", "peak MiB (grads kept)", "ratio", "peak MiB (grads consumed)", "ratio", "time (ms)", "speed ratio", "loss"]]
    for m, r in results.items():
        kept = f"{base['peak_mib'] / max(r['peak_mib'], 1e-3):.1f}x" if base else "-"
        consumed = f"{base['peak_consumed_mib'] / max(r['peak_consumed_mib'], 1e-3):.1f}x" if base else "-"
        speed = f"{base['time_ms'] / r['time_ms']:.2f}x" if base else "-"
        rows.append([m, f"{r['peak_mib']:.1f}", kept, f"{r['peak_consumed_mib']:.1f}", consumed,
                     f"{r['time_ms']:.1f}", speed, f"{r['loss']:.6f}"])
    print(format_table(rows))
    if not base:
        return None
    if "mosaic_kit" in results:
        diff = abs(results["mosaic_kit"]["loss"] - base["loss"]) / max(abs(base["loss"]), 1e-12)
        print(f"released-settings loss, mosaic_kit vs released-style: relative difference {diff:.2e}")
    return {
        m: {
            "memory": base["peak_mib"] / max(r["peak_mib"], 1e-3),
            "memory_grads_consumed": base["peak_consumed_mib"] / max(r["peak_consumed_mib"], 1e-3),
            "speed": base["time_ms"] / r["time_ms"],
        }
        for m, r in results.items()
        if m != "released"
    }


if __name__ == "__main__":
    main()
