#!/usr/bin/env bash
# Installs the *declared minimum* versions of diffusers, transformers, peft and accelerate (the
# ">=" floors of pyproject.toml, read from it so that they cannot drift) into a second virtual
# environment and runs the model, pipeline and trainer tests there. CI runs it (.ci/run).
#   bash scripts/check_floors.sh              # environment in a temporary folder
#   FLOOR_VENV=/tmp/floor bash scripts/check_floors.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
FLOOR_VENV=${FLOOR_VENV:-"$(mktemp -d)/floor"}
constraints="$(mktemp)"

# name==floor for each of the four, from pyproject.toml's `flux` extra.
"$PYTHON" - "$constraints" <<'PY'
import re, sys
from pathlib import Path

text = Path("pyproject.toml").read_text()
lines = []
for name in ("diffusers", "transformers", "peft", "accelerate"):
    floors = re.findall(rf'"{name}>=([0-9][0-9A-Za-z.]*)"', text)
    if len(floors) != 1:
        sys.exit(f"pyproject.toml: expected one '{name}>=X' floor, found {floors}")
    lines.append(f"{name}=={floors[0]}")
Path(sys.argv[1]).write_text("\n".join(lines) + "\n")
print("floors:", ", ".join(lines))
PY

# The usual setup (CPU torch first), with the four pinned to their floors.
PIP_CONSTRAINT="$constraints" VENV="$FLOOR_VENV" PYTHON="$PYTHON" bash scripts/setup.sh

# Exactly the floors are installed (a resolver that picked anything else fails here).
"$FLOOR_VENV/bin/python" - "$constraints" <<'PY'
import sys
from importlib.metadata import version
from pathlib import Path

for line in Path(sys.argv[1]).read_text().split():
    name, wanted = line.split("==")
    got = version(name)
    if got != wanted:
        sys.exit(f"expected {name}=={wanted} in the floor environment, but {got} is installed")
    print(f"{name} {got}")
PY

# The model and pipeline tests, and the trainer's smoke and data tests (accelerate).
"$FLOOR_VENV/bin/python" -m pytest -q -p no:cacheprovider \
    tests/models/test_models_flux.py tests/pipelines/test_pipeline.py tests/pipelines/test_tiny_components.py tests/models/test_hardening_models.py
"$FLOOR_VENV/bin/python" -m pytest -q -p no:cacheprovider tests/training/test_training.py \
    -k "two_step_smoke or crash_while or trains_on"
