"""Build reference → target correspondences for a data set, as the released data was built.

For every sample of a JSONL manifest (or of the released SemAlign-MS data, ``--released-root``),
each reference image is matched densely to the target
image with one or more feature extractors (cosine nearest neighbour of every target cell on a
grid). The matches are kept where the extractors agree and inside the subject masks, mapped to
token pairs on the model's token grids, and made disjoint across references (eq. 2).

Outputs in ``--output-dir``:

- ``<id>.pt``: the project's format (`mosaic_kit.correspondence.load_correspondences`);
- ``<id>.json``: the released dict format (per reference, ``{ref_token: tgt_token}``);
- ``drawings/<id>_ref<k>.png``: both images side by side with a line per pair, for the first
  ``--draw`` samples of the shard;
- ``summary-<shard>.json``: counts, failures (with sample ids and reasons) and settings.

The run is resumable (samples whose two files exist are skipped) and shardable
(``--shard i/n`` takes every n-th sample starting at i, so n shards cover each sample once).

Manifest: the JSONL format of `mosaic_kit.data.manifest`, one JSON object per line, paths
relative to the manifest's folder::

    {"id": "dog_0", "target": "images/dog_0.jpg", "references": ["images/dog_ref.jpg"],
     "target_mask": "masks/dog_0.png", "reference_masks": [null]}

``target_mask`` and ``reference_masks`` are optional (a mask is any image; non-zero is inside);
with per-reference ``target_masks`` instead of ``target_mask``, matching stays inside their union.
Other keys of the format (``caption``, ``correspondences``, ...) are read and ignored here.
Images and masks are resized to ``--target-size`` / ``--ref-size`` squares: crop non-square
photos first if their proportions matter.

Released layout (``--released-root DIR``): parquet shards of side-by-side target/reference
images with ``DIR/mask/<uid>.png`` target masks; each row is a sample with id ``uid`` (see
`mosaic_kit.data.released`).

Example::

    python recipes/build_correspondences.py --manifest data/manifest.jsonl --output-dir runs/corr \\
        --extractor sift --extractor sift:patch_size=48 --filter mutual --shard 0/4
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from mosaic_kit.correspondence import (
    DISJOINT_POLICIES,
    MATCH_FILTERS,
    TokenGrid,
    correspondences_from_features,
    draw_matches,
    save_correspondences,
    save_released_dicts,
    subsample,
)
from mosaic_kit.data import count_released_rows, decode_released_row, iter_released_rows, open_image, to_rgb
from mosaic_kit.data import read_manifest as read_manifest_entries
from mosaic_kit.features import build_extractor, parse_extractor_spec
from mosaic_kit.utils import pil_to_tensor, save_image_atomic, tensor_to_pil, write_text_atomic
from mosaic_kit.utils.cli import (
    RecipeArgumentParser,
    add_output_dir,
    add_progress,
    add_shard,
    add_threads,
    usage_errors,
)

log = logging.getLogger("build_correspondences")
_RESERVED = {"settings", "drawings"}  # names the recipe writes itself (and ids starting "summary-")


def _extractor_arg(text: str) -> tuple[str, dict]:
    try:
        return parse_extractor_spec(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def read_manifest(path: Path) -> list[dict]:
    """The manifest's samples (read and validated by `mosaic_kit.data.read_manifest`) as the dicts
    this recipe uses; raises ValueError naming the line of a bad one, including ids the recipe
    writes itself (``settings``, ``drawings``, ``summary-*``)."""
    samples = []
    for entry in read_manifest_entries(path):
        if entry.id in _RESERVED or entry.id.startswith("summary-"):
            raise ValueError(
                f"{path}:{entry.line}: `id` must be none of the names this recipe writes "
                f"({sorted(_RESERVED)}, 'summary-*'), but got {entry.id!r}"
            )
        if entry.target_mask is not None or all(m is None for m in entry.target_masks):
            target_mask = entry.target_mask
        else:  # per-reference target masks only: match inside their union
            target_mask = [m for m in entry.target_masks if m is not None]
        samples.append({
            "id": entry.id,
            "target": entry.target,
            "references": list(entry.references),
            "target_mask": target_mask,
            "reference_masks": list(entry.reference_masks),
        })
    return samples


def load_image(source: Path | Image.Image, size: int) -> torch.Tensor:
    """``(3, size, size)`` float image in [0, 1] from a path or a PIL image (16-bit, palette, CMYK and
    alpha images converted by `mosaic_kit.data.to_rgb`; too large or unreadable: ValueError)."""
    image = to_rgb(source) if isinstance(source, Image.Image) else to_rgb(open_image(source), str(source))
    return pil_to_tensor(image.resize((size, size), Image.BICUBIC))


def load_mask(path: Path | list[Path] | None, size: int) -> torch.Tensor | None:
    """``(1, size, size)`` bool mask (non-zero inside; the union of a list of masks), or None."""
    if path is None:
        return None
    if isinstance(path, list):
        return torch.stack([load_mask(p, size) for p in path]).any(0)
    image = open_image(path).convert("L").resize((size, size), Image.NEAREST)  # refuses bombs by name
    mask = pil_to_tensor(image)[None] > 0
    if not bool(mask.any()):
        raise ValueError(f"empty mask {path}")
    return mask


def manifest_samples(path: Path, shard: int, shards: int) -> tuple[int, Iterator[dict]]:
    """This shard's samples of a manifest (every ``shards``-th from ``shard``), and their count."""
    samples = read_manifest(path)[shard::shards]
    return len(samples), iter(samples)


