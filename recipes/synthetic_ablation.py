"""The synthetic ablation: does SCAL, then MDL, change attention and generated subjects?

Trains a tiny pixel-space FLUX-architecture model with `MosaicTrainer` (the code path of
``recipes/flux_mosaic_train.py``) on the synthetic multi-subject world in three settings
(diffusion only; + SCAL; + SCAL + MDL, eq. 15) for several seeds, scores every run on held-out
subjects for K = 1…6 with `mosaic_kit.eval.evaluate_synthetic`, and writes, in the output folder:

- ``runs/<setting>/seed<N>/``: the trainer's files (config, metrics.jsonl, loss curves, final
  checkpoint, LoRA), ``transformer.safetensors`` (the whole trained transformer:
  ``train.model.trainable: all``), ``eval.json`` (every score), ``figure.pt`` (the figure sample's attention maps);
- ``results.json`` (everything: per run, per K, per noise level, baselines, timings),
  ``records.csv`` (one line per scored sample), ``per_k.csv``;
- ``table.md`` (the analogue of the paper's Table 3 and a per-noise-level table);
- ``attention_vs_k.png``, ``fidelity_vs_k.png``, ``attention_maps.png`` (the paper's Fig. 6 in
  this world), ``samples.png`` (generated images per setting).

Finished (setting, seed) runs are skipped, so an interrupted command resumes where it stopped (a
run interrupted during training starts that run over). ``--publish DIR`` copies the PNGs into
``DIR`` as ``synthetic_<name>.png`` (the docs page uses ``docs/results``).

    python recipes/synthetic_ablation.py                  # --preset cpu: about 25 min on 2 cores
    python recipes/synthetic_ablation.py --preset gpu     # larger, for one GPU
    python recipes/synthetic_ablation.py --preset flux2-cpu   # the FLUX.2 family, about 30 min
    python recipes/synthetic_ablation.py --smoke --output-dir /tmp/ablation   # seconds

Settings: ``--preset`` or ``--config`` YAML, then ``dotted.key=value`` overrides of its
``ablation``, ``eval`` and ``train`` sections (``--output-dir`` and ``--threads`` set
``ablation.output_dir`` and ``ablation.threads``). Every setting, the training settings of each
ablation setting included, is checked before the first run: a bad one stops the recipe with one
line naming it and the accepted ones (exit code 2).
"""

from __future__ import annotations

import argparse
import csv
import gc
import io
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch
import yaml

from mosaic_kit.eval import (
    INTERVALS,
    METRICS,
    SyntheticEvalConfig,
    ablation_table,
    evaluate_synthetic,
    fidelity_baselines,
    held_out_world,
    mean_interval,
    plot_attention_maps,
    plot_metric_against_k,
    summarise_records,
)
from mosaic_kit.losses import MosaicObjective
from mosaic_kit.training import MosaicTrainer, apply_overrides, config_from_dict
from mosaic_kit.utils import atomic_write, save_image_atomic, tensor_to_pil, write_text_atomic
from mosaic_kit.utils.cli import RecipeArgumentParser, add_output_dir, add_progress, add_threads, usage_errors

CONFIGS = Path(__file__).resolve().parent / "configs"
PRESETS = {"cpu": CONFIGS / "synthetic_cpu.yaml", "gpu": CONFIGS / "synthetic_gpu.yaml",
           "flux2-cpu": CONFIGS / "synthetic_flux2_cpu.yaml",  # the FLUX.2 family (docs/results/synthetic.md)
           # the small world of the fidelity study (docs/results/fidelity.md)
           "fidelity-cpu": CONFIGS / "fidelity_cpu.yaml", "fidelity-flux2-cpu": CONFIGS / "fidelity_flux2_cpu.yaml"}
