"""Runs diffusers' own transformer test suites stock, with MOSAIC's capture processors installed
(idle), and with a capture active on every forward, and compares the outcomes test by test.

Not part of CI. diffusers' tests are not shipped with its wheel: give a diffusers source tree
whose ``tests/`` matches the installed diffusers (a checkout of the release tag, or any tree
holding ``tests/``; nothing from it is copied here). Example::

    git clone --depth 1 --branch v0.42.1 https://github.com/huggingface/diffusers /tmp/diffusers
    PYTHONPATH=$PWD python scripts/run_diffusers_suites.py /tmp/diffusers --suites flux sd3

For each suite and mode it runs ``pytest tests/models/transformers/test_models_transformer_<suite>.py``
in that tree with the plugin `scripts/diffusers_capture_plugin.py` (``MOSAIC_CAPTURE`` = ``stock``,
``idle`` or ``active``), prints a table of passed / failed / skipped / errors per mode, lists every
test whose outcome differs from the stock run, and writes it all as JSON (``--json``). The
plugin's own summary (models installed on, forwards fed) is in each run's log beside the JSON.
Exit status 1 when an outcome differs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

SUITES = {
    "flux": "tests/models/transformers/test_models_transformer_flux.py",
    "flux2": "tests/models/transformers/test_models_transformer_flux2.py",
    "sd3": "tests/models/transformers/test_models_transformer_sd3.py",
    "qwenimage": "tests/models/transformers/test_models_transformer_qwenimage.py",
}
MODES = ("stock", "idle", "active")


def _outcomes(junit: Path) -> dict[str, str]:
    """test id → passed / failed / error / skipped, from pytest's JUnit XML."""
    outcomes = {}
    for case in ElementTree.parse(junit).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        tags = {child.tag for child in case}
        outcome = "passed"
        for tag in ("error", "failure", "skipped"):
            if tag in tags:
                outcome = {"failure": "failed"}.get(tag, tag)
                break
        # a teardown error adds a second entry for a test that passed: keep the worse outcome
        if outcomes.get(name) not in (None, "passed"):
            continue
        outcomes[name] = outcome
    return outcomes


def run_suite(tree: Path, suite: str, mode: str, out_dir: Path, extra: list[str]) -> dict:
    """One pytest run; returns counts, outcomes and seconds."""
    junit = out_dir / f"{suite}-{mode}.xml"
    log = out_dir / f"{suite}-{mode}.log"
    env = dict(os.environ, MOSAIC_CAPTURE=mode)
    here = Path(__file__).resolve().parent
    env["PYTHONPATH"] = os.pathsep.join([str(here), str(here.parent), env.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "pytest", SUITES[suite], "-q", "-p", "diffusers_capture_plugin",
               "-p", "no:cacheprovider", "-p", "no:randomly", f"--junitxml={junit}", *extra]
    start = time.perf_counter()
    with open(log, "w") as handle:
        subprocess.run(command, cwd=tree, env=env, stdout=handle, stderr=subprocess.STDOUT, check=False)
    seconds = time.perf_counter() - start
    outcomes = _outcomes(junit) if junit.exists() else {}
    counts = {key: sum(1 for v in outcomes.values() if v == key) for key in ("passed", "failed", "skipped", "error")}
    return {"counts": counts, "outcomes": outcomes, "seconds": round(seconds, 1), "log": str(log)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tree", type=Path, help="a diffusers source tree (holding tests/) matching the installed diffusers")
    parser.add_argument("--suites", nargs="+", choices=sorted(SUITES), default=list(SUITES))
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--out", type=Path, default=Path("diffusers-suites"), help="folder for logs, JUnit XML and JSON")
    parser.add_argument("--json", type=Path, default=None, help="summary JSON (default: OUT/summary.json)")
    parser.add_argument("pytest_args", nargs="*", help="more pytest arguments, after `--` (e.g. -- -k IPAdapter)")
    args = parser.parse_args(argv)
    if not (args.tree / "tests").is_dir():
        raise SystemExit(f"Expected a diffusers source tree with tests/, but {args.tree} has none.")
    if "stock" not in args.modes:
        args.modes = ["stock", *args.modes]
    args.out.mkdir(parents=True, exist_ok=True)
    import diffusers
    import torch

    summary = {"diffusers": diffusers.__version__, "torch": torch.__version__,
               "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "suites": {}}
    print(f"diffusers {summary['diffusers']}, torch {summary['torch']}, device {summary['device']}")
    print(f"{'suite':<10} {'mode':<7} {'passed':>7} {'failed':>7} {'skipped':>8} {'errors':>7} {'seconds':>8}  differs from stock")
    differs_any = False
    for suite in args.suites:
        runs = {}
        for mode in args.modes:
            runs[mode] = run_suite(args.tree, suite, mode, args.out, args.pytest_args)
            stock = runs["stock"]["outcomes"]
            differs = sorted(name for name in set(stock) | set(runs[mode]["outcomes"])
                             if stock.get(name) != runs[mode]["outcomes"].get(name))
            runs[mode]["differs"] = {name: [stock.get(name), runs[mode]["outcomes"].get(name)] for name in differs}
            differs_any |= bool(differs)
            c = runs[mode]["counts"]
            print(f"{suite:<10} {mode:<7} {c['passed']:>7} {c['failed']:>7} {c['skipped']:>8} {c['error']:>7} "
                  f"{runs[mode]['seconds']:>8}  {len(differs)}", flush=True)
            for name in differs:
                print(f"    {name}: stock {stock.get(name)}, {mode} {runs[mode]['outcomes'].get(name)}")
        summary["suites"][suite] = {mode: {k: v for k, v in run.items() if k != "outcomes"} for mode, run in runs.items()}
    path = args.json or args.out / "summary.json"
    path.write_text(json.dumps(summary, indent=2))
    print(f"wrote {path}")
    return 1 if differs_any else 0


if __name__ == "__main__":
    sys.exit(main())
