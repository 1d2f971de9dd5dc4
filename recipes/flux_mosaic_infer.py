"""Generate one image from a prompt and K reference images with MOSAIC on FLUX.1 or FLUX.2.

Writes the image and a contact sheet (references beside the result).

Real weights (a local folder or a hub id of a FLUX.1 base, plus a MOSAIC LoRA file)::

    python recipes/flux_mosaic_infer.py --base black-forest-labs/FLUX.1-dev \\
        --lora mosaic_512.safetensors --references dog.jpg cat.jpg \\
        --prompt "a dog and a cat on a sofa" --output outputs/dog_cat.png --dtype bf16

FLUX.2 (``--family flux2``) runs the stock diffusers pipeline (`Flux2KleinPipeline` or
`Flux2Pipeline`, as the base's ``model_index.json`` says) with the trained LoRA loaded by its own
``load_lora_weights``; no mosaic_kit code is in the sampling path::

    python recipes/flux_mosaic_infer.py --family flux2 --base black-forest-labs/FLUX.2-klein-4B \
        --lora outputs/train/flux2_klein/lora --references dog.jpg cat.jpg \
        --prompt "a dog and a cat on a sofa" --output outputs/dog_cat.png --dtype bf16

With no ``--base`` it builds a tiny random pipeline of the family in code (nothing is downloaded)
and runs the whole path on the CPU in seconds; its image is noise, but every step is the real
one. Without ``--references`` it then uses two DreamBench photos (``--dreambench``, by default
``$MOSAIC_DREAMBENCH`` or the folder ``python recipes/fetch_dreambench.py`` fills) or, when there
are none, two drawn shapes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from mosaic_kit.data import find_dreambench
from mosaic_kit.eval.sheets import SheetRow, contact_sheet
from mosaic_kit.pipelines import MosaicFluxPipeline, load_reference_image, tiny_mosaic_pipeline
from mosaic_kit.utils import save_image_atomic
from mosaic_kit.utils.cli import DeprecatedAlias, RecipeArgumentParser, add_threads

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_parser() -> RecipeArgumentParser:
    parser = RecipeArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=("flux1", "flux2"), default="flux1",
                        help="model family: flux1 (MosaicFluxPipeline) or flux2 (stock Flux2KleinPipeline / Flux2Pipeline)")
    parser.add_argument("--base", help="base pipeline: a local folder or a hub id (default: a tiny random pipeline)")
    parser.add_argument("--lora", help="MOSAIC LoRA .safetensors file (or a folder holding one)")
    parser.add_argument("--references", nargs="+", help="reference image files, one per subject")
    parser.add_argument("--prompt", default="two subjects side by side on a table")
    parser.add_argument("--height", type=int, help="output height (default 512; 32 with the tiny pipeline)")
    parser.add_argument("--width", type=int, help="output width (default 512; 32 with the tiny pipeline)")
    parser.add_argument("--ref-size", type=int, help="reference square side (default 512; 32 tiny)")
    parser.add_argument("--steps", type=int, help="denoising steps (default 28, FLUX.2 [klein] 4; 4 tiny)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default 3.5; FLUX.2 4.0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reference-cache", action="store_true",
                        help="compute reference keys/values once (faster, references see only themselves)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", default="outputs/infer/result.png", metavar="FILE",
                        help="output image (the contact sheet goes beside it as <name>-sheet.png)")
    parser.add_argument("--out", dest="output", action=DeprecatedAlias, new="--output", help=argparse.SUPPRESS)
    parser.add_argument("--dreambench", type=Path, default=None,
                        help="DreamBench folder for the default references (default: $MOSAIC_DREAMBENCH, else the "
                             "folder recipes/fetch_dreambench.py fills; drawn shapes when there is none)")
    add_threads(parser)
    return parser


def parse_args(argv: list[str] | None = None, parser: RecipeArgumentParser | None = None) -> argparse.Namespace:
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    for path in (args.references or []):  # a missing or unreadable reference: one line, before any model loads
        try:
            load_reference_image(path, 0)
        except ValueError as error:
            parser.error(f"argument --references: {error}")
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def default_references(dreambench: Path | None, size: int) -> list[Image.Image | Path]:
    """Two DreamBench photos (``dreambench``, else the default copy) when there are, else two drawn shapes."""
    dreambench = dreambench or find_dreambench()
    picks = [dreambench / "dog", dreambench / "cat"] if dreambench else []
    if picks and all(p.is_dir() for p in picks):
        return [sorted(p.glob("*.jp*g"))[0] for p in picks]
    shapes = []
    for colour, draw in (("red", "ellipse"), ("blue", "rectangle")):
        image = Image.new("RGB", (size, size), "white")
        getattr(ImageDraw.Draw(image), draw)([size // 5, size // 5, 4 * size // 5, 4 * size // 5], fill=colour)
        shapes.append(image)
    return shapes


def run_flux2(args: argparse.Namespace, tiny: bool) -> tuple[list[Image.Image], list[Image.Image], dict]:
    """The stock FLUX.2 pipeline with the LoRA through its own ``load_lora_weights``; returns
    (images, the references as the pipeline got them, the call's extra settings)."""
    from diffusers import DiffusionPipeline

    from mosaic_kit.pipelines import fit_on_white, load_reference_image
    from mosaic_kit.pipelines.tiny_flux2 import TINY_FLUX2_TEXT_OUT_LAYERS, tiny_flux2_pipeline

    if tiny:
        pipe = tiny_flux2_pipeline(seed=args.seed)
    else:
        pipe = DiffusionPipeline.from_pretrained(args.base, torch_dtype=DTYPES[args.dtype])
    pipe.to(args.device)
    if args.lora:
        lora = Path(args.lora)
        if lora.is_file():
            pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
        else:
            pipe.load_lora_weights(str(lora))
    elif not tiny:
        print("warning: no --lora given, the references go through the base weights only", file=sys.stderr)
    references = args.references or default_references(args.dreambench, 256)
    images = [fit_on_white(load_reference_image(ref, k), args.ref_size) for k, ref in enumerate(references)]
    extra = {"text_encoder_out_layers": TINY_FLUX2_TEXT_OUT_LAYERS, "max_sequence_length": 32} if tiny else {}
    out = pipe(image=images, prompt=args.prompt, height=args.height, width=args.width,
               num_inference_steps=args.steps, guidance_scale=4.0 if args.guidance is None else args.guidance,
               generator=torch.Generator(device="cpu").manual_seed(args.seed), **extra)
    return out.images, images, {"pipeline": type(pipe).__name__}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    tiny = args.base is None
    if args.family == "flux2":
        defaults = {"height": 32, "width": 32, "ref_size": 64, "steps": 4} if tiny else {
            "height": 1024, "width": 1024, "ref_size": 1024, "steps": 4}
    else:
        defaults = {"height": 32, "width": 32, "ref_size": 32, "steps": 4} if tiny else {
            "height": 512, "width": 512, "ref_size": 512, "steps": 28}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.family == "flux2":
        start = time.perf_counter()
        images, references, extra = run_flux2(args, tiny)
        return _write(args, images, references, time.perf_counter() - start, extra)
    if tiny:
        pipe = tiny_mosaic_pipeline(seed=args.seed)
    else:
        pipe = MosaicFluxPipeline.from_pretrained(args.base, torch_dtype=DTYPES[args.dtype])
    pipe.to(args.device)
    if args.lora:
        pipe.load_mosaic_weights(args.lora)
    elif not tiny:
        print("warning: no --lora given, the references go through the base weights only", file=sys.stderr)
    references = args.references or default_references(args.dreambench, 256)

    start = time.perf_counter()
    out = pipe(
        args.prompt,
        references,
        height=args.height,
        width=args.width,
        ref_size=args.ref_size,
        num_inference_steps=args.steps,
        guidance_scale=3.5 if args.guidance is None else args.guidance,
        generator=torch.Generator(device="cpu").manual_seed(args.seed),
        use_reference_cache=args.reference_cache,
        max_sequence_length=32 if tiny else 512,
    )
    return _write(args, out.images, out.references, time.perf_counter() - start, {})


def _write(args: argparse.Namespace, images: list, references: list, seconds: float, extra: dict) -> dict:
    """Saves the image and the contact sheet (references beside the result); prints the summary."""
    image_path = Path(args.output)
    sheet_path = image_path.with_name(f"{image_path.stem}-sheet.png")
    save_image_atomic(images[0], image_path)
    sheet = contact_sheet([SheetRow(args.prompt, references, images)], thumb_size=max(128, args.height // 2))
    save_image_atomic(sheet, sheet_path)
    summary = {"image": str(image_path), "sheet": str(sheet_path), "seconds": round(seconds, 3),
               "references": len(references), "family": args.family, "base": args.base or "tiny-random",
               "lora": args.lora, **extra}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
