"""Compute the frozen encoders' outputs of a training data set once: the conditioning cache.

Reads the *training* config (its model and data sections) and writes, into ``data.cache_dir``
(or ``--cache-dir``), for every item: the text embeddings (pooled ones, masks, vision-language
prompt embeddings as the family needs) and the VAE latents of the target and the references,
exactly what ``family.encode_batch`` computes before the noise, in safetensors shards with a
sha256 each and an ``index.json`` naming the model, the resolution and the data set
(`mosaic_kit.training.cache`). Training with ``data.cache_dir`` set then never loads the text
encoders or the VAE. The run is resumable (verified shards are skipped, an interrupted one is
redone) and ``--shard i/n`` splits the shards over n machines sharing the folder::

    python recipes/cache_conditioning.py --config recipes/configs/flux2_klein.yaml \\
        data.root=/data/manifest.jsonl data.cache_dir=/data/cache-klein-1024
    python recipes/flux_mosaic_train.py --config recipes/configs/flux2_klein.yaml \\
        data.root=/data/manifest.jsonl data.cache_dir=/data/cache-klein-1024

Prints a JSON summary (items, shards, the shards written and skipped by this machine).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from mosaic_kit.training import load_config
from mosaic_kit.training.cache import ITEMS_PER_SHARD, build_conditioning_cache
from mosaic_kit.utils.cli import RecipeArgumentParser, add_progress, add_shard, positive_int, usage_errors

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "tiny_cpu.yaml"


def build_parser() -> RecipeArgumentParser:
    parser = RecipeArgumentParser(description=__doc__.split("\n\n")[0],
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", help=f"training YAML config (repeatable; default {DEFAULT_CONFIG.name})")
    parser.add_argument("--cache-dir", metavar="DIR", help="the cache folder (the setting data.cache_dir)")
    parser.add_argument("--items-per-shard", type=positive_int, default=ITEMS_PER_SHARD, metavar="N",
                        help=f"items per shard file (default {ITEMS_PER_SHARD})")
    add_shard(parser, help="i/n: this machine writes shards i, i + n, ... (0 <= i < n)")
    add_progress(parser)
    parser.add_argument("overrides", nargs="*", help="dotted.key=value settings, e.g. data.root=/data/manifest.jsonl")
    return parser


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    overrides = list(args.overrides) + ([f"data.cache_dir={args.cache_dir}"] if args.cache_dir else [])
    with usage_errors(parser, yaml.YAMLError):  # a bad setting: one line naming it, exit code 2
        config = load_config(args.config or [DEFAULT_CONFIG], overrides)
        if not config.data.cache_dir:
            raise ValueError("Expected `data.cache_dir` (or --cache-dir): the folder the cache goes to.")
        summary = build_conditioning_cache(config, shard=args.shard, progress=not args.no_progress,
                                           items_per_shard=args.items_per_shard)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