SMOKE = [
    "ablation.seeds=[0]", "ablation.figure_sample=[2,0]", "ablation.sheet_num_refs=[2]",
    "eval.num_refs=[1,2]", "eval.attention_samples=2", "eval.sigmas=[0.5]", "eval.generation_samples=1",
    "eval.inference_steps=2", "eval.batch_size=2", "eval.target_size=64", "eval.ref_size=32",
    "train.max_steps=2", "train.log_every=1", "train.data.batch_size=2", "train.data.target_size=64",
    "train.data.ref_size=32", "train.model.lora_rank=4",
    "train.model.tiny_overrides={num_layers: 1, num_single_layers: 1, num_attention_heads: 2, attention_head_dim: 16}",
]
ABLATION_KEYS = {"output_dir", "seeds", "settings", "threads", "figure_sample", "sheet_num_refs", "interval",
                 "held_out_eval"}
ATTENTION_PLOT = ["hit_rate", "log_prob", "overlap", "own_mass"]
FIDELITY_PLOT = ["denoise_mse", "ref_gain", "sample_presence", "sample_ncc", "sample_colour", "sample_leakage"]
SAMPLE_METRICS = ["sample_presence", "sample_ncc", "sample_colour", "sample_leakage"]


def build_parser() -> RecipeArgumentParser:
    parser = RecipeArgumentParser(description=__doc__.split("\n\n")[0],
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="config preset (default cpu)")
    parser.add_argument("--config", help="a YAML file instead of the preset")
    add_output_dir(parser, "output folder (default: ablation.output_dir)", deprecated=("--output",))
    add_threads(parser, help="torch CPU threads (default: ablation.threads)")
    add_progress(parser)
    parser.add_argument("--smoke", action="store_true", help="tiny steps and samples (tests)")
    parser.add_argument("--publish", help="copy the PNGs here, prefixed 'synthetic_' (the docs use docs/results)")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. train.max_steps=200 ablation.seeds=[0,1]")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def load_settings(args: argparse.Namespace) -> dict:
    path = Path(args.config) if args.config else PRESETS[args.preset]
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict) or set(values) - {"ablation", "eval", "train"}:
        raise ValueError(f"Expected {path} to hold the sections ablation, eval and train, but got {sorted(values)}.")
    if args.smoke:  # the smoke model shrinks along the config's own tiny_overrides keys only (Qwen-Image: no single blocks)
        own = dict(((values.get("train") or {}).get("model") or {}).get("tiny_overrides") or {})
        values = apply_overrides(values, SMOKE)
        model = values["train"]["model"]
        if own:
            model["tiny_overrides"] = {k: v for k, v in model["tiny_overrides"].items() if k in own}
    values = apply_overrides(values, list(args.overrides))
    ablation = values.get("ablation") or {}
    if "train_base" in ablation:
        raise ValueError("`ablation.train_base` is now the training setting `train.model.trainable` (lora or all); "
                         f"got ablation.train_base = {ablation['train_base']!r}.")
    unknown = set(ablation) - ABLATION_KEYS
    if unknown:
        raise ValueError(f"Unknown settings in `ablation`: {sorted(unknown)}; expected among {sorted(ABLATION_KEYS)}.")
    if args.output_dir:
        ablation["output_dir"] = args.output_dir
    if args.threads:
        ablation["threads"] = args.threads
    settings = ablation.get("settings")
    if not isinstance(settings, dict) or not settings:
        raise ValueError(f"Expected `ablation.settings` to map names to objective overrides, but got {settings!r}.")
    if ablation.get("interval", "std") not in INTERVALS:
        raise ValueError(f"Expected `ablation.interval` to be one of {list(INTERVALS)}, but got {ablation['interval']!r}.")
    eval_config = SyntheticEvalConfig(**(values.get("eval") or {}))
    held_out = held_out_config(values.get("eval") or {}, ablation.get("held_out_eval"))
    config_from_dict(values.get("train") or {})  # validates the shared training settings once
    for name, overrides in settings.items():  # and each setting's objective, before hours of runs
        if overrides is not None and not isinstance(overrides, dict):
            raise ValueError(f"Expected `ablation.settings.{name}` to map objective settings to values, "
                             f"but got {overrides!r}.")
        objective = run_config(values.get("train") or {}, overrides or {}, 0, Path(".")).objective
        MosaicObjective.from_preset(objective.preset, **objective.overrides)
    return {"path": str(path), "ablation": ablation, "eval": eval_config, "eval_dict": values.get("eval") or {},
            "held_out_eval": held_out, "train": values.get("train") or {}, "progress": not args.no_progress}


