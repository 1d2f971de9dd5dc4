"""Benchmark: dense matching quality (PCK) on real photos warped with known homographies.

For each selected DreamBench photo: centre-crop to a square and resize to ``size × size``; make
a warped copy with a random homography (corners moved by up to ``--strength`` of the size) and
photometric changes (`mosaic_kit.correspondence.synthetic`, seeded per photo); extract dense
features of both with each extractor; match every source cell to its cosine nearest neighbour
on the target grid (`match_features`) and filter:

- ``none``: every match;
- ``mutual``: mutual nearest neighbours (`mutual_nearest`);
- ``cycle1``: the round trip source → target → source lands within 1 cell (`cycle_consistent`);
- ``consensus``: all extractors agree on the same target cell (`consensus`, radius 0), only when
  two or more extractors are given.

Scoring: for each source cell kept by the filter, the predicted location is the centre of its
matched target cell and the truth is the source cell's centre mapped through the homography,
both in pixels (pixel ``(col, row)`` covers ``[col, col + 1) × [row, row + 1)``). Only cells
whose truth lands inside the target image count. Per photo: PCK@α = share of counted kept
cells within ``α · size`` pixels of the truth (α = 0.05 and 0.10), and coverage = kept cells /
cells whose truth lands inside. Reported over photos: mean, standard deviation, median and
quartiles, plus PCK pooled over all counted cells. A baseline row ``identity`` predicts that
nothing moved (each cell stays where it is), to show what matching adds.

Usage::

    python benchmarks/bench_matching_pck.py                                   # the documented default
    python benchmarks/bench_matching_pck.py --subjects dog,cat --images-per-subject 3
    python benchmarks/bench_matching_pck.py --extractor sift:patch_size=32
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import zlib
from pathlib import Path

import torch

from mosaic_kit.data import dreambench_root
from mosaic_kit.features import parse_extractor_spec
from mosaic_kit.reporting import format_table, hardware_info
from mosaic_kit.utils import pil_to_tensor

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "matching-pck.json"
DEFAULT_EXTRACTORS = ("sift:patch_size=16", "sift:patch_size=32")
ALPHAS = (0.05, 0.10)
FILTERS = ("none", "mutual", "cycle1", "consensus")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


# ------------------------------------------------------------------------------------ inputs
def select_photos(data: Path, subjects: list[str] | None, per_subject: int) -> list[tuple[str, Path]]:
    """``(subject, path)`` of the first ``per_subject`` photos (sorted by name) of each subject."""
    if not data.is_dir():
        raise FileNotFoundError(f"Expected `--data` to be the DreamBench folder, but {data} is not a folder.")
    available = sorted(p.name for p in data.iterdir() if p.is_dir() and _images_in(p))
    chosen = available if subjects is None else subjects
    missing = [s for s in chosen if s not in available]
    if missing:
        raise ValueError(f"Unknown subjects {missing}; available under {data}: {available}.")
    return [(subject, path) for subject in chosen for path in _images_in(data / subject)[:per_subject]]


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def load_photo(path: Path, size: int) -> torch.Tensor:
    """``(3, size, size)`` float in [0, 1]: the centred square crop of the photo, resized (bicubic, antialiased)."""
    try:
        from PIL import Image
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("bench_matching_pck reads photos with Pillow: pip install pillow") from error
    with Image.open(path) as image:
        image = image.convert("RGB")
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)
        return pil_to_tensor(image)


def photo_seed(seed: int, subject: str, name: str) -> int:
    """A seed per photo that depends only on ``seed`` and the photo (not on the selection)."""
    return (seed * 1_000_003 + zlib.crc32(f"{subject}/{name}".encode())) % 2**63


# ------------------------------------------------------------------------------------ scoring
def score_matches(matches, homographies: torch.Tensor, size: int) -> list[dict]:
    """Per image of the batch: PCK at `ALPHAS`, coverage and counts of one `DenseMatches`.

    Args:
        matches: a `DenseMatches` from the source (original) grid to the target (warped) grid.
        homographies: ``(B, 3, 3)`` source → target pixel homographies.
        size: image side in pixels.
    """
    from mosaic_kit.correspondence.synthetic import inside, pck, transform_points

    hs, ws = matches.source_shape
    ht, wt = matches.target_shape
    source_px = matches.source_points().cpu().double() * torch.tensor([size / ws, size / hs], dtype=torch.float64)
    predicted = matches.target_points().cpu().double() * torch.tensor([size / wt, size / ht], dtype=torch.float64)
    return _score(predicted, source_px, matches.valid.cpu(), homographies, size, pck, inside, transform_points)


def score_identity(source_shape: tuple[int, int], homographies: torch.Tensor, size: int) -> list[dict]:
    """The no-motion baseline: every source cell predicted to stay where it is."""
    from mosaic_kit.correspondence.synthetic import inside, pck, transform_points

    hs, ws = source_shape
    rows, cols = torch.meshgrid(torch.arange(hs), torch.arange(ws), indexing="ij")
    cells = torch.stack(((cols.flatten() + 0.5) * size / ws, (rows.flatten() + 0.5) * size / hs), -1).double()
    batch = homographies.shape[0]
    source_px = cells.expand(batch, -1, -1)
    valid = torch.ones(batch, hs * ws, dtype=torch.bool)
    return _score(source_px, source_px, valid, homographies, size, pck, inside, transform_points)


def _score(predicted, source_px, kept, homographies, size, pck, inside, transform_points) -> list[dict]:
    predicted, source_px = predicted.cpu(), source_px.cpu()
    truth = transform_points(source_px, homographies.cpu().double())
    in_view = inside(truth, size, size)
    counted = kept & in_view
    results = []
    for b in range(predicted.shape[0]):
        n_counted, n_in_view = int(counted[b].sum()), int(in_view[b].sum())
        row = {"kept": n_counted, "in_view": n_in_view, "coverage": n_counted / n_in_view if n_in_view else None}
        for alpha in ALPHAS:
            row[f"pck@{alpha:.2f}"] = (
                float(pck(predicted[b : b + 1], truth[b : b + 1], counted[b : b + 1], alpha, (size, size)))
                if n_counted
                else None
            )
            hits = (predicted[b] - truth[b]).norm(dim=-1) <= alpha * size
            row[f"hits@{alpha:.2f}"] = int((hits & counted[b]).sum())
        results.append(row)
    return results


def summarise(rows: list[dict]) -> dict:
    """Statistics over photos of per-photo PCK and coverage, and PCK pooled over all counted cells."""

    def stats(values: list[float]) -> dict:
        values = [v for v in values if v is not None]
        if not values:
            return {"n": 0, "mean": None, "std": None, "median": None, "q25": None, "q75": None, "min": None, "max": None}
        q25, _, q75 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else (values[0],) * 3
        return {
            "n": len(values),
            "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "median": statistics.median(values),
            "q25": q25,
            "q75": q75,
            "min": min(values),
            "max": max(values),
        }

    kept = sum(r["kept"] for r in rows)
    summary = {f"pck@{alpha:.2f}": stats([r[f"pck@{alpha:.2f}"] for r in rows]) for alpha in ALPHAS}
    summary["coverage"] = stats([r["coverage"] for r in rows])
    summary["pooled"] = {
        **{f"pck@{alpha:.2f}": (sum(r[f"hits@{alpha:.2f}"] for r in rows) / kept if kept else None) for alpha in ALPHAS},
        "coverage": kept / max(1, sum(r["in_view"] for r in rows)),
        "kept": kept,
        "in_view": sum(r["in_view"] for r in rows),
    }
    summary["images"] = len(rows)
    summary["images_without_kept_cells"] = sum(1 for r in rows if r["kept"] == 0)
    return summary


# ------------------------------------------------------------------------------------ report
def _fmt(stat: dict, percent: bool = True) -> tuple[str, str]:
    if not stat["n"]:
        return "-", "-"
    k = 100 if percent else 1
    return (
        f"{k * stat['mean']:.1f} ± {k * stat['std']:.1f}",
        f"{k * stat['median']:.1f} [{k * stat['q25']:.1f}, {k * stat['q75']:.1f}]",
    )


def draw_example(path: Path, image: torch.Tensor, warped: torch.Tensor, matches, homographies, size: int) -> None:
    """Draws the first photo's kept matches whose truth is in view: green within 0.05 · size of
    the truth, red beyond (at most 150 lines)."""
    from PIL import Image

    from mosaic_kit.correspondence import draw_matches
    from mosaic_kit.correspondence.synthetic import inside, transform_points

    keep = matches.valid[0]
    gh, gw = matches.source_shape
    scale = torch.tensor([size / gw, size / gh])
    source_px = matches.source_points()[0][keep].cpu() * scale
    target_px = matches.target_points()[0][keep].cpu() * torch.tensor([size / matches.target_shape[1], size / matches.target_shape[0]])
    truth = transform_points(source_px[None], homographies[:1].to(source_px.dtype))[0]
    in_view = inside(truth, size, size)
    source_px, target_px, truth = source_px[in_view], target_px[in_view], truth[in_view]
    correct = (target_px - truth).norm(dim=-1) <= 0.05 * size
    colours = torch.where(correct[:, None], torch.tensor([0.1, 0.9, 0.2]), torch.tensor([0.95, 0.1, 0.1]))
    canvas = draw_matches(image, warped, source_px, target_px, max_lines=150, colours=colours)
    path.parent.mkdir(parents=True, exist_ok=True)
    array = canvas.permute(1, 2, 0).contiguous()
    Image.frombytes("RGB", (array.shape[1], array.shape[0]), bytes(array.flatten().tolist())).save(path)
    print(f"wrote {path} ({int(correct.sum())}/{len(correct)} kept matches within PCK@0.05)", flush=True)


def print_table(results: list[dict]) -> None:
    header = ["extractor", "filter", "images"]
    for alpha in ALPHAS:
        header += [f"PCK@{alpha:.2f} mean ± sd", "median [q25, q75]"]
    header += ["coverage mean ± sd", "median [q25, q75]", f"pooled PCK@{ALPHAS[0]:.2f}"]
    rows = [header]
    for r in results:
        row = [r["extractor"], r["filter"], f"{r['images'] - r['images_without_kept_cells']}/{r['images']}"]
        for alpha in ALPHAS:
            row += list(_fmt(r[f"pck@{alpha:.2f}"]))
        row += list(_fmt(r["coverage"]))
        pooled = r["pooled"][f"pck@{ALPHAS[0]:.2f}"]
        row.append("-" if pooled is None else f"{100 * pooled:.1f}")
        rows.append(row)
    print(format_table(rows))
    print("(percent; mean ± sd and median [quartiles] over photos; coverage = kept cells / cells whose truth is in view)")


# ------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None,
                        help="DreamBench folder (default: $MOSAIC_DREAMBENCH, else the folder recipes/fetch_dreambench.py fills)")
    parser.add_argument("--subjects", default=None, help="comma-separated subjects (default: all)")
    parser.add_argument("--images-per-subject", type=int, default=1, help="photos per subject, first by name (default: 1)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default: 256)")
    parser.add_argument("--grid", type=int, default=32, help="feature grid cells per side, unless a spec sets grid_size (default: 32)")
    parser.add_argument("--extractor", action="append", dest="extractors", metavar="NAME[:key=value,...]",
                        help=f"a `build_extractor` spec, repeatable (default: {' and '.join(DEFAULT_EXTRACTORS)})")
    parser.add_argument("--strength", type=float, default=0.15, help="corner offsets as a fraction of the size (default: 0.15)")
    parser.add_argument("--no-photometric", action="store_true", help="warp only, no photometric changes")
    parser.add_argument("--seed", type=int, default=0, help="seed of the warps (default: 0)")
    parser.add_argument("--batch-size", type=int, default=8, help="photos per extractor call (default: 8)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (default: cpu)")
    parser.add_argument("--example", type=Path, default=None,
                        help="also draw the first photo's matches (last extractor, mutual filter) to this PNG: "
                             "green within PCK@0.05, red beyond")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default: {DEFAULT_OUT.relative_to(ROOT)})")
    args = parser.parse_args(argv)
    for name in ("images_per_subject", "size", "grid", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: expected >= 1, got {getattr(args, name)}")

    from mosaic_kit.correspondence import (
        consensus,
        cycle_consistent,
        match_features,
        mutual_nearest,
    )
    from mosaic_kit.correspondence.synthetic import random_homographies, warp_images
    from mosaic_kit.features import build_extractor

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    specs = args.extractors or list(DEFAULT_EXTRACTORS)
    extractors = {}
    for spec in specs:
        try:
            name, kwargs = parse_extractor_spec(spec)
        except ValueError as error:
            parser.error(f"--extractor: {error}")
        kwargs.setdefault("grid_size", args.grid)
        extractors[spec] = build_extractor(name, **kwargs).to(device).eval()
    grids = {tuple(getattr(extractor, "grid_size", ())) for extractor in extractors.values()}
    use_consensus = len(specs) > 1 and len(grids) == 1
    if len(specs) > 1 and not use_consensus:
        print(f"note: no consensus row, the extractors use different grids {sorted(grids)}", flush=True)
    subjects = None if args.subjects is None else [s for s in args.subjects.split(",") if s]
    try:
        args.data = args.data or dreambench_root()
        photos = select_photos(args.data, subjects, args.images_per_subject)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))

    settings = {
        "data": str(args.data), "photos": len(photos), "subjects": sorted({s for s, _ in photos}),
        "images_per_subject": args.images_per_subject, "size": args.size, "grid": args.grid,
        "extractors": specs, "strength": args.strength, "photometric": not args.no_photometric,
        "seed": args.seed, "alphas": list(ALPHAS), "filters": [f for f in FILTERS if f != "consensus" or use_consensus],
        "cycle_radius": 1.0, "consensus_radius": 0.0,
    }
    hardware = hardware_info(device)
    print(f"bench_matching_pck: {len(photos)} photos from {args.data}, {args.size}², extractors {specs}, "
          f"strength {args.strength}, photometric {not args.no_photometric}, seed {args.seed}", flush=True)
    print(f"hardware: {hardware['cpu']} ({hardware['cores']} cores, {hardware['threads']} threads), "
          f"torch {hardware['torch']}, device {device}", flush=True)

    # One untimed call per extractor first: the first call pays one-off set-up costs.
    warm_up = load_photo(photos[0][1], args.size)[None].to(device)
    with torch.inference_mode():
        for extractor in extractors.values():
            extractor(warm_up)

    per_photo: list[dict] = []
    per_setting: dict[tuple[str, str], list[dict]] = {}
    timing = {"load_warp_s": 0.0, "extract_s": {spec: 0.0 for spec in specs}, "match_s": 0.0}
    start_all = time.perf_counter()
    for start in range(0, len(photos), args.batch_size):
        chunk = photos[start : start + args.batch_size]
        tick = time.perf_counter()
        images, warped, homographies = [], [], []
        for subject, path in chunk:
            generator = torch.Generator().manual_seed(photo_seed(args.seed, subject, path.name))
            image = load_photo(path, args.size)[None]
            homography = random_homographies(1, args.size, args.size, args.strength, generator=generator)
            images.append(image)
            warped.append(warp_images(image, homography, photometric=not args.no_photometric, generator=generator))
            homographies.append(homography)
        images, warped = torch.cat(images).to(device), torch.cat(warped).to(device)
        homographies = torch.cat(homographies)
        timing["load_warp_s"] += time.perf_counter() - tick

        forwards = {}
        batch_scores: dict[tuple[str, str], list[dict]] = {}
        for spec, extractor in extractors.items():
            tick = time.perf_counter()
            with torch.inference_mode():
                source_feats, target_feats = extractor(images), extractor(warped)
            timing["extract_s"][spec] += time.perf_counter() - tick
            tick = time.perf_counter()
            forward = match_features(source_feats, target_feats)
            backward = match_features(target_feats, source_feats)
            filtered = {
                "none": forward,
                "mutual": mutual_nearest(forward, backward),
                "cycle1": cycle_consistent(forward, backward, radius=1.0),
            }
            timing["match_s"] += time.perf_counter() - tick
            forwards[spec] = forward
            for name, matches in filtered.items():
                batch_scores[(spec, name)] = score_matches(matches, homographies, args.size)
        if use_consensus:
            tick = time.perf_counter()
            agreed = consensus([forwards[spec] for spec in specs], radius=0.0)
            timing["match_s"] += time.perf_counter() - tick
            batch_scores[(" + ".join(specs), "consensus")] = score_matches(agreed, homographies, args.size)
        batch_scores[("identity", "none")] = score_identity(forwards[specs[0]].source_shape, homographies, args.size)

        for (spec, name), scores in batch_scores.items():
            per_setting.setdefault((spec, name), []).extend(scores)
        if args.example is not None and start == 0:
            draw_example(args.example, images[0], warped[0], filtered["mutual"], homographies, args.size)
        for i, (subject, path) in enumerate(chunk):
            per_photo.append({
                "subject": subject, "file": path.name,
                "homography": homographies[i].tolist(),
                "results": {f"{spec} / {name}": scores[i] for (spec, name), scores in batch_scores.items()},
            })
        print(f"  {min(start + args.batch_size, len(photos))}/{len(photos)} photos, "
              f"{time.perf_counter() - start_all:.1f} s", flush=True)
    total_s = time.perf_counter() - start_all

    results = [{"extractor": spec, "filter": name, **summarise(rows)} for (spec, name), rows in per_setting.items()]
    print()
    print_table(results)
    timing["total_s"] = total_s
    print(f"\ntotal {total_s:.1f} s (load + warp {timing['load_warp_s']:.1f} s, "
          + ", ".join(f"{spec} {t:.1f} s" for spec, t in timing["extract_s"].items())
          + f", matching {timing['match_s']:.1f} s)")

    report = {"settings": settings, "hardware": hardware, "timing": timing, "results": results, "photos": per_photo}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, allow_nan=False, default=_json_default))
    print(f"wrote {args.out}")
    return report


def _json_default(value):  # pragma: no cover - only non-JSON values reach it
    raise TypeError(f"not JSON serialisable: {value!r}")


if __name__ == "__main__":
    main()
