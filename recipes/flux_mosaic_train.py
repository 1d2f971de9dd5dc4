"""Train the MOSAIC reference LoRA of FLUX.1 (SCAL + MDL + flow matching, eq. 15).

With no arguments it trains a tiny random FLUX-architecture model on generated multi-subject
data on the CPU in about six minutes (``recipes/configs/main_cpu.yaml``; the world of the fidelity
study, in which the model learns to draw its references) and writes, in
``outputs/train/tiny``: ``config.yaml`` (the resolved config), ``checkpoints/step-N/``,
``metrics.jsonl`` and ``logs/`` (tensorboard), ``samples/step-N.png`` (validation contact
sheets), ``loss_curves.png``, ``pytorch_lora_weights.safetensors`` (+ the EMA version; with
``model.lora_format=comfyui`` also ``comfyui_lora_weights.safetensors``, the same LoRA in ComfyUI's
key names) and ``summary.json``. ``model.quantize=int8`` (or fp8, nf4, int8-bnb on a GPU) trains
the LoRA on a quantized frozen base.

Real runs (see docs/guide/training.md)::

    accelerate launch --config_file recipes/accelerate/multi_gpu.yaml recipes/flux_mosaic_train.py \\
        --config recipes/configs/flux_512.yaml data.root=/data/semalign-ms optim.lr=8e-5

    accelerate launch --config_file recipes/accelerate/fsdp.yaml recipes/flux_mosaic_train.py \\
        --config recipes/configs/flux_512.yaml ema_decay=null     # FSDP2: a base too large for one GPU

    python recipes/flux_mosaic_train.py --config recipes/configs/flux_512.yaml --resume latest

Settings: ``--config`` YAML files (later ones win), then ``dotted.key=value`` overrides;
``--output-dir DIR`` and ``--threads N`` are the overrides ``output_dir=DIR`` and ``cpu_threads=N``.
A bad setting stops the recipe with one line naming it and the accepted ones (exit code 2).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import yaml

from mosaic_kit.training import MosaicTrainer, load_config
from mosaic_kit.utils.cli import RecipeArgumentParser, add_output_dir, add_progress, add_threads, usage_errors

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "main_cpu.yaml"


def build_parser() -> RecipeArgumentParser:
    parser = RecipeArgumentParser(description=__doc__.split("\n\n")[0],
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", help=f"YAML config (repeatable; default {DEFAULT_CONFIG.name})")
    parser.add_argument("--resume", help="'latest' or a checkpoint folder")
    parser.add_argument("--verbose", action="store_true", help="keep diffusers/transformers warnings (e.g. truncated captions)")
    add_output_dir(parser, "run folder (the setting output_dir)")
    add_threads(parser, help="torch CPU threads (the setting cpu_threads)")
    add_progress(parser)
    parser.add_argument("overrides", nargs="*", help="dotted.key=value settings, e.g. optim.lr=8e-5 data.batch_size=2")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.verbose:  # per-step caption truncation warnings would drown the progress bar
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.set_verbosity_error()
        transformers_logging.set_verbosity_error()
    overrides = list(args.overrides)
    overrides += [f"output_dir={args.output_dir}"] if args.output_dir else []
    overrides += [f"cpu_threads={args.threads}"] if args.threads else []
    with usage_errors(parser, yaml.YAMLError):  # a bad setting: one line naming it, exit code 2
        config = load_config(args.config or [DEFAULT_CONFIG], overrides)
    on_step_end = None
    kill_at = os.environ.get("MOSAIC_KILL_AT_STEP")  # fault injection for the resume tests
    if kill_at:
        def on_step_end(trainer, step):
            if step == int(kill_at):
                os.kill(os.getpid(), signal.SIGKILL)
    trainer = MosaicTrainer(config, on_step_end=on_step_end, progress=not args.no_progress)
    trainer.resume = args.resume
    with usage_errors(parser):  # settings only the set-up can check (models, data folders)
        trainer.setup()
    summary = trainer.train()
    if summary:
        print(json.dumps({k: summary[k] for k in ("steps", "seconds", "lora", "loss_curves")}))
    return summary


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