def held_out_config(eval_values: dict, overrides: dict | None) -> SyntheticEvalConfig | None:
    """The secondary evaluation on held-out identities (``ablation.held_out_eval``: overrides of
    the ``eval`` section, e.g. fewer samples), for a main evaluation on the trained identities
    (``eval.world.identity_range``); None when not asked for."""
    if overrides is None:
        return None
    if not isinstance(overrides, dict):
        raise ValueError(f"Expected `ablation.held_out_eval` to map eval settings to values, but got {overrides!r}.")
    values = {**json.loads(json.dumps(eval_values)), **overrides}
    values["world"] = {k: v for k, v in (values.get("world") or {}).items() if k != "identity_range"}
    return SyntheticEvalConfig(**values)


def run_config(train: dict, setting_overrides: dict, seed: int, run_dir: Path):
    values = json.loads(json.dumps(train))  # deep copy
    values["output_dir"] = str(run_dir)
    values["seed"] = seed
    values.setdefault("model", {})["tiny_seed"] = seed
    values.setdefault("data", {})["seed"] = seed
    objective = values.setdefault("objective", {})
    objective["overrides"] = {**(objective.get("overrides") or {}), **setting_overrides}
    return config_from_dict(values)


def train_and_evaluate(name: str, seed: int, settings: dict, run_dir: Path) -> dict:
    """One (setting, seed): train (or load the finished weights), evaluate, write eval.json."""
    from safetensors.torch import load_file, save_file

    ablation = settings["ablation"]
    config = run_config(settings["train"], ablation["settings"][name] or {}, seed, run_dir)
    weights = run_dir / "transformer.safetensors"
    trained = (run_dir / "summary.json").is_file() and weights.is_file()
    if not trained and run_dir.exists():
        shutil.rmtree(run_dir)  # an interrupted run starts over (checkpoints hold the LoRA only)
    trainer = MosaicTrainer(config, progress=settings["progress"])
    start = time.perf_counter()
    if trained:
        trainer.setup()
        trainer.pipe.transformer.load_state_dict(load_file(str(weights)))
        train_seconds = json.loads((run_dir / "summary.json").read_text())["seconds"]
    else:
        summary = trainer.train()
        if trainer.ema is not None:
            trainer.ema.copy_to(trainer.lora_parameters)
        state = {k: v.detach().contiguous().cpu() for k, v in trainer.pipe.transformer.state_dict().items()}
        save_file(state, str(weights))
        train_seconds = summary["seconds"]
    figure_sample = tuple(ablation.get("figure_sample") or ()) or None
    eval_start = time.perf_counter()
    result = evaluate_synthetic(trainer.family, settings["eval"], figure_sample=figure_sample,
                                progress=lambda line: print(f"  [{name} seed {seed}] {line}", flush=True))
    held_out = settings.get("held_out_eval")
    held_out_records = []
    if held_out is not None:
        held_out_records = evaluate_synthetic(trainer.family, held_out, figure_sample=None).records
    eval_seconds = time.perf_counter() - eval_start
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    payload = {
        "setting": name, "seed": seed, "objective_overrides": ablation["settings"][name] or {},
        "train_seconds": train_seconds, "eval_seconds": round(eval_seconds, 2),
        "final_losses": history[-1] if history else None, "records": result.records,
        "held_out_records": held_out_records,
    }
    if result.figure is not None:
        atomic_write(run_dir / "figure.pt", lambda stream: torch.save(result.figure, stream))
    atomic_write(run_dir / "images.pt", lambda stream: torch.save(dict(result.images), stream))
    write_text_atomic(run_dir / "eval.json", json.dumps(payload))  # written last: marks the run done
    done = "loaded the trained weights" if trained else f"trained in {train_seconds:.0f} s"
    print(f"[{name} seed {seed}] {done}, evaluated in {eval_seconds:.0f} s "
          f"(total {time.perf_counter() - start:.0f} s)", flush=True)
    del trainer, result
    gc.collect()
    return payload