def released_samples(root: Path, shard: int, shards: int) -> tuple[int, Iterator[dict | Exception]]:
    """This shard's rows of the released layout (decoded lazily; a row that cannot be decoded, or
    whose target mask is missing, comes as a ValueError), and their count."""
    total = count_released_rows(root)

    def generate() -> Iterator[dict | Exception]:
        for index, row in enumerate(iter_released_rows(root)):
            if index % shards != shard:
                continue  # other shards' rows are never decoded
            try:
                sample = decode_released_row(row, root)
            except ValueError as error:
                error.sample_id = f"{row.shard.name}:{row.row}"  # type: ignore[attr-defined]
                yield error
                continue
            if not sample.mask_path.exists():
                # The released correspondences live inside the target's mask: never build them without it.
                missing = ValueError(f"missing mask {sample.mask_path}")
                missing.sample_id = sample.uid  # type: ignore[attr-defined]
                yield missing
                continue
            yield {
                "id": sample.uid,
                "target": sample.target,
                "references": [sample.reference],
                "target_mask": sample.mask_path,
                "reference_masks": [None],
            }

    return len(range(shard, total, shards)), generate()


_MATCHING_SETTINGS = (
    "extractor", "grid", "target_size", "ref_size", "filter", "cycle_radius", "consensus_radius", "disjoint", "max_points",
)


def check_settings(args: argparse.Namespace) -> None:
    """Records the settings that shape the outputs in ``<out>/settings.json``; on a resume, refuses
    different ones (unless ``--overwrite``) so that one folder never mixes two kinds of output."""
    wanted = {name: getattr(args, name) for name in _MATCHING_SETTINGS}
    wanted = json.loads(json.dumps(wanted))  # tuples → lists, as stored
    path = args.output_dir / "settings.json"
    if path.exists() and not args.overwrite:
        stored = json.loads(path.read_text())
        changed = sorted(k for k in wanted if stored.get(k) != wanted[k])
        if changed:
            raise ValueError(
                f"{path} was written with other settings ({', '.join(f'{k}: {stored.get(k)!r}' for k in changed)}); "
                "use another --output-dir, the same settings, or --overwrite"
            )
        return
    write_text_atomic(path, json.dumps(wanted, indent=2))


def save_png(image: torch.Tensor, path: Path) -> None:
    """Writes a ``(3, H, W)`` uint8 tensor as PNG (atomically)."""
    save_image_atomic(tensor_to_pil(image), path)


def process(sample: dict, extractors: list, args: argparse.Namespace, ref_grid: TokenGrid, tgt_grid: TokenGrid):
    """Correspondences of one sample, and its images for drawing."""
    target = load_image(sample["target"], args.target_size)
    references = [load_image(p, args.ref_size) for p in sample["references"]]
    target_mask = load_mask(sample["target_mask"], args.target_size)
    reference_masks = [load_mask(p, args.ref_size) for p in sample["reference_masks"]]
    device = torch.device(args.device)
    with torch.no_grad():
        target_features = [extractor(target[None].to(device)) for extractor in extractors]
        reference_features = [[extractor(r[None].to(device)) for r in references] for extractor in extractors]
    corr, _ = correspondences_from_features(
        target_features,
        reference_features,
        [ref_grid] * len(references),
        tgt_grid,
        target_mask=target_mask,
        reference_masks=reference_masks,
        match_filter=args.filter,
        cycle_radius=args.cycle_radius,
        consensus_radius=args.consensus_radius,
        disjoint=args.disjoint,
    )
    if args.max_points:
        corr = subsample(corr, args.max_points, "farthest", target_grid=tgt_grid).compact()
    return corr.to("cpu"), target, references


def draw(sample_id: str, corr, target, references, ref_grid: TokenGrid, tgt_grid: TokenGrid, out: Path) -> None:
    """One PNG per reference: the reference (left) and the target (right), a line per pair."""
    for k, reference in enumerate(references):
        keep = corr.point_mask[0, k]
        ref_xy = ref_grid.token_to_pixel(corr.ref_index[0, k][keep])
        tgt_xy = tgt_grid.token_to_pixel(corr.tgt_index[0, k][keep])
        save_png(draw_matches(reference, target, ref_xy, tgt_xy), out / "drawings" / f"{sample_id}_ref{k}.png")


