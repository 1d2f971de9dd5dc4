"""DreamBench evaluation (single- and multi-subject): CLIP-I, CLIP-T and DINO, as in the paper's Table 1.

Two modes:

- ``--generate``: generate every case with a model family of the registry (``--family NAME``,
  default flux1: `MosaicFluxPipeline`; ``--base`` + ``--lora``, or ``--tiny`` for tiny random
  components; ``--family-option KEY=VALUE`` for the family's declared options, by default those
  the LoRA file records) into ``OUT/images``, then score: each image is one ``family.sample``
  (`mosaic_kit.eval.xversebench.FamilySampler`) with every photo fitted on white into a
  ``--ref-size`` square first (the released preprocessing);
- ``--score-only DIR``: score images another tool wrote, laid out by case::

      DIR/single/<subject>/<prompt index:02d>/<image>.png   # e.g. single/dog/03/00.png
      DIR/multi/<pair index:02d>/<image>.png                # index in pairs_multi.json

  (``.png``, ``.jpg``, ``.jpeg`` or ``.webp``, taken in file-name order, at most
  ``--images-per-prompt`` per case).

Outputs in ``--output-dir``: ``cases/<case id>.json`` (per case, written when the case is done, so a
rerun resumes), ``results.csv``, ``results.json``, ``summary.json``, ``summary.md`` (the Table 1
layout), ``sheets/`` (contact sheets) and ``settings.json`` (a rerun with other settings is refused
unless ``--overwrite``). Metric models come from ``--clip`` and ``--dino`` (local folders or hub
ids); ``--tiny-metrics`` uses tiny random ones (smoke tests and CPU demos: the numbers mean
nothing). The photos are read from ``--dreambench``, by default ``$MOSAIC_DREAMBENCH`` or the
folder ``python recipes/fetch_dreambench.py`` fills. The protocol is described in
``docs/evaluation.md``; the logic lives in `mosaic_kit.eval`.

Examples::

    # the paper's protocol with the released checkpoint (3,000 + 80 images)
    python recipes/evaluate.py --generate --base black-forest-labs/FLUX.1-dev \\
        --lora mosaic_lora.safetensors --output-dir runs/dreambench
    # FLUX.1-Kontext with a LoRA trained for ComfyUI's `index` reference method
    python recipes/evaluate.py --generate --family kontext --base black-forest-labs/FLUX.1-Kontext-dev \\
        --lora outputs/train/kontext/lora --family-option reference_method=index --output-dir runs/kontext
    # a quick CPU smoke run (any --family; flux2 and qwen_edit_plus need --ref-size 64)
    python recipes/evaluate.py --generate --tiny --tiny-metrics --max-subjects 2 --max-prompts 2 \\
        --max-multi 1 --images-per-prompt 1 --height 32 --width 32 --ref-size 32 --steps 2 \\
        --output-dir runs/smoke
    # score another method's images
    python recipes/evaluate.py --score-only other_method/ --output-dir runs/other

XVerseBench (``--benchmark xversebench``, ``docs/eval/xversebench.md``): the case files come
from XVerse's repository (``--xversebench DIR`` or ``$MOSAIC_XVERSEBENCH``); images at 768² with
256² references, 4 per case, seeds 42-45; DPG, ID-Sim, IP-Sim, AES and AVG per split and per
subject count, beside the paper's Table 2; ``--judge PATH`` adds the OmniContext-style MLLM judge
(``docs/eval/judge.md``). ``--shard i/n`` runs every n-th case from i into the same ``--output-dir``::

    python recipes/evaluate.py --benchmark xversebench --xversebench XVerse/ --generate \\
        --base black-forest-labs/FLUX.1-dev --lora mosaic_lora.safetensors --vqa Qwen/Qwen2.5-VL-7B-Instruct \\
        --no-metric id_sim --output-dir runs/xversebench
    # a CPU smoke run on tiny random models (the numbers mean nothing; --family flux2 needs --ref-size 64)
    python recipes/evaluate.py --benchmark xversebench --xversebench XVerse/ --generate --tiny \\
        --tiny-metrics --max-cases 2 --images-per-prompt 1 --height 32 --width 32 --ref-size 32 --steps 2 \\
        --max-sequence-length 16 --output-dir runs/xsmoke
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from mosaic_kit.data import dreambench_root
from mosaic_kit.eval import (
    DEFAULT_CROP_SIZES,
    DEFAULT_CROP_STRIDE,
    DREAMBENCH_ENV,
    SETTINGS,
    CLIPScorer,
    DINOScorer,
    DreamBench,
    GenerationSettings,
    check_run_settings,
    evaluate_cases,
    list_cases,
    summary_markdown,
    tiny_clip_scorer,
    tiny_dino_scorer,
)
from mosaic_kit.eval.paper import dreambench_paper_table
from mosaic_kit.models.options import parse_family_options, resolve_family_options
from mosaic_kit.pipelines import family_names, get_family
from mosaic_kit.utils.cli import (
    RecipeArgumentParser,
    add_output_dir,
    add_progress,
    add_shard,
    add_threads,
    one_line,
    usage_errors,
)

XVERSEBENCH_ENV = "MOSAIC_XVERSEBENCH"
BENCHMARKS = ("dreambench", "xversebench")
XVERSE_METRICS = ("dpg", "id_sim", "ip_sim", "aes")

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def build_parser() -> RecipeArgumentParser:
    parser = RecipeArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--benchmark", choices=BENCHMARKS, default="dreambench", help="which benchmark (default dreambench)")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--generate", action="store_true",
                      help="generate the images with the --family's pipeline (family.sample), then score")
    mode.add_argument("--score-only", type=Path, metavar="DIR", help="score the images in DIR (laid out by case)")
    add_output_dir(parser, "run folder (resumable; required)", type=Path, deprecated=("--out",))
    parser.add_argument("--dreambench", type=Path, default=None,
                        help=f"DreamBench folder (default ${DREAMBENCH_ENV}, else the folder recipes/fetch_dreambench.py fills)")

    cases = parser.add_argument_group("cases")
    cases.add_argument("--setting", action="append", choices=SETTINGS, help="single and/or multi (default both)")
    cases.add_argument("--max-subjects", type=int, default=None, help="subjects drawn for single-subject cases (default all)")
    cases.add_argument("--max-prompts", type=int, default=None, help="prompts drawn per kind (default all 25)")
    cases.add_argument("--max-multi", type=int, default=None, help="multi-subject cases drawn (default all)")
    cases.add_argument("--images-per-prompt", type=int, default=4, help="images per case (DreamBench and XVerseBench: 4)")
    cases.add_argument("--seed", type=int, default=None,
                       help="seed of the draws and of the generation noise (default 0; XVerseBench: 42, image i uses seed + i)")
    cases.add_argument("--identifier", default="", help="the {0} token of the prompts (e.g. sks); default empty")

    gen = parser.add_argument_group("generation (--generate)")
    gen.add_argument("--tiny", action="store_true", help="the family over tiny random components built in code")
    gen.add_argument("--base", default=None,
                     help="the family's base pipeline: folder or hub id (e.g. black-forest-labs/FLUX.1-dev for flux1)")
    gen.add_argument("--lora", type=Path, default=None, help="the family's MOSAIC LoRA file (or a folder holding one)")
    gen.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    gen.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="pipeline dtype (tiny: float32)")
    gen.add_argument("--family", choices=family_names(), default=family_names()[0],
                     help=f"a model family of the registry, its own pipeline with the LoRA (default {family_names()[0]})")
    gen.add_argument("--family-option", action="append", default=[], metavar="KEY=VALUE",
                     help="an option the family declares (repeatable), e.g. reference_method=index for kontext; "
                          "default: what the LoRA file records, else the family's")
    gen.add_argument("--height", type=int, default=None, help="default 512 (XVerseBench: 768)")
    gen.add_argument("--width", type=int, default=None, help="default 512 (XVerseBench: 768)")
    gen.add_argument("--ref-size", type=int, default=None,
                     help="reference square side given to the pipeline (default 512; XVerseBench: 256)")
    gen.add_argument("--reference-index", type=int, default=0, help="which photo of each subject is the reference")
    gen.add_argument("--steps", type=int, default=28)
    gen.add_argument("--guidance", type=float, default=3.5)
    gen.add_argument("--max-sequence-length", type=int, default=512,
                     help="recorded in settings.json only: each family samples with its own prompt length")

    metrics = parser.add_argument_group("metrics")
    metrics.add_argument("--clip", default="openai/clip-vit-base-patch32", help="CLIP model: folder or hub id")
    metrics.add_argument("--dino", default="facebook/dino-vits16", help="DINO ViT-S/16: folder or hub id")
    metrics.add_argument("--tiny-metrics", action="store_true", help="tiny random metric models (smoke tests only)")
    metrics.add_argument("--metrics-device", default=None, help="device of the metric models (default --device)")
    metrics.add_argument("--batch-size", type=int, default=32, help="images per metric forward pass")
    metrics.add_argument("--crop-sizes", type=float, nargs="+", default=list(DEFAULT_CROP_SIZES),
                         help="multi-subject crop sides, fractions of the shorter image side")
    metrics.add_argument("--crop-stride", type=float, default=DEFAULT_CROP_STRIDE, help="crop step, fraction of the crop side")

    xverse = parser.add_argument_group("XVerseBench (--benchmark xversebench)")
    xverse.add_argument("--xversebench", type=Path, default=None,
                        help=f"XVerse's repository folder, holding eval/tools/XVerseBench_*.json and assets/ (default ${XVERSEBENCH_ENV})")
    xverse.add_argument("--split", action="append", choices=("single", "multi"), help="single and/or multi (default both)")
    xverse.add_argument("--max-cases", type=int, default=None, help="the first N cases of each split (default all)")
    add_shard(xverse, "i/n: every n-th case from i (default 0/1)")
    xverse.add_argument("--vqa", default=None,
                        help="DPG: a transformers vision-language model (folder or hub id); default XVerse's mPLUG through modelscope")
    xverse.add_argument("--grounder", default="florence-community/Florence-2-large", help="IP-Sim grounding: Florence-2 (folder or hub id)")
    xverse.add_argument("--segmenter", default="facebook/sam2.1-hiera-large", help="IP-Sim segmentation: SAM 2.1 (folder or hub id)")
    xverse.add_argument("--ip-dino", default="facebook/dino-vits16", help="IP-Sim DINO (XVerse's code: dino-vits16)")
    xverse.add_argument("--aes-input", choices=("grid", "images"), default="grid",
                        help="AES on the 2x2 grid of a case's images (XVerse) or the mean over its images")
    xverse.add_argument("--no-metric", action="append", choices=XVERSE_METRICS, default=[],
                        help="skip a metric (e.g. id_sim, whose face models are not in transformers); AVG is then n/a")
    xverse.add_argument("--judge", default=None, help="OmniContext-style MLLM judge: a vision-language model (folder or hub id; tiny: a tiny random one)")
    xverse.add_argument("--judge-prompts", type=Path, default=None,
                        help="folder with prompt_following.txt and subject_consistency.txt (default: the packaged prompts)")

    misc = parser.add_argument_group("run")
    misc.add_argument("--overwrite", action="store_true", help="redo finished cases and replace settings.json")
    misc.add_argument("--allow-missing", action="store_true", help="--score-only: skip cases without images")
    misc.add_argument("--no-sheets", action="store_true", help="do not write contact sheets")
    misc.add_argument("--thumb-size", type=int, default=128, help="contact-sheet thumbnail side")
    add_progress(misc, deprecated=("--quiet",))
    add_threads(misc)
    return parser


def parse_args(argv: list[str] | None = None, parser: RecipeArgumentParser | None = None) -> argparse.Namespace:
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    if args.output_dir is None:
        parser.error("the following arguments are required: --output-dir")
    xverse = args.benchmark == "xversebench"
    defaults = {"height": 768, "width": 768, "ref_size": 256, "seed": 42} if xverse else {
        "height": 512, "width": 512, "ref_size": 512, "seed": 0}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if xverse and args.xversebench is None:
        if XVERSEBENCH_ENV not in os.environ:
            parser.error(f"--benchmark xversebench needs --xversebench DIR (XVerse's repository) or ${XVERSEBENCH_ENV}")
        args.xversebench = Path(os.environ[XVERSEBENCH_ENV])
    if args.score_only is not None and args.tiny:
        parser.error("--tiny only applies to --generate")
    if args.generate and not args.tiny and (args.lora is None or args.base is None):
        parser.error("--generate needs --base (the family's pipeline) and --lora (the MOSAIC weights), or --tiny")
    args.family_options = {}
    if args.generate:
        with usage_errors(parser):  # an option the family does not declare, or one the LoRA contradicts
            args.family_options = resolve_family_options(
                get_family(args.family).family_class, parse_family_options(args.family_option), args.lora)
    return args


def run_settings(args: argparse.Namespace) -> dict:
    """What shapes the per-case results (stored in settings.json, compared on resume)."""
    settings = {
        "mode": "generate" if args.generate else "score-only",
        "images_per_prompt": args.images_per_prompt,
        "identifier": args.identifier,
        "metrics": "tiny" if args.tiny_metrics else {"clip": args.clip, "dino": args.dino},
        "crop_sizes": args.crop_sizes,
        "crop_stride": args.crop_stride,
    }
    if args.generate:
        settings["pipeline"] = "tiny" if args.tiny else {"base": args.base, "lora": str(args.lora), "dtype": args.dtype}
        settings.update(family=args.family, family_options=args.family_options)
        settings.update(
            seed=args.seed, height=args.height, width=args.width, ref_size=args.ref_size,
            reference_index=args.reference_index, steps=args.steps, guidance=args.guidance,
            max_sequence_length=args.max_sequence_length,
        )
    else:
        settings["images"] = str(args.score_only.resolve())
    return settings


def load_pipeline(args: argparse.Namespace):
    """The chosen family of the registry as the benchmarks' pipeline (generation mode only): built
    with its options, the LoRA loaded through ``family.load_lora``, each call one ``family.sample``
    (`FamilySampler`)."""
    from mosaic_kit.eval.xversebench import FamilySampler
    from mosaic_kit.pipelines import build_family

    family = build_family(args.family, None if args.tiny else args.base, torch_dtype=DTYPES[args.dtype],
                          seed=args.seed, family_options=args.family_options)
    family.to(args.device)
    if args.lora is not None:
        family.load_lora(args.lora)
    return FamilySampler(family)


def load_scorers(args: argparse.Namespace) -> tuple[CLIPScorer, DINOScorer]:
    progress = not args.no_progress
    if args.tiny_metrics:
        return (tiny_clip_scorer(batch_size=args.batch_size, progress=progress),
                tiny_dino_scorer(batch_size=args.batch_size, progress=progress))
    device = args.metrics_device or args.device
    return (CLIPScorer.from_pretrained(args.clip, device=device, batch_size=args.batch_size, progress=progress),
            DINOScorer.from_pretrained(args.dino, device=device, batch_size=args.batch_size, progress=progress))


def xverse_settings(args: argparse.Namespace) -> dict:
    """What shapes XVerseBench's per-case records (stored in settings.json, compared on resume)."""
    settings = {
        "benchmark": "xversebench",
        "mode": "generate" if args.generate else "score-only",
        "images_per_prompt": args.images_per_prompt,
        "metrics": "tiny" if args.tiny_metrics else {
            "vqa": args.vqa or "mplug (modelscope)", "grounder": args.grounder, "segmenter": args.segmenter,
            "dino": args.ip_dino, "skipped": sorted(args.no_metric)},
        "aes_input": args.aes_input,
        "judge": None if args.judge is None else {"model": args.judge, "prompts": str(args.judge_prompts or "packaged")},
    }
    if args.generate:
        settings["pipeline"] = f"tiny-{args.family}" if args.tiny else {
            "family": args.family, "base": args.base, "lora": str(args.lora), "dtype": args.dtype}
        if args.family_options:
            settings["family_options"] = args.family_options
        settings.update(seed=args.seed, height=args.height, width=args.width, ref_size=args.ref_size, steps=args.steps,
                        guidance=args.guidance, max_sequence_length=args.max_sequence_length)
    else:
        settings["images"] = str(args.score_only.resolve())
    return settings


