"""Peak memory of one training step at real model scale, without a GPU: fake tensors + MemTracker.

Every configuration builds its real-size transformer through mosaic_kit's own code path (the
FLUX.1 `MosaicFluxTransformer` with the released multi-branch references, the FLUX.2
`Flux2Denoiser` the trainer wraps, or a stock `QwenImageTransformer2DModel` with mosaic_kit's
in-sequence capture processors), on the ``meta`` device: the LoRA is added and the base cast to
bf16 there (``.to()`` cannot swap fake parameters), then every parameter and buffer becomes a
fake CPU tensor (``torch._subclasses.fake_tensor.FakeTensorMode``: shape, dtype and device, no
storage). One whole training step then runs under torch's ``MemTracker``
(``torch.distributed._tools.mem_tracker``), which records the live bytes of every tensor by
category and the peak:

    forward (bf16 autocast, non-reentrant gradient checkpointing) → flow-matching loss
    (+ SCAL and MDL) → backward into the LoRA → grad-norm clipping → AdamW step in steady state
    (its moments exist before the step) → EMA of the LoRA weights

as `mosaic_kit.training.MosaicTrainer.training_step` and its loop do it (bf16 frozen base, fp32
LoRA, AdamW with ``foreach`` as on a GPU, EMA decay 0.999). Three modes per configuration:

- ``plain``: the same step without MOSAIC (flow matching only, no capture fed);
- ``mosaic``: `RefTargetCapture` fed from the capture blocks, SCAL and MDL (the paper preset with
  Jensen-Shannon MDL over annotated points);
- ``dense``: the released code's capture restated (``bench_capture.ReleasedStyleCapture``: per
  block and reference the head-averaged softmax map over the target keys is kept for the loss;
  SCAL as a per-point loop, MDL as JSD over all tokens).

The same step runs again under ``torch.utils.flop_counter.FlopCounterMode`` (matrix products
and attention, the checkpoint's recomputation included; not during the memory measurement, since
its module tracking keeps activations alive), which bounds the capture's share of the step's
time at real scale until a GPU measures it.

What CPU fake tensors change and how it is handled (checked facts, see the project's notes on
real-scale memory): CUDA autocast runs softmax, layer norm, exp, sums and a few more ops in
float32 where CPU autocast keeps bf16, so `GpuAutocastPolicy` (a ``TorchFunctionMode``, active for
the whole step so that a checkpoint's recomputation in backward sees it too) gives those ops
CUDA's float32 policy; MemTracker's gradient hooks go on trainable parameters only; the small
index tensors of the capture are built as real constants before the step.

Not modelled: the CUDA context (about 0.5-1 GiB), the caching allocator's rounding and
fragmentation, cuBLAS and attention workspaces; the encoders (text encoder and autoencoder) are
outside the step: the ``encoders`` column gives their weights in bf16 from their configs, measured
the same way (meta → parameter bytes); "cached encoders" is the step alone (``data.cache_dir``:
the trainer never builds them), "live encoders" the step plus those weights.

Quantized bases (``--quantize int8,nf4``): every frozen linear stored as torchao's int8
weight-only or bitsandbytes' NF4 layout (double quantization, blocksize 64), each matmul through a
dequantized bf16 transient of its weight in forward and backward (``memory/quantized.py`` says
exactly what is and is not modelled).

Real configurations (transformer ``config.json`` values, cited per constant below) and sizes:
FLUX.1-dev 12B at 512² with K = 2, 4, 6 references of 512² (released design: LoRA rank 128 on the
reference branch, capture on the 19 double blocks, 512 T5 tokens); FLUX.2 [klein] 4B and 9B at
1024² with 4 references of 512² or 1024² (LoRA rank 128 on every attention and MLP projection,
capture on every block, 512 Qwen3 tokens); FLUX.2 [dev] 32B at 1024² with 4 references of 512²;
Qwen-Image-Edit-Plus (2509) 20B at 1024² with 3 references at the pipeline's 1024² VAE size.
Batch 1, 256 annotated points per reference.

The code lives in ``benchmarks/memory/`` by job: ``configs`` (the real configs and their
sources), ``fakes`` (fake tensors, the GPU autocast policy, the tracker), ``quantized``, ``step``
(the step, built through the family registry's plug-in point: `ModelFamily.bare_denoiser` and
`ModelFamily.bare_model_kwargs`; nothing here names a family) and ``report`` (tables).

Usage::

    python benchmarks/bench_memory.py --configs klein-4b-512,flux1-dev-k2      # chosen rows
    python benchmarks/bench_memory.py --configs quantized --quantize int8,nf4 --modes plain,mosaic
    python benchmarks/bench_memory.py --configs ready                          # recipes/configs/gpu_*.yaml
    python benchmarks/bench_memory.py --configs all                            # every row (long)
    python benchmarks/bench_memory.py --configs tiny-flux2 --modes plain,mosaic # seconds
    python benchmarks/bench_memory.py --list                                   # the configurations
    python benchmarks/bench_memory.py --configs klein-4b-512 --device cuda     # measured on a GPU

With ``--device cuda`` the same step runs with real (uninitialised) weights on the GPU and the
peak is ``torch.cuda.max_memory_allocated``; the report then also gives the ratio of the
measured peak to the fake one (``--fake-report``: a JSON of this program to compare against).
Each measurement runs in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the `memory` package beside this script

from memory.configs import (  # noqa: E402,F401  (re-exported: the tests and scripts read them from here)
    CONFIGS, EMA_DECAY, ENCODERS, MODES, QUANTIZE, QUANTIZED_SUBSET, READY, REAL,
)
from memory.fakes import GpuAutocastPolicy, materialise, policy_checkpoint  # noqa: E402,F401
from memory.quantized import QuantizedLinear, quantize_linears  # noqa: E402,F401
from memory.report import (  # noqa: E402,F401
    GIB, OVERHEAD_LIMIT_PCT, describe, format_markdown, format_report, overheads, row_key,
)
from memory.step import Step, build_model, correspondences, encoder_bytes, measure_fake, measure_real  # noqa: E402,F401

RESULTS = Path(__file__).resolve().parent / "results"


def _worker(args) -> dict:
    cfg = CONFIGS[args.config]
    if args.worker == "fake":
        return measure_fake(cfg, args.mode, flops=not args.no_flops, quantize=args.base)
    if args.worker == "real":
        return measure_real(cfg, args.mode, args.device, quantize=args.base)
    return {"encoders": encoder_bytes(cfg["encoders"])}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="klein-4b-512",
                        help=f"comma-separated configurations, 'all' (the real ones), 'quantized' (the rows "
                             f"measured with quantized bases) or 'ready' (recipes/configs/gpu_*.yaml): {', '.join(CONFIGS)}")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {MODES}")
    parser.add_argument("--quantize", default="none",
                        help=f"comma-separated frozen-base layouts, a subset of {QUANTIZE} (the ready "
                             "configurations use their own)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="cpu: fake tensors (no GPU needed); cuda: the real step on a GPU")
    parser.add_argument("--fake-report", type=Path, default=None,
                        help="with --device cuda: a JSON of a fake run, for the measured / fake ratio")
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP count (faster)")
    parser.add_argument("--no-encoders", action="store_true", help="skip the encoders' weights")
    parser.add_argument("--list", action="store_true", help="print the configurations and exit")
    parser.add_argument("--markdown", type=Path, default=None,
                        help="print the docs table (markdown) of a report written by this program, and exit")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON output (default: benchmarks/results/memory-<device>.json)")
    parser.add_argument("--same-process", action="store_true",
                        help="measure in this process instead of one fresh process per row (fake tensors "
                             "only: MemTracker sees only the step's own tensors, so nothing else pollutes the peak)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--base", default="none", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        import torch

        torch.set_num_threads(1)
        print(json.dumps(_worker(args)))
        return {}
    if args.markdown is not None:
        print(format_markdown(json.loads(args.markdown.read_text())))
        return {}
    if args.list:
        for name, cfg in CONFIGS.items():
            print(f"{name:20s} {describe(cfg)}")
        return {}
    shortcuts = {"all": REAL, "quantized": QUANTIZED_SUBSET, "ready": list(READY)}
    names = shortcuts.get(args.configs) or [c for c in args.configs.split(",") if c]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown:
        parser.error(f"--configs: unknown {unknown}; choose from {list(CONFIGS)} or 'all'")
    modes = [m for m in args.modes.split(",") if m]
    if not modes or set(modes) - set(MODES):
        parser.error(f"--modes: expected a comma-separated subset of {MODES}, but got {args.modes!r}")
    bases = [q for q in args.quantize.split(",") if q]
    if not bases or set(bases) - set(QUANTIZE):
        parser.error(f"--quantize: expected a comma-separated subset of {QUANTIZE}, but got {args.quantize!r}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device")
        if args.same_process:
            parser.error("--same-process: fake tensors only (--device cpu); a GPU peak needs a fresh process per row")
    fake_rows = {}
    if args.fake_report is not None:
        for row in json.loads(args.fake_report.read_text())["results"]:
            fake_rows[row_key(row)] = row

    from mosaic_kit.reporting import hardware_info, run_in_fresh_process, write_report

    def measure(worker_args: list[str]) -> dict:
        if not args.same_process:
            return run_in_fresh_process(__file__, worker_args)
        return _worker(parser.parse_args(worker_args))

    began = time.perf_counter()
    report = {"device": args.device, "method": "fake tensors + MemTracker" if args.device == "cpu" else
              "torch.cuda.max_memory_allocated", "hardware": hardware_info(args.device),
              "settings": {"batch": 1, "base_dtype": "bfloat16", "lora_dtype": "float32", "optimizer": "AdamW (foreach)",
                           "ema_decay": EMA_DECAY, "gradient_checkpointing": "non-reentrant", "grad_clip": 1.0,
                           "frozen_bases": bases},
              "configs": {n: _jsonable(CONFIGS[n]) for n in names}, "results": [], "encoders": {}}
    for name in names:
        cfg = CONFIGS[name]
        if not args.no_encoders and cfg["encoders"] and cfg["encoders"] not in report["encoders"]:
            report["encoders"][cfg["encoders"]] = measure(["--worker", "encoders", "--config", name])["encoders"]
        for base in [cfg["quantize"]] if "quantize" in cfg else bases:
            for mode in modes:
                worker = ["--worker", "fake" if args.device == "cpu" else "real", "--config", name, "--mode", mode,
                          "--base", base, "--device", args.device] + (["--no-flops"] if args.no_flops else [])
                row = {"config": name, **measure(worker)}
                fake = fake_rows.get(row_key(row))
                if fake is not None:
                    row["fake_peak_bytes"] = fake["peak_bytes"]
                    row["ratio_to_fake"] = row["peak_bytes"] / fake["peak_bytes"]
                report["results"].append(row)
                print(f"  {name} {base} {mode}: {row['peak_bytes'] / GIB:.2f} GiB ({row['seconds']:.0f} s)", flush=True)
    report["overhead"] = overheads(report["results"])
    report["total_seconds"] = time.perf_counter() - began
    print()
    print(format_report(report))
    write_report(report, args.out or RESULTS / f"memory-{args.device}.json")
    return report


def _jsonable(cfg: dict) -> dict:
    return json.loads(json.dumps(cfg, default=list))


if __name__ == "__main__":
    main()
