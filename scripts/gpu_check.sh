#!/usr/bin/env bash
# Every GPU measurement of the project in one command, one JSON report (for docs/benchmarks.md).
#
#   bash scripts/gpu_check.sh                 # on one H100/H200: under 12 minutes, random weights, bf16
#   bash scripts/gpu_check.sh --dry-run       # the same stages at tiny sizes on the CPU (seconds)
#   bash scripts/gpu_check.sh --out DIR       # where the report and the per-stage files go
#                                             # (default: benchmarks/results/gpu-check)
#
# Stages (each under its own time limit; a stage that fails or runs out of time is recorded in the
# report with its exit status and the tail of its log, and the next stage still runs):
#   1. tests      pytest -m gpu (the gpu-marked tests: fused attention backend, GPU matching)
#   2. capture    benchmarks/bench_capture.py --preset flux-1024 (capture vs dense maps, FLUX.1 sizes)
#   3. flux2      benchmarks/bench_flux2.py --preset klein (FLUX.2 [klein] 4B training step with and
#                 without capture + SCAL + MDL, K = 1..4; target: the overhead is <= 5 %)
#   4. flux1      benchmarks/bench_forward.py --preset flux-512 at K = 2 (the FLUX.1 multi-reference
#                 training step vs the released layout; each measurement builds the 12B model in a
#                 fresh process, so this stage is kept to one K)
#   5. memory     benchmarks/bench_memory.py --device cuda on FLUX.2 [klein] 4B (1024², 4 x 512²
#                 references) and FLUX.1-dev (512², K = 2), plain / MOSAIC / dense maps: the training
#                 step's measured peak (torch.cuda.max_memory_allocated) next to the fake-tensor peak
#                 of benchmarks/results/memory-cpu.json, as the ratio measured / fake per row
#   6. memory-quant  the same for FLUX.2 [klein] 4B with quantized frozen bases, through the real
#                 backends (torchao int8 weight-only, bitsandbytes NF4), each only where its package
#                 is installed, next to the fake peak of the modelled layout (plain / MOSAIC)
# Report: DIR/gpu-check.json = {"hardware", "dry_run", "stages": {name: {"rc", "seconds",
# "report" (the stage's own JSON) | "log_tail"}}, "total_seconds"}.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
OUT_DIR="benchmarks/results/gpu-check"
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --out) OUT_DIR="$2"; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (expected --dry-run, --out DIR)" >&2; exit 2 ;;
  esac
  shift
done
PYTHON=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT_DIR"
STAGES="$OUT_DIR/stages.tsv"
: > "$STAGES"
START=$(date +%s)

# run_stage NAME LIMIT_SECONDS REPORT_JSON COMMAND...
run_stage() {
  local name=$1 limit=$2 report=$3
  shift 3
  local began rc
  began=$(date +%s)
  echo "== $name (limit ${limit}s): $*" >&2
  timeout --signal=TERM --kill-after=20 "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - began ))" "$report" >> "$STAGES"
  echo "   $name: exit $rc after $(( $(date +%s) - began ))s" >&2
}

if [ "$DRY_RUN" = 1 ]; then
  DEVICE=cpu
  run_stage tests 120 "" "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider
  run_stage capture 120 "$OUT_DIR/capture.json" "$PYTHON" benchmarks/bench_capture.py --preset tiny --device cpu \
    --repeats 1 --out "$OUT_DIR/capture.json"
  run_stage flux2 120 "$OUT_DIR/flux2.json" "$PYTHON" benchmarks/bench_flux2.py --preset tiny --device cpu \
    --refs 1,2 --repeats 1 --threads 1 --out "$OUT_DIR/flux2.json"
  run_stage flux1 180 "$OUT_DIR/flux1.json" "$PYTHON" benchmarks/bench_forward.py --preset tiny --device cpu \
    --refs 2 --modes train,train+losses --repeats 1 --out "$OUT_DIR/flux1.json"
  run_stage memory 240 "$OUT_DIR/memory.json" "$PYTHON" benchmarks/bench_memory.py --configs tiny-flux2 \
    --modes plain,mosaic --no-encoders --device cpu --out "$OUT_DIR/memory.json"
  run_stage memory-quant 240 "$OUT_DIR/memory-quant.json" "$PYTHON" benchmarks/bench_memory.py --configs tiny-flux2 \
    --modes plain,mosaic --quantize int8,nf4 --no-encoders --no-flops --device cpu --out "$OUT_DIR/memory-quant.json"
