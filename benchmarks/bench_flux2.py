"""Step time and peak memory of a FLUX.2 training step, with and without MOSAIC, K = 1…4.

A sibling of ``bench_forward.py`` for the FLUX.2 family: one random-weight
`Flux2Transformer2DModel` with the LoRA of `mosaic_kit.models.flux2` (peft, every attention and
feed-forward projection), the target and K references in one sequence as the stock pipelines lay
them out (``[target | ref 1 | … | ref K]``, reference k at time offset 10·(k + 1)), driven through
`Flux2Denoiser` (the module the trainer wraps). Two modes, measured alternately in one process
after a warm-up of each, so both see the same machine state:

- ``train``: forward + backward into the LoRA, flow-matching MSE; the capture processors are
  installed and idle (bit-identical to the stock processors);
- ``train+losses``: the same step feeding `RefTargetCapture` from every block, plus SCAL
  (0.4) and MDL (0.6, Jensen–Shannon) on annotated points, as the paper's objective.

The overhead ``train+losses / train - 1`` is what MOSAIC costs per step; the target on a GPU is
≤ 5 %. Text embeddings are random tensors (the frozen text encoder and the autoencoder are
outside the step; the trainer can cache them).

Presets: ``tiny`` (the tiny test model, 64² images), ``cpu`` (a small transformer, 256² target
and references, float32) and ``klein`` (FLUX.2 [klein] 4B architecture: 5 double + 20 single
blocks, 24 heads × 128, 1024² target, 512² references, 512 text tokens, bf16, LoRA rank 128,
gradient checkpointing; a GPU with ≥ 40 GB).

    python benchmarks/bench_flux2.py                         # cpu preset
    python benchmarks/bench_flux2.py --preset klein          # on a GPU
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

KLEIN_4B = {
    "patch_size": 1, "in_channels": 128, "num_layers": 5, "num_single_layers": 20, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 7680, "timestep_guidance_channels": 256, "mlp_ratio": 3.0,
    "axes_dims_rope": (32, 32, 32, 32), "rope_theta": 2000, "guidance_embeds": False,
}
"""The FLUX.2 [klein] 4B transformer configuration (``black-forest-labs/FLUX.2-klein-4B``)."""

PRESETS = {
    "tiny": {
        "transformer": {"patch_size": 1, "in_channels": 16, "num_layers": 1, "num_single_layers": 2,
                        "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 96,
                        "timestep_guidance_channels": 32, "axes_dims_rope": (4, 4, 4, 4), "guidance_embeds": False},
        "size": 64, "ref_size": 64, "text_tokens": 8, "dtype": "float32", "rank": 4, "points": 4,
        "checkpointing": False,
    },
    "cpu": {
        "transformer": {"patch_size": 1, "in_channels": 64, "num_layers": 2, "num_single_layers": 4,
                        "attention_head_dim": 32, "num_attention_heads": 4, "joint_attention_dim": 96,
                        "timestep_guidance_channels": 64, "axes_dims_rope": (8, 8, 8, 8), "guidance_embeds": False},
        "size": 256, "ref_size": 256, "text_tokens": 32, "dtype": "float32", "rank": 16, "points": 32,
        "checkpointing": False,
    },
    "klein": {
        "transformer": KLEIN_4B,
        "size": 1024, "ref_size": 512, "text_tokens": 512, "dtype": "bfloat16", "rank": 128, "points": 256,
        "checkpointing": True,
    },
}
MODES = ("train", "train+losses")
TARGET_OVERHEAD_PCT = 5.0


def image_ids(refs: int, size: int, ref_size: int):
    """``(1, N_tgt + K·N_ref, 4)`` (T, H, W, L) ids as the FLUX.2 pipelines build them."""
    import torch

    from mosaic_kit.models.flux2 import FLUX2_REFERENCE_TIME_SCALE

    def grid(t: int, side: int) -> torch.Tensor:
        return torch.cartesian_prod(torch.tensor([t]), torch.arange(side), torch.arange(side), torch.tensor([0]))

    parts = [grid(0, size // 16)] + [grid(FLUX2_REFERENCE_TIME_SCALE * (k + 1), ref_size // 16) for k in range(refs)]
    return torch.cat(parts)[None]


def _correspondences(refs: int, n_tgt: int, n_ref: int, points: int):
    from mosaic_kit.correspondence import Correspondences

    rng = random.Random(0)
    targets = rng.sample(range(n_tgt), min(n_tgt, refs * points))
    dicts = [dict(zip(rng.sample(range(n_ref), min(points, n_ref)), targets[k::refs][:points])) for k in range(refs)]
    return Correspondences.from_dicts([dicts], [n_ref] * refs, n_tgt)


def run(cfg: dict, device_name: str, ks: list[int], repeats: int) -> list[dict]:
    """Times both modes for each K on one model; returns one row per (mode, K)."""
    import torch
    from diffusers import Flux2Transformer2DModel

    from mosaic_kit.attention import RefTargetCapture
    from mosaic_kit.losses import MosaicObjective
    from mosaic_kit.models.flux2 import Flux2Denoiser, add_flux2_lora
    from mosaic_kit.models.insequence import SequenceLayout
    from mosaic_kit.reporting import PeakMemory

    device = torch.device(device_name)
    dtype = getattr(torch, cfg["dtype"])
    torch.manual_seed(0)
    with torch.device(device):  # random init on the device (seconds for 4B parameters on a GPU)
        transformer = Flux2Transformer2DModel(**cfg["transformer"])
    if dtype != torch.float32:
        transformer.to(dtype)
    add_flux2_lora(transformer, rank=cfg["rank"])
    transformer.to(device)
    for name, param in transformer.named_parameters():
        param.requires_grad_(".lora_" in name)
        if param.requires_grad:
            param.data = param.data.float()  # LoRA weights train in float32, as the trainer keeps them
    if cfg["checkpointing"]:
        transformer.enable_gradient_checkpointing()
    model = Flux2Denoiser(transformer)
    model.capture_handle()  # installed in both modes: idle in `train`
    objective = MosaicObjective(scal_weight=0.4, mdl_weight=0.6, mdl_divergence="jsd")
    channels = transformer.config.in_channels
    n_tgt, n_ref = (cfg["size"] // 16) ** 2, (cfg["ref_size"] // 16) ** 2
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    memory = PeakMemory(device)
    rows = []
    for refs in ks:
        g = torch.Generator().manual_seed(refs)
        hidden = torch.randn(1, n_tgt + refs * n_ref, channels, generator=g).to(device, dtype)
        kwargs = {
            "hidden_states": hidden, "img_ids": image_ids(refs, cfg["size"], cfg["ref_size"]).to(device),
            "encoder_hidden_states": torch.randn(1, cfg["text_tokens"], transformer.config.joint_attention_dim,
                                                 generator=g).to(device, dtype),
            "txt_ids": torch.cartesian_prod(torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long),
                                            torch.zeros(1, dtype=torch.long),
                                            torch.arange(cfg["text_tokens"]))[None].to(device),
            "timestep": torch.full((1,), 0.5, device=device, dtype=dtype),
            "sequence_layout": SequenceLayout.concatenated(n_tgt, (n_ref,) * refs),
        }
        velocity = torch.randn(1, n_tgt, channels, generator=g).to(device)
        corr = _correspondences(refs, n_tgt, n_ref, cfg["points"]).to(device)

        def step(mode: str) -> None:
            capture = RefTargetCapture(corr, aggregate="points") if mode == "train+losses" else None
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                out = model(**kwargs, capture=capture)
            loss = (out.float() - velocity).square().mean()
            if capture is not None:
                loss = objective.combine(loss, capture.result(), corr).loss
            loss.backward()
            for p in transformer.parameters():
                p.grad = None

        for mode in MODES:  # warm-up
            step(mode)
        sync()
        times: dict[str, list[float]] = {m: [] for m in MODES}
        peaks: dict[str, list[float]] = {m: [] for m in MODES}
        for _ in range(repeats):
            for mode in MODES:  # alternate, so drift hits both modes alike
                memory.start()
                start = time.perf_counter()
                step(mode)
                sync()
                times[mode].append((time.perf_counter() - start) * 1e3)
                peaks[mode].append(memory.peak())
        for mode in MODES:
            rows.append({"mode": mode, "refs": refs, "time_ms": statistics.median(times[mode]),
                         "peak_mib": statistics.median(peaks[mode]), "repeats": repeats,
                         "image_tokens": n_tgt + refs * n_ref})
            print(f"  K={refs} {mode:13s} {rows[-1]['time_ms']:9.1f} ms {rows[-1]['peak_mib']:9.1f} MiB", file=sys.stderr)
        del hidden, kwargs
    return rows


def overheads(rows: list[dict]) -> list[dict]:
    """Per K: ``train+losses`` time over ``train`` time, in percent, and the extra peak memory."""
    out = []
    for refs in sorted({r["refs"] for r in rows}):
        base = next(r for r in rows if r["refs"] == refs and r["mode"] == "train")
        full = next(r for r in rows if r["refs"] == refs and r["mode"] == "train+losses")
        out.append({"refs": refs, "train_ms": base["time_ms"], "train_losses_ms": full["time_ms"],
                    "overhead_pct": 100 * (full["time_ms"] / max(base["time_ms"], 1e-9) - 1),
                    "extra_peak_mib": full["peak_mib"] - base["peak_mib"]})
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--refs", default="1,2,3,4", help="comma-separated K values")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per mode after one warm-up (median)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=None, help="JSON (default: benchmarks/results/flux2-<preset>.json)")
    args = parser.parse_args(argv)

    import torch

    from mosaic_kit.reporting import format_table, hardware_info, write_report

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    ks = [int(k) for k in args.refs.split(",") if k]
    if not ks or any(k < 1 for k in ks) or args.repeats < 1:
        parser.error("--refs needs positive ints and --repeats a positive int")
    cfg = PRESETS[args.preset]
    rows = run(cfg, device, ks, args.repeats)
    extra = overheads(rows)
    table = [["K", "train (ms)", "train + capture + SCAL + MDL (ms)", "overhead", "extra peak MiB"]]
    for r in extra:
        table.append([str(r["refs"]), f"{r['train_ms']:.1f}", f"{r['train_losses_ms']:.1f}",
                      f"{r['overhead_pct']:+.1f} %", f"{r['extra_peak_mib']:.1f}"])
    print(format_table(table))
    report = {"preset": args.preset, "config": cfg, "hardware": hardware_info(device), "results": rows,
              "overhead": extra, "target_overhead_pct": TARGET_OVERHEAD_PCT,
              "within_target": all(r["overhead_pct"] <= TARGET_OVERHEAD_PCT for r in extra)}
    write_report(report, args.out or RESULTS / f"flux2-{args.preset}.json")
    return report


if __name__ == "__main__":
    main()