def main(argv: list[str] | None = None) -> dict:
    parser = RecipeArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--manifest", type=Path, help="JSONL manifest (see the module docstring)")
    source.add_argument("--released-root", type=Path, help="folder of the released SemAlign-MS layout")
    add_output_dir(parser, "output folder (required)", type=Path, deprecated=("--out",))
    parser.add_argument("--extractor", action="append", type=_extractor_arg, default=None,
                        help="name[:key=value,...]; repeat for consensus (default: sift)")
    parser.add_argument("--grid", type=int, default=64, help="feature grid size (default 64, as released)")
    parser.add_argument("--target-size", type=int, default=512, help="target side in pixels, a multiple of 16")
    parser.add_argument("--ref-size", type=int, default=512, help="reference side in pixels, a multiple of 16")
    parser.add_argument("--filter", choices=MATCH_FILTERS, default="none", help="per-extractor filter")
    parser.add_argument("--cycle-radius", type=float, default=1.0, help="radius of --filter cycle, in cells")
    parser.add_argument("--consensus-radius", type=float, default=0.0, help="agreement radius between extractors")
    parser.add_argument("--disjoint", choices=DISJOINT_POLICIES, default="confidence", help="eq. 2 policy")
    parser.add_argument("--max-points", type=int, default=0, help="farthest-point subsample per reference (0: all)")
    add_shard(parser, help="i/n: every n-th sample from the i-th (0 <= i < n)")
    parser.add_argument("--draw", type=int, default=4, help="draw the first N samples of the shard")
    parser.add_argument("--overwrite", action="store_true", help="recompute finished samples")
    parser.add_argument("--device", default="cpu")
    add_threads(parser)
    add_progress(parser)
    args = parser.parse_args(argv)
    if args.output_dir is None:
        parser.error("the following arguments are required: --output-dir")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    with usage_errors(parser):  # a bad option, manifest or settings file: one line, exit code 2
        ref_grid, tgt_grid = TokenGrid(args.ref_size, args.ref_size), TokenGrid(args.target_size, args.target_size)
        extractors = [
            build_extractor(name, **{"grid_size": args.grid, **kwargs}).to(args.device).eval()
            for name, kwargs in (args.extractor or [("sift", {})])
        ]
        shard, shards = args.shard
        if args.manifest is not None:
            total, samples = manifest_samples(args.manifest, shard, shards)
        else:
            total, samples = released_samples(args.released_root, shard, shards)
        args.output_dir.mkdir(parents=True, exist_ok=True)
        check_settings(args)
    counts = {"done": 0, "skipped": 0, "failed": 0, "points": 0}
    failures = []
    seen: set[str] = set()
    progress = tqdm(samples, total=total, desc=f"correspondences {shard}/{shards}", unit="sample", file=sys.stderr,
                    disable=args.no_progress)
    for position, sample in enumerate(progress):
        if isinstance(sample, Exception):  # a released row that could not be decoded, or has no mask
            counts["failed"] += 1
            failures.append({"id": sample.sample_id, "reason": str(sample)})
            log.warning("sample %s skipped: %s", sample.sample_id, sample)
            continue
        if sample["id"] in seen:
            counts["failed"] += 1
            failures.append({"id": sample["id"], "reason": "duplicate id (an earlier sample has the same id)"})
            log.warning("sample %s skipped: duplicate id", sample["id"])
            continue
        seen.add(sample["id"])
        project, released = args.output_dir / f"{sample['id']}.pt", args.output_dir / f"{sample['id']}.json"
        if project.exists() and released.exists() and not args.overwrite:
            counts["skipped"] += 1
            continue
        try:
            corr, target, references = process(sample, extractors, args, ref_grid, tgt_grid)
        except (OSError, UnidentifiedImageError, ValueError) as error:
            counts["failed"] += 1
            failures.append({"id": sample["id"], "reason": str(error)})
            log.warning("sample %s skipped: %s", sample["id"], error)
            continue
        save_correspondences(corr, project)
        save_released_dicts(corr, released)
        counts["done"] += 1
        counts["points"] += int(corr.num_points.sum())
        if position < args.draw:  # the first --draw samples of the shard, also across resumes
            draw(sample["id"], corr, target, references, ref_grid, tgt_grid, args.output_dir)
    summary = {
        "shard": f"{shard}/{shards}",
        "samples": total,
        **counts,
        "failures": failures,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    write_text_atomic(args.output_dir / f"summary-{shard}of{shards}.json", json.dumps(summary, indent=2))
    log.info("shard %d/%d: %d done, %d skipped, %d failed, %d pairs", shard, shards,
             counts["done"], counts["skipped"], counts["failed"], counts["points"])
    return summary


if __name__ == "__main__":
    main()
