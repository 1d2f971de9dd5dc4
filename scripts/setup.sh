#!/usr/bin/env bash
# Creates .venv (if needed) and installs mosaic_kit with its test extras.
#   bash scripts/setup.sh            # core + dev (tests) + flux (transformers, diffusers, peft, ...) + data (pyarrow) + train
#   bash scripts/setup.sh quant      # add torchao (a quantized frozen base; not by default: once installed,
#                                    # diffusers imports it on every run and torchao's CPU build logs warnings)
#   bash scripts/setup.sh docs       # add more extras
# On a machine without an NVIDIA GPU the CPU build of torch is installed first, so that pip
# never pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)

if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
        "${PIP[@]}" torch
    else
        # A CPU wheel shipped on this machine wins; else the CPU index of PyTorch.
        cpu_wheel=$(ls "${PIP_FIND_LINKS:-/opt/wheels}"/torch-*+cpu-*.whl 2>/dev/null | sort -V | tail -n 1 || true)
        if [ -n "$cpu_wheel" ]; then
            "${PIP[@]}" "$cpu_wheel"
        else
            "${PIP[@]}" torch --index-url https://download.pytorch.org/whl/cpu
        fi
    fi
fi

extras="dev,flux,data,train"
for extra in "$@"; do extras="$extras,$extra"; done
"${PIP[@]}" -e ".[$extras]"
echo "mosaic_kit installed in $VENV with extras [$extras]"
