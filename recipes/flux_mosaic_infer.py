"""Generate one image from a prompt and K reference images with MOSAIC on FLUX.1.

Writes the image and a contact sheet (references beside the result).

Real weights (a local folder or a hub id of a FLUX.1 base, plus a MOSAIC LoRA file)::

    python recipes/flux_mosaic_infer.py --base black-forest-labs/FLUX.1-dev \\
        --lora mosaic_512.safetensors --references dog.jpg cat.jpg \\
        --prompt "a dog and a cat on a sofa" --out outputs/dog_cat.png --dtype bf16

With no ``--base`` it builds a tiny random pipeline in code (nothing is downloaded) and runs the
whole path on the CPU in seconds; its image is noise, but every step is the real one. Without
``--references`` it then uses two DreamBench photos (``--dreambench``) or, when that folder is
missing, two drawn shapes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from mosaic_kit.eval.sheets import SheetRow, contact_sheet
from mosaic_kit.pipelines import MosaicFluxPipeline, tiny_mosaic_pipeline

REPO = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", help="FLUX.1 base: a local folder or a hub id (default: a tiny random pipeline)")
    parser.add_argument("--lora", help="MOSAIC LoRA .safetensors file (or a folder holding one)")
    parser.add_argument("--references", nargs="+", help="reference image files, one per subject")
    parser.add_argument("--prompt", default="two subjects side by side on a table")
    parser.add_argument("--height", type=int, help="output height (default 512; 32 with the tiny pipeline)")
    parser.add_argument("--width", type=int, help="output width (default 512; 32 with the tiny pipeline)")
    parser.add_argument("--ref-size", type=int, help="reference square side (default 512; 32 tiny)")
    parser.add_argument("--steps", type=int, help="denoising steps (default 28; 4 tiny)")
    parser.add_argument("--guidance", type=float, default=3.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reference-cache", action="store_true",
                        help="compute reference keys/values once (faster, references see only themselves)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="outputs/infer/result.png", help="output image path")
    parser.add_argument("--dreambench", default=os.environ.get("MOSAIC_DREAMBENCH", str(REPO.parent / "shared/data/dreambench")))
    return parser.parse_args(argv)


def default_references(dreambench: Path, size: int) -> list[Image.Image | Path]:
    """Two DreamBench photos when the folder exists, else two drawn shapes."""
    picks = [dreambench / "dog", dreambench / "cat"]
    if all(p.is_dir() for p in picks):
        return [sorted(p.glob("*.jp*g"))[0] for p in picks]
    shapes = []
    for colour, draw in (("red", "ellipse"), ("blue", "rectangle")):
        image = Image.new("RGB", (size, size), "white")
        getattr(ImageDraw.Draw(image), draw)([size // 5, size // 5, 4 * size // 5, 4 * size // 5], fill=colour)
        shapes.append(image)
    return shapes


def save_atomic(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    try:
        image.save(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    tiny = args.base is None
    defaults = {"height": 32, "width": 32, "ref_size": 32, "steps": 4} if tiny else {
        "height": 512, "width": 512, "ref_size": 512, "steps": 28}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if tiny:
        pipe = tiny_mosaic_pipeline(seed=args.seed)
    else:
        pipe = MosaicFluxPipeline.from_pretrained(args.base, torch_dtype=DTYPES[args.dtype])
    pipe.to(args.device)
    if args.lora:
        pipe.load_mosaic_weights(args.lora)
    elif not tiny:
        print("warning: no --lora given, the references go through the base weights only", file=sys.stderr)
    references = args.references or default_references(Path(args.dreambench), 256)

    start = time.perf_counter()
    out = pipe(
        args.prompt,
        references,
        height=args.height,
        width=args.width,
        ref_size=args.ref_size,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        generator=torch.Generator(device="cpu").manual_seed(args.seed),
        use_reference_cache=args.reference_cache,
        max_sequence_length=32 if tiny else 512,
    )
    seconds = time.perf_counter() - start
    image_path = Path(args.out)
    sheet_path = image_path.with_name(f"{image_path.stem}-sheet.png")
    save_atomic(out.images[0], image_path)
    sheet = contact_sheet([SheetRow(args.prompt, out.references, out.images)], thumb_size=max(128, args.height // 2))
    save_atomic(sheet, sheet_path)
    summary = {"image": str(image_path), "sheet": str(sheet_path), "seconds": round(seconds, 3),
               "references": len(references), "base": args.base or "tiny-random", "lora": args.lora}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