def load_xverse_pipeline(args: argparse.Namespace):
    """(pipeline, XVerseGeneration) for the chosen family of the registry (generation mode only):
    `load_pipeline`, the references prepared at the benchmark's size."""
    from mosaic_kit.eval.xversebench import XVerseGeneration

    generation = XVerseGeneration(height=args.height, width=args.width, reference_size=args.ref_size,
                                  num_inference_steps=args.steps, guidance_scale=args.guidance, seed=args.seed,
                                  reference_argument="reference_images", pass_reference_size=False)
    return load_pipeline(args), generation


def load_xverse_scorers(args: argparse.Namespace):
    """The XVerseBench scorers (tiny random ones with --tiny-metrics) and the optional judge."""
    from mosaic_kit.eval.judge import MLLMJudge, load_judge_prompt
    from mosaic_kit.eval.vlm import VisionLanguageModel, tiny_vision_language_model
    from mosaic_kit.eval.xversebench import (
        AestheticPredictorV25, Florence2Grounder, ModelScopeVQA, Sam2Segmenter, SubjectSimilarityScorer,
        VLMQuestionAnswerer, XVerseScorers, tiny_xverse_scorers, xverse_dino_scorer,
    )

    device = args.metrics_device or args.device
    if args.tiny_metrics:
        scorers = tiny_xverse_scorers(args.seed)
    else:
        scorers = XVerseScorers()
        if "dpg" not in args.no_metric:
            scorers.vqa = (VLMQuestionAnswerer(VisionLanguageModel.from_pretrained(args.vqa, device=device))
                           if args.vqa else ModelScopeVQA(device="gpu" if str(device).startswith("cuda") else "cpu"))
        if "id_sim" not in args.no_metric:
            raise ValueError(
                "Expected --no-metric id_sim: XVerse's ID-Sim models (facer's RetinaFace and an IR-SE50 ArcFace backbone) "
                "are not in transformers and mosaic_kit does not build them; score ID-Sim from Python with "
                "FaceIdentityScorer(FacerRetinaFace(), ModuleFaceEmbedder(your_ir_se50)) (docs/eval/xversebench.md)."
            )
        if "ip_sim" not in args.no_metric:
            import transformers

            dino = xverse_dino_scorer(transformers.AutoModel.from_pretrained(args.ip_dino).to(device), batch_size=args.batch_size)
            scorers.subjects = SubjectSimilarityScorer(Florence2Grounder.from_pretrained(args.grounder, device=device),
                                                       Sam2Segmenter.from_pretrained(args.segmenter, device=device), dino)
        if "aes" not in args.no_metric:
            scorers.aesthetics = AestheticPredictorV25(device=device)
    for metric in args.no_metric:
        setattr(scorers, {"dpg": "vqa", "id_sim": "faces", "ip_sim": "subjects", "aes": "aesthetics"}[metric], None)
    scorers.aes_input = args.aes_input
    judge = None
    if args.judge is not None:
        backend = tiny_vision_language_model(args.seed) if args.judge == "tiny" else VisionLanguageModel.from_pretrained(args.judge, device=device)
        prompts = {}
        if args.judge_prompts is not None:
            prompts = {name: load_judge_prompt(args.judge_prompts / f"{name}.txt")
                       for name in ("prompt_following", "subject_consistency")}
        judge = MLLMJudge(backend, **prompts)
    return scorers, judge


