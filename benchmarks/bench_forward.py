"""Per-step time and peak memory of the multi-reference FLUX forward, K = 1…6.

Compared in the same run, on one random-weight FLUX-architecture transformer with the reference
LoRA:

- ``released``: released-style attention, one attention call per stream (text, target, then each
  reference over its own copied concatenation ``[text, target, reference k]`` of keys);
- ``mosaic``: `MosaicFluxTransformer` (two attention calls per block whatever K);
- ``mosaic-cache``: the reference KV-cache mode (inference only; the one-time cache build is
  reported separately).

Inference steps run without gradients. Training steps run forward + backward into the LoRA
(flow-matching MSE), without and with the MOSAIC losses: ``released`` keeps the released dense
per-reference attention maps of every double block for SCAL + MDL; ``mosaic`` feeds
`RefTargetCapture`. Both with the released loss settings (SCAL 0.1 pooled, MDL 1.0 Jensen–Shannon
over all tokens) so the two losses compute the same value.

Only the attention layout differs between ``released`` and ``mosaic`` here; the released code
also projects each reference as a separate stream (more, smaller matmuls), which this benchmark
does not charge it for, so the ratios are conservative.

Each measurement runs in a fresh process (CPU peak memory is the resident-set high-water mark).
Presets: ``cpu`` (a small transformer, 256² target and references, float32) and ``flux-512``
(FLUX.1-dev architecture, 19 + 38 blocks, bf16, 512² target and references, 512 text tokens;
needs a GPU with ~60 GB for training steps at K = 6).

    python benchmarks/bench_forward.py                      # cpu preset
    python benchmarks/bench_forward.py --preset flux-512    # on a GPU
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

PRESETS = {
    "tiny": {
        "transformer": {"num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16, "num_attention_heads": 2,
                        "in_channels": 64, "joint_attention_dim": 32, "pooled_projection_dim": 32,
                        "axes_dims_rope": (4, 6, 6), "guidance_embeds": True},
        "size": 64, "ref_size": 64, "text_tokens": 8, "dtype": "float32", "rank": 4, "points": 4,
    },
    "cpu": {
        "transformer": {"num_layers": 2, "num_single_layers": 4, "attention_head_dim": 32, "num_attention_heads": 4,
                        "in_channels": 64, "joint_attention_dim": 64, "pooled_projection_dim": 64,
                        "axes_dims_rope": (8, 12, 12), "guidance_embeds": True},
        "size": 256, "ref_size": 256, "text_tokens": 32, "dtype": "float32", "rank": 16, "points": 32,
    },
    "flux-512": {
        "transformer": {"num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
                        "num_attention_heads": 24, "in_channels": 64, "joint_attention_dim": 4096,
                        "pooled_projection_dim": 768, "axes_dims_rope": (16, 56, 56), "guidance_embeds": True},
        "size": 512, "ref_size": 512, "text_tokens": 512, "dtype": "bfloat16", "rank": 128, "points": 256,
    },
}
METHODS = ("released", "mosaic", "mosaic-cache")
MODES = ("infer", "train", "train+losses")


def _released_processor_class():
    from mosaic_kit.models import MosaicFluxAttnProcessor

    class ReleasedStyleProcessor(MosaicFluxAttnProcessor):
        """One attention call per stream over concatenated keys, as the released code does."""

        def attend_streams(self, attend, q_main, k_main, v_main, q_ref, k_ref, v_ref, mosaic):
            import torch

            n_txt = mosaic.text_tokens
            keys = torch.cat([k_main, k_ref], dim=1)
            values = torch.cat([v_main, v_ref], dim=1)
            main_out = torch.cat([attend(q_main[:, :n_txt], keys, values), attend(q_main[:, n_txt:], keys, values)], 1)
            outs, start = [], 0
            for n in mosaic.reference_token_counts:
                own = slice(start, start + n)
                outs.append(attend(q_ref[:, own], torch.cat([k_main, k_ref[:, own]], 1), torch.cat([v_main, v_ref[:, own]], 1)))
                start += n
            return main_out, torch.cat(outs, dim=1)

    return ReleasedStyleProcessor


class DenseCapture:
    """Released-style capture: keeps every block's queries and keys and builds the dense
    per-reference maps for the loss (what the released code keeps)."""

    def __init__(self):
        self.queries, self.keys = [], []

    def add(self, query, key):
        self.queries.append(query)
        self.keys.append(key)


def released_losses(dicts, counts, queries, keys):
    """SCAL (pooled, log(p + 1e-9), weight 0.1) + MDL (JSD over all tokens, weight 1) on dense maps."""
    import torch

    maps = [[] for _ in counts]
    for q, k in zip(queries, keys):
        offset = 0
        for ref, n in enumerate(counts):
            logits = q[:, :, offset : offset + n] @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
            maps[ref].append(logits.softmax(dim=-1).mean(dim=1)[0])
            offset += n
    attn = [torch.stack(m).float().mean(0) for m in maps]
    scal = -torch.cat([torch.log(attn[r][list(d), list(d.values())] + 1e-9) for r, d in enumerate(dicts)]).mean()
    rows = [a.mean(0) for a in attn]
    rows = [r / r.sum() for r in rows]
    mdl, pairs = 0.0, 0
    for i in range(len(rows)):
        for j in range(len(rows)):
            if i != j:
                mid = 0.5 * (rows[i] + rows[j])
                jsd = 0.5 * (rows[i] * ((rows[i] + 1e-8).log() - (mid + 1e-8).log())).sum()
                jsd = jsd + 0.5 * (rows[j] * ((rows[j] + 1e-8).log() - (mid + 1e-8).log())).sum()
                mdl, pairs = mdl - jsd, pairs + 1
    return 0.1 * scal + 1.0 * (mdl / max(pairs, 1))


def _worker(method: str, mode: str, refs: int, cfg: dict, device_name: str, repeats: int) -> dict:
    import torch

    from mosaic_kit.attention import RefTargetCapture
    from mosaic_kit.correspondence import Correspondences
    from mosaic_kit.losses.functional import mdl, scal
    from mosaic_kit.models import MosaicFluxTransformer, add_reference_lora
    from mosaic_kit.models.testing import random_packed_inputs, tiny_flux_transformer
    from mosaic_kit.reporting import PeakMemory

    device = torch.device(device_name)
    dtype = getattr(torch, cfg["dtype"])
    transformer = tiny_flux_transformer(seed=0, **cfg["transformer"])
    add_reference_lora(transformer, rank=cfg["rank"])
    transformer.to(device, dtype)
    model = MosaicFluxTransformer(transformer)
    if method == "released":
        transformer.set_attn_processor(_released_processor_class()())
    if mode != "infer" and device.type == "cuda":
        transformer.enable_gradient_checkpointing()
    size, ref_size = cfg["size"], cfg["ref_size"]
    inputs = random_packed_inputs(transformer, 1, (size, size), [(ref_size, ref_size)] * refs, cfg["text_tokens"],
                                  dtype=dtype)
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    n_ref, n_tgt = (ref_size // 16) ** 2, (size // 16) ** 2
    rng = random.Random(0)
    targets = rng.sample(range(n_tgt), min(n_tgt, refs * cfg["points"]))
    dicts = [dict(zip(rng.sample(range(n_ref), cfg["points"]), targets[k::refs][: cfg["points"]])) for k in range(refs)]
    corr = Correspondences.from_dicts([dicts], [n_ref] * refs, n_tgt)
    noise = torch.randn_like(inputs["target_tokens"])
    memory = PeakMemory(device)

    def step():
        if mode == "infer":
            with torch.no_grad():
                if method == "mosaic-cache":
                    main = {k: v for k, v in inputs.items() if not k.startswith("reference_")}
                    return model(**main, reference_cache=cache)
                return model(**inputs)
        capture = None
        if mode == "train+losses":
            capture = DenseCapture() if method == "released" else RefTargetCapture(corr, aggregate="all")
        out = model(**inputs, capture=capture)
        loss = (out.float() - noise.float()).square().mean()
        if mode == "train+losses":
            if method == "released":
                loss = loss + released_losses(dicts, [n_ref] * refs, capture.queries, capture.keys)
            else:
                result = capture.result()
                loss = loss + 0.1 * scal(result, corr, reduction="pooled", eps=1e-9) + mdl(result, corr, divergence="jsd")
        loss.backward()
        for p in transformer.parameters():
            p.grad = None
        return loss

    cache, build_ms = None, None
    if method == "mosaic-cache":
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        start = time.perf_counter()
        cache = model.build_reference_cache(inputs["reference_tokens"], inputs["reference_ids"],
                                            inputs["pooled_embeddings"], inputs["reference_token_counts"],
                                            guidance=inputs["guidance"], reference_guidance=1.0)
        sync()
        build_ms = (time.perf_counter() - start) * 1e3
    step()  # warm-up
    times, peaks = [], []
    for _ in range(repeats):
        memory.start()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
        peaks.append(memory.peak())
    return {"method": method, "mode": mode, "refs": refs, "time_ms": statistics.median(times),
            "peak_mib": statistics.median(peaks), "cache_build_ms": build_ms, "repeats": repeats}


def _run_worker(args: list[str]) -> dict:
    from mosaic_kit.reporting import run_in_fresh_process

    return run_in_fresh_process(__file__, args)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--refs", default="1,2,3,4,5,6", help="comma-separated K values")
    parser.add_argument("--modes", default=",".join(MODES), help=f"subset of {MODES}")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up (median)")
    parser.add_argument("--out", type=Path, default=None, help="JSON (default: benchmarks/results/forward-<preset>.json)")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    import torch

    from mosaic_kit.reporting import format_table, hardware_info, write_report

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = PRESETS[args.preset]
    if args.worker:
        method, mode, refs = args.worker
        print(json.dumps(_worker(method, mode, int(refs), cfg, device, args.repeats)))
        return {}

    ks = [int(k) for k in args.refs.split(",") if k]
    modes = [m for m in args.modes.split(",") if m]
    if not ks or any(k < 1 for k in ks) or set(modes) - set(MODES):
        parser.error(f"--refs needs positive ints and --modes a subset of {MODES}")
    results = []
    for mode in modes:
        for k in ks:
            for method in METHODS:
                if method == "mosaic-cache" and mode != "infer":
                    continue
                worker = ["--worker", method, mode, str(k), "--preset", args.preset, "--device", device,
                          "--repeats", str(args.repeats)]
                result = _run_worker(worker)
                results.append(result)
                print(f"  {mode:13s} K={k} {method:13s} {result['time_ms']:9.1f} ms {result['peak_mib']:9.1f} MiB",
                      file=sys.stderr)

    rows = [["mode", "K", "method", "time (ms)", "speed-up vs released", "peak MiB", "memory ratio"]]
    for r in results:
        base = next(b for b in results if b["mode"] == r["mode"] and b["refs"] == r["refs"] and b["method"] == "released")
        r["speedup"] = base["time_ms"] / max(r["time_ms"], 1e-9)
        r["memory_ratio"] = base["peak_mib"] / max(r["peak_mib"], 1e-3)
        extra = f" (cache build {r['cache_build_ms']:.0f} ms)" if r["cache_build_ms"] is not None else ""
        rows.append([r["mode"], str(r["refs"]), r["method"] + extra, f"{r['time_ms']:.1f}", f"{r['speedup']:.2f}x",
                     f"{r['peak_mib']:.1f}", f"{r['memory_ratio']:.2f}x"])
    print(format_table(rows))
    report = {"preset": args.preset, "config": cfg, "hardware": hardware_info(device), "results": results}
    write_report(report, args.out or RESULTS / f"forward-{args.preset}.json")
    return report


if __name__ == "__main__":
    main()