def _finite(value: float) -> float | None:
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def sample_sheet(runs: dict, settings: dict, out: Path) -> Path:
    """References | ground truth | one generated image per setting (first seed), for a few K."""
    from PIL import Image, ImageDraw

    config: SyntheticEvalConfig = settings["eval"]
    world = held_out_world(config)
    size = config.target_size
    names = list(runs)
    rows = []
    for k in settings["ablation"].get("sheet_num_refs") or [2]:
        if k not in config.num_refs:
            continue
        sample = world.sample(0, num_refs=k)
        per_side = math.ceil(math.sqrt(k))
        grid = torch.ones(3, size, size)
        cell = size // per_side
        for j, image in enumerate(sample.references):
            small = torch.nn.functional.interpolate(image[None], size=(cell, cell), mode="bilinear", antialias=True)[0]
            r, c = divmod(j, per_side)
            grid[:, r * cell : (r + 1) * cell, c * cell : (c + 1) * cell] = small
        tiles = [grid, sample.target]
        for name in names:
            images = runs[name][0]["images"].get(k)
            tiles.append(images[0] if images is not None and len(images) else torch.zeros(3, size, size))
        rows.append(torch.cat([torch.cat((t, torch.ones(3, size, 2)), 2) for t in tiles], 2))
    if not rows:
        raise ValueError("Expected `ablation.sheet_num_refs` to name a K that is evaluated, but none is.")
    sheet = torch.cat([torch.cat((r, torch.ones(3, 2, r.shape[2])), 1) for r in rows], 1)
    scale = max(1, 384 // size)
    image = tensor_to_pil(sheet)
    image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    header = Image.new("RGB", (image.width, 18), "white")
    draw = ImageDraw.Draw(header)
    for i, title in enumerate(["references", "ground truth", *names]):
        draw.text((i * (size + 2) * scale + 4, 3), title, fill="black")
    full = Image.new("RGB", (image.width, image.height + 18), "white")
    full.paste(header, (0, 0))
    full.paste(image, (0, 18))
    return save_image_atomic(full, out / "samples.png")


def _csv(fields: list[str], rows: list[dict]) -> str:
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def aggregate(settings: dict, payloads: dict, baselines: list[dict], out: Path, wall: float) -> dict:
    names = list(payloads)
    config: SyntheticEvalConfig = settings["eval"]
    interval = settings["ablation"].get("interval", "std")
    overall = {n: [summarise_records(p["records"], by=())[0] for p in payloads[n]] for n in names}
    references = {
        "ground truth (real target)": summarise_records([r for r in baselines if r["kind"] == "ground_truth"],
                                                        by=(), metrics=SAMPLE_METRICS)[0],
        "chance (other subjects' target)": summarise_records([r for r in baselines if r["kind"] == "chance"],
                                                             by=(), metrics=SAMPLE_METRICS)[0],
    }
    table = ablation_table(overall, reference_rows=references, interval=interval)
    held_out_table, held_out_overall = None, None
    held_out = settings.get("held_out_eval")
    if held_out is not None and all(p.get("held_out_records") for n in names for p in payloads[n]):
        held_out_base = fidelity_baselines(held_out)
        held_out_overall = {n: [summarise_records(p["held_out_records"], by=())[0] for p in payloads[n]] for n in names}
        held_out_refs = {
            "ground truth (real target)": summarise_records([r for r in held_out_base if r["kind"] == "ground_truth"],
                                                            by=(), metrics=SAMPLE_METRICS)[0],
            "chance (other subjects' target)": summarise_records([r for r in held_out_base if r["kind"] == "chance"],
                                                                 by=(), metrics=SAMPLE_METRICS)[0],
        }
        held_out_table = ablation_table(held_out_overall, metrics=SAMPLE_METRICS, reference_rows=held_out_refs,
                                        interval=interval)

    sigma_lines = ["| setting | σ | hit-rate ↑ | log-prob ↑ | overlap ↓ | own mass ↑ | denoise MSE ↓ | ref gain ↑ |",
                   "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    per_sigma = {}
    for n in names:
        rows = [summarise_records(p["records"], by=("sigma",)) for p in payloads[n]]
        per_sigma[n] = rows
        for i, sigma in enumerate(config.sigmas):
            cells = []
            for metric in ("hit_rate", "log_prob", "overlap", "own_mass", "denoise_mse", "ref_gain"):
                mean, spread_value = mean_interval([r[i][metric] for r in rows], interval)
                cells.append(f"{mean:.3f} ± {spread_value:.3f}" if math.isfinite(spread_value) else f"{mean:.3f}")
            sigma_lines.append(f"| {n} | {sigma} | " + " | ".join(cells) + " |")

    k_ranges = {"K ≤ 4 (trained range)": [k for k in config.num_refs if k <= 4],
                "K ≥ 5 (beyond training)": [k for k in config.num_refs if k >= 5]}
    range_tables = []
    for title, ks in k_ranges.items():
        if not ks:
            continue
        per_range = {n: [summarise_records([r for r in p["records"] if r["num_refs"] in ks], by=())[0]
                         for p in payloads[n]] for n in names}
        range_tables.append(f"**{title}**\n\n" + ablation_table(
            per_range, metrics=["hit_rate", "overlap", "own_mass", "ref_gain", "sample_ncc", "sample_leakage"],
            interval=interval))
    if held_out_table is not None:
        range_tables.append("**Held-out identities (secondary: subjects never seen in training; "
                            f"{held_out.generation_samples} generated images per K)**\n\n" + held_out_table)

    spread = "standard deviation" if interval == "std" else "half-width of the 95 % Student-t interval of the mean"
    header = (f"Mean ± {spread} over seeds {settings['ablation']['seeds']}; every value is first "
              f"averaged over K = {list(config.num_refs)} ({config.attention_samples} evaluation samples per K, "
              f"σ = {list(config.sigmas)} for the teacher-forced scores; {config.generation_samples} generated "
              f"images per K for the sample scores).")
    markdown = "\n\n".join([header, table, "Per noise level (teacher-forced scores, all K):", "\n".join(sigma_lines),
                            *range_tables]) + "\n"
    write_text_atomic(out / "table.md", markdown)

    per_k_rows, curves = [], {m: {} for m in METRICS}
    for n in names:
        for p in payloads[n]:
            for row in summarise_records(p["records"], by=("num_refs",)):
                per_k_rows.append({"setting": n, "seed": p["seed"], **row})
                for metric in METRICS:
                    curves[metric].setdefault(n, {}).setdefault(row["num_refs"], []).append(row[metric])
    base_k = {kind: summarise_records([r for r in baselines if r["kind"] == kind], by=("num_refs",), metrics=SAMPLE_METRICS)
              for kind in ("ground_truth", "chance")}
    reference_lines = {m: {"ground truth": {r["num_refs"]: r[m] for r in base_k["ground_truth"]},
                           "chance": {r["num_refs"]: r[m] for r in base_k["chance"]}} for m in SAMPLE_METRICS}
    plot_metric_against_k(curves, out / "attention_vs_k.png", ATTENTION_PLOT)
    plot_metric_against_k(curves, out / "fidelity_vs_k.png", FIDELITY_PLOT, references=reference_lines)

    write_text_atomic(out / "per_k.csv", _csv(["setting", "seed", "num_refs", *METRICS], per_k_rows))
    records = [{"setting": n, "seed": p["seed"], **record} for n in names for p in payloads[n] for record in p["records"]]
    records += [{"setting": record["kind"], "seed": "", **record} for record in baselines]
    fields = ["setting", "seed", "kind", "num_refs", "index", "sigma", *METRICS, "other_mass"]
    write_text_atomic(out / "records.csv", _csv(fields, records))

    results = {
        "config": settings["path"], "ablation": settings["ablation"], "eval": settings["eval_dict"],
        "train": settings["train"], "wall_seconds": round(wall, 1),
        "run_seconds": {n: [round(p["train_seconds"] + p["eval_seconds"], 1) for p in payloads[n]] for n in names},
        "table_markdown": markdown,
        "overall": {n: overall[n] for n in names},
        "interval": interval,
        "held_out_overall": held_out_overall,
        "per_sigma": per_sigma,
        "per_k": per_k_rows,
        "baselines": {"overall": references, "per_k": base_k},
        "runs": {n: [{k: v for k, v in p.items() if k != "records"} for p in payloads[n]] for n in names},
        "hardware": {"torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
                     "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"},
    }
    clean = json.loads(json.dumps(results, default=str), parse_constant=lambda _: None)
    write_text_atomic(out / "results.json", json.dumps(clean, indent=1, default=str))
    return results


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    wall_start = time.perf_counter()
    with usage_errors(parser, yaml.YAMLError):  # a bad setting: one line naming it, exit code 2
        settings = load_settings(args)
    ablation = settings["ablation"]
    torch.set_num_threads(int(ablation.get("threads") or torch.get_num_threads()))
    out = Path(ablation.get("output_dir") or "outputs/ablation")
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "settings.yaml", yaml.safe_dump(
        {"ablation": ablation, "eval": settings["eval_dict"], "train": settings["train"]}, sort_keys=False))
    payloads: dict[str, list[dict]] = {}
    for seed in ablation["seeds"]:
        for name in ablation["settings"]:
            run_dir = out / "runs" / name / f"seed{seed}"
            if (run_dir / "eval.json").is_file():
                payload = json.loads((run_dir / "eval.json").read_text())
                print(f"[{name} seed {seed}] done earlier: skipped", flush=True)
            else:
                payload = train_and_evaluate(name, seed, settings, run_dir)
            payload["images"] = torch.load(run_dir / "images.pt", weights_only=True) if (run_dir / "images.pt").is_file() else {}
            payloads.setdefault(name, []).append(payload)
    baselines = fidelity_baselines(settings["eval"])
    figures = {}
    first_seed = ablation["seeds"][0]
    for name in ablation["settings"]:
        path = out / "runs" / name / f"seed{first_seed}" / "figure.pt"
        if path.is_file():
            figures[name] = torch.load(path, weights_only=True)
    if figures:
        plot_attention_maps(figures, out / "attention_maps.png")
    sample_sheet(payloads, settings, out)
    for payloads_of_setting in payloads.values():
        for payload in payloads_of_setting:
            payload.pop("images", None)
    wall = time.perf_counter() - wall_start
    results = aggregate(settings, payloads, baselines, out, wall)
    if args.publish:
        publish = Path(args.publish)
        publish.mkdir(parents=True, exist_ok=True)
        for name in ("attention_vs_k.png", "fidelity_vs_k.png", "attention_maps.png", "samples.png"):
            if (out / name).is_file():
                shutil.copyfile(out / name, publish / f"synthetic_{name}")
    print(results["table_markdown"])
    print(f"wall time: {wall:.0f} s ({wall / 60:.1f} min); outputs in {out}")
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
