"""Generate one image from a prompt and K reference images with MOSAIC on any registered model family.

Writes the image and a contact sheet (references beside the result).

Real weights (a local folder or a hub id of a FLUX.1 base, plus a MOSAIC LoRA file)::

    python recipes/flux_mosaic_infer.py --base black-forest-labs/FLUX.1-dev \\
        --lora mosaic_512.safetensors --references dog.jpg cat.jpg \\
        --prompt "a dog and a cat on a sofa" --output outputs/dog_cat.png --dtype bf16

Any family of the registry (``--family NAME``, `mosaic_kit.pipelines.registry`) runs through the
model boundary: ``family.load_lora`` then ``family.sample``, the family's own pipeline. FLUX.2
(``--family flux2``) runs the stock diffusers pipeline (`Flux2KleinPipeline` or `Flux2Pipeline`, as
the base's ``model_index.json`` says) with the trained LoRA loaded by its own ``load_lora_weights``;
no mosaic_kit code is in the sampling path::

    python recipes/flux_mosaic_infer.py --family flux2 --base black-forest-labs/FLUX.2-klein-4B \
        --lora outputs/train/flux2_klein/lora --references dog.jpg cat.jpg \
        --prompt "a dog and a cat on a sofa" --output outputs/dog_cat.png --dtype bf16

A family's declared options (``ModelFamily.family_options``) are set with ``--family-option
KEY=VALUE`` (repeatable; the value is read as YAML); a LoRA file that records the options it was
trained with (``model.family_options`` of a training run) runs with them unless told otherwise, and
a conflicting ``--family-option`` is refused. ``--reference-method M`` is short for ``--family-option
reference_method=M``, for the families that declare that option (FLUX.1-Kontext: offset, index or
uxo, as ComfyUI's ``FluxKontextMultiReferenceLatentMethod`` node)::

    python recipes/flux_mosaic_infer.py --family kontext --lora outputs/train/tiny_kontext/lora \
        --reference-method index --output outputs/kontext_index.png

With no ``--base`` it builds a tiny random pipeline of the family in code (nothing is downloaded)
and runs the whole path on the CPU in seconds; its image is noise, but every step is the real
one. Without ``--references`` it then uses two DreamBench photos (``--dreambench``, by default
``$MOSAIC_DREAMBENCH`` or the folder ``python recipes/fetch_dreambench.py`` fills) or, when there
are none, two drawn shapes. Every reference is fitted on white into a ``--ref-size`` square first
(the released preprocessing).
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
from mosaic_kit.models.options import parse_family_options, resolve_family_options
from mosaic_kit.eval.sheets import SheetRow, contact_sheet
from mosaic_kit.pipelines import build_family, family_names, fit_on_white, get_family, load_reference_image
from mosaic_kit.utils import save_image_atomic
from mosaic_kit.utils.cli import DeprecatedAlias, RecipeArgumentParser, add_threads, usage_errors

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_parser() -> RecipeArgumentParser:
    parser = RecipeArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=family_names(), default=family_names()[0],
                        help="model family of the registry: " + "; ".join(
                            f"{name}: {get_family(name).description}" for name in family_names()))
    parser.add_argument("--base", help="base pipeline: a local folder or a hub id (default: a tiny random pipeline)")
    parser.add_argument("--lora", help="MOSAIC LoRA .safetensors file (or a folder holding one)")
    parser.add_argument("--family-option", action="append", default=[], metavar="KEY=VALUE",
                        help="an option the family declares (repeatable), e.g. reference_method=index for kontext; "
                             "default: what the LoRA file records, else the family's")
    parser.add_argument("--reference-method", help="short for --family-option reference_method=METHOD (families with "
                                                   "that option: kontext, offset | index | uxo)")
    parser.add_argument("--references", nargs="+", help="reference image files, one per subject")
    parser.add_argument("--prompt", default="two subjects side by side on a table")
    parser.add_argument("--height", type=int, help="output height (default: the family's, e.g. 512 for flux1; 32 tiny)")
    parser.add_argument("--width", type=int, help="output width (default: the family's; 32 tiny)")
    parser.add_argument("--ref-size", type=int, help="reference square side (default: the family's; e.g. 32 tiny)")
    parser.add_argument("--steps", type=int, help="denoising steps (default: the family's, e.g. 28 flux1, 4 flux2)")
    parser.add_argument("--guidance", type=float, default=None,
                        help="guidance scale (default: the family's, e.g. 3.5 flux1, 4.0 flux2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reference-cache", action="store_true",
                        help="compute reference keys/values once (faster, references see only themselves; "
                             "families whose sampling has the option)")
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
    args.family_options = family_options_from_args(args, parser)
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def family_options_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict:
    """``--family-option KEY=VALUE`` and ``--reference-method``, checked by the family, plus what
    the LoRA file records (`resolve_family_options`); a bad one: one line, exit 2."""
    with usage_errors(parser):
        given = parse_family_options(args.family_option)
        if args.reference_method is not None:
            if given.get("reference_method", args.reference_method) != args.reference_method:
                raise ValueError(f"--reference-method {args.reference_method!r} differs from --family-option "
                                 f"reference_method={given['reference_method']!r}.")
            given["reference_method"] = args.reference_method
        return resolve_family_options(get_family(args.family).family_class, given, args.lora)


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


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    tiny = args.base is None
    spec = get_family(args.family)
    defaults = spec.tiny_inference_defaults if tiny else spec.inference_defaults
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    references = args.references or default_references(args.dreambench, 256)
    references = [fit_on_white(load_reference_image(ref, k), args.ref_size) for k, ref in enumerate(references)]
    family = build_family(args.family, args.base, torch_dtype=DTYPES[args.dtype], seed=args.seed,
                          family_options=args.family_options).to(args.device)
    if args.lora:
        family.load_lora(args.lora)
    elif not tiny:
        print("warning: no --lora given, the references go through the base weights only", file=sys.stderr)
    options = {"use_reference_cache": True} if args.reference_cache else {}
    start = time.perf_counter()
    image = family.sample(args.prompt, references, args.height, args.width, args.steps,
                          generator=torch.Generator(device="cpu").manual_seed(args.seed), guidance_scale=args.guidance,
                          **options)
    return _write(args, [image], references, time.perf_counter() - start,
                  {"pipeline": type(family.pipe).__name__, "family_options": family.family_option_values()})


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