else
  DEVICE=cuda
  "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check.sh: no CUDA device (use --dry-run on a CPU)')" || exit 1
  run_stage tests 90 "" "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider
  run_stage capture 60 "$OUT_DIR/capture.json" "$PYTHON" benchmarks/bench_capture.py --preset flux-1024 --device cuda \
    --repeats 3 --out "$OUT_DIR/capture.json"
  run_stage flux2 150 "$OUT_DIR/flux2.json" "$PYTHON" benchmarks/bench_flux2.py --preset klein --device cuda \
    --refs 1,2,3,4 --repeats 3 --out "$OUT_DIR/flux2.json"
  run_stage flux1 170 "$OUT_DIR/flux1.json" "$PYTHON" benchmarks/bench_forward.py --preset flux-512 --device cuda \
    --refs 2 --modes train,train+losses --repeats 2 --out "$OUT_DIR/flux1.json"
  run_stage memory 240 "$OUT_DIR/memory.json" "$PYTHON" benchmarks/bench_memory.py --device cuda \
    --configs klein-4b-512,flux1-dev-k2 --no-encoders --no-flops --fake-report benchmarks/results/memory-cpu.json \
    --out "$OUT_DIR/memory.json"
  # quantized bases through the real backends, each only where it is installed
  QUANTIZED=""
  "$PYTHON" -c "import importlib.util as u, sys; sys.exit(u.find_spec('torchao') is None)" && QUANTIZED="int8"
  "$PYTHON" -c "import importlib.util as u, sys; sys.exit(u.find_spec('bitsandbytes') is None)" \
    && QUANTIZED="${QUANTIZED:+$QUANTIZED,}nf4"
  if [ -n "$QUANTIZED" ]; then
    run_stage memory-quant 300 "$OUT_DIR/memory-quant.json" "$PYTHON" benchmarks/bench_memory.py --device cuda \
      --configs klein-4b-512 --modes plain,mosaic --quantize "$QUANTIZED" --no-encoders --no-flops \
      --fake-report benchmarks/results/memory-cpu.json --out "$OUT_DIR/memory-quant.json"
  else
    echo "   memory-quant: skipped (neither torchao nor bitsandbytes is installed)" >&2
  fi
fi

"$PYTHON" - "$OUT_DIR" "$STAGES" "$DRY_RUN" "$DEVICE" "$START" <<'PY'
import json, sys, time
from pathlib import Path

from mosaic_kit.reporting import hardware_info, write_report

out, stages_file, dry_run, device, start = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1", sys.argv[4], int(sys.argv[5])
stages = {}
for line in stages_file.read_text().splitlines():
    name, rc, seconds, report = line.split("\t")
    entry = {"rc": int(rc), "seconds": int(seconds), "timed_out": int(rc) in (124, 137)}
    if report and Path(report).is_file():
        entry["report"] = json.loads(Path(report).read_text())
    log = out / f"{name}.log"
    if int(rc) != 0 or not entry.get("report"):
        entry["log_tail"] = log.read_text(errors="replace")[-3000:] if log.is_file() else ""
    stages[name] = entry
report = {"dry_run": dry_run, "hardware": hardware_info(device), "stages": stages,
          "total_seconds": int(time.time()) - start, "ok": all(s["rc"] == 0 for s in stages.values())}
write_report(report, out / "gpu-check.json")
flux2 = stages.get("flux2", {}).get("report", {})
for row in flux2.get("overhead", []):
    print(f"FLUX.2 K={row['refs']}: train {row['train_ms']:.1f} ms, + MOSAIC {row['train_losses_ms']:.1f} ms "
          f"({row['overhead_pct']:+.1f} %)")
for stage in ("memory", "memory-quant"):
    for row in stages.get(stage, {}).get("report", {}).get("results", []):
        ratio = f", measured / fake {row['ratio_to_fake']:.3f}" if "ratio_to_fake" in row else ""
        base = row.get("quantize", "none")
        print(f"memory {row['config']} {row['mode']} ({'bf16' if base == 'none' else base} base): "
              f"{row['peak_bytes'] / 2**30:.2f} GiB{ratio}")
summary = ", ".join(f"{name}={entry['rc']}" for name, entry in stages.items())
print(f"stages: {summary}; total {report['total_seconds']} s")
sys.exit(0 if report["ok"] else 1)
PY