def main_xversebench(args: argparse.Namespace) -> dict:
    """XVerseBench: load the case files, generate or find the images, score, summarise."""
    from mosaic_kit.eval.xversebench import XVerseBench, evaluate_xversebench, list_cases, summary_markdown as xsummary

    splits = tuple(args.split or ("single", "multi"))
    bench = XVerseBench.load(args.xversebench, splits=splits, num_images=args.images_per_prompt)
    cases = list_cases(bench, splits=splits, max_cases=args.max_cases, shard=args.shard)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    check_run_settings(args.output_dir, xverse_settings(args), overwrite=args.overwrite)
    pipe, generation = load_xverse_pipeline(args) if args.generate else (None, None)
    scorers, judge = load_xverse_scorers(args)
    extra = {"generation": generation} if generation is not None else {}
    summary = evaluate_xversebench(
        bench, cases, args.output_dir, scorers, images_root=args.score_only, pipe=pipe, judge=judge,
        overwrite=args.overwrite, allow_missing=args.allow_missing, progress=not args.no_progress, **extra,
    )
    print(xsummary(summary))
    return summary


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    args = parse_args(argv, parser)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.benchmark == "xversebench":
        with usage_errors(parser):  # bad options, missing case files, another run's folder: one line, exit code 2
            return main_xversebench(args)
    with usage_errors(parser):  # bad options, missing photos, another run's folder: one line, exit code 2
        bench = DreamBench.load(args.dreambench or dreambench_root())
        cases = list_cases(
            bench,
            settings=args.setting or SETTINGS,
            max_subjects=args.max_subjects,
            max_prompts=args.max_prompts,
            max_multi=args.max_multi,
            images_per_prompt=args.images_per_prompt,
            seed=args.seed,
            identifier=args.identifier,
        )
        args.output_dir.mkdir(parents=True, exist_ok=True)
        check_run_settings(args.output_dir, run_settings(args), overwrite=args.overwrite)
        generation = GenerationSettings(
            height=args.height, width=args.width, num_inference_steps=args.steps, guidance_scale=args.guidance,
            seed=args.seed, reference_index=args.reference_index, reference_size=args.ref_size,
        )
        pipe = load_pipeline(args) if args.generate else None  # a LoRA of another family or options: one line
    clip, dino = load_scorers(args)
    summary = evaluate_cases(
        bench, cases, args.output_dir, clip, dino,
        images_root=args.score_only, pipe=pipe, generation=generation,
        crop_sizes=args.crop_sizes, crop_stride=args.crop_stride,
        overwrite=args.overwrite, allow_missing=args.allow_missing,
        sheets=not args.no_sheets, thumb_size=args.thumb_size, progress=not args.no_progress,
    )
    print(summary_markdown(summary, crop_sizes=args.crop_sizes, crop_stride=args.crop_stride))
    print(dreambench_paper_table(summary))
    return summary


if __name__ == "__main__":
    try:
        main()
    except ValueError as error:  # bad inputs met during the run: one line, not a traceback
        sys.exit(f"error: {one_line(error)}")
