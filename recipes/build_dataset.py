"""Build a SemAlign-MS-style multi-subject data set (paper §3) from one YAML config.

Stages (each writes ``<output_dir>/<stage>/<id>.json`` records and can be rerun alone with ``--stage``):
prompts → images → subjects → filter → references → correspondences; then the manifest
(``<output_dir>/manifest.jsonl``, trains with ``recipes/flux_mosaic_train.py`` as ``data.kind: manifest``),
``summary.json`` (kept and rejected per reason, seconds per item) and contact sheets
(``sheets/accepted.png``, ``sheets/rejected.png``).

A killed run resumes without redoing finished items. Resuming with a changed configuration is
refused, naming the changed keys, unless ``--overwrite`` redoes the stages concerned (see
``RESUME_NEUTRAL_KEYS`` for the keys that never count); ``--shard i/n`` runs the items of shard i of
n (a stable hash of each id), so n machines or GPUs cover every item once; run
``--stage manifest`` once after all shards to collect them.

Examples::

    python recipes/fetch_dreambench.py                               # once: the DreamBench photos
    python recipes/build_dataset.py                                  # the CPU config on DreamBench
    python recipes/build_dataset.py --config recipes/configs/dataset_real.yaml --shard 0/8
    python recipes/build_dataset.py --config recipes/configs/dataset_real.yaml --stage manifest
    python recipes/build_dataset.py --output-dir runs/ds2 filter.min_quality=2.0   # overrides
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
import yaml

from mosaic_kit.data import dreambench_root
from mosaic_kit.dataset_builder import STAGES, DatasetBuilder, dataset_config_from_dict, parse_shard, write_text_atomic
from mosaic_kit.training.config import apply_overrides
from mosaic_kit.utils.cli import RecipeArgumentParser, add_output_dir, add_progress, add_threads, usage_errors

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "dataset_cpu.yaml"
log = logging.getLogger("build_dataset")


def _shard(text: str) -> tuple[int, int]:
    try:
        return parse_shard(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def main(argv: list[str] | None = None) -> dict:
    parser = RecipeArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="YAML config (default: the CPU run)")
    parser.add_argument("--stage", action="append", choices=[*STAGES, "manifest"],
                        help="run only this stage (repeatable); 'manifest' only collects the outputs")
    add_output_dir(parser, "output folder (default: the config's output_dir)")
    parser.add_argument("--shard", type=_shard, default=(0, 1), help="i/n: this shard of n")
    parser.add_argument("--overwrite", action="store_true", help="redo items that already have a record")
    add_threads(parser, default=1)
    add_progress(parser)
    parser.add_argument("overrides", nargs="*", help="key=value config overrides (dotted keys)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    with usage_errors(parser, yaml.YAMLError):  # a bad option or override: one line, exit code 2
        overrides = args.overrides + ([f"output_dir={args.output_dir}"] if args.output_dir else [])
        values = apply_overrides(yaml.safe_load(args.config.read_text()) or {}, overrides)
        config = dataset_config_from_dict(values)
        if "@dreambench" in json.dumps(values) and set(args.stage or STAGES) - {"manifest"}:
            # the DreamBench photos are here, or the error names the command that fetches them
            dreambench_root()
    out = Path(config.output_dir)
    builder = DatasetBuilder(config, args.shard, progress=not args.no_progress, overwrite=args.overwrite)
    stages = [s for s in (args.stage or STAGES) if s != "manifest"]
    if stages:  # before anything is written: a resume over records made under other settings is refused
        with usage_errors(parser):
            builder.check_resume(stages)
    write_text_atomic(out / f"config-{args.shard[0]}of{args.shard[1]}.json", json.dumps(values, indent=2))
    if stages:
        builder.run(stages)
    summary = builder.finish()
    log.info("shard %d/%d: %d accepted of %d items; rejected %s; manifest %s", *args.shard, summary["accepted"],
             summary["items"], summary["rejected"], out / "manifest.jsonl")
    print(json.dumps({k: summary[k] for k in ("items", "accepted", "rejected", "stale", "seconds_per_item")}, indent=1),
          file=sys.stderr)
    return summary


if __name__ == "__main__":
    main()
