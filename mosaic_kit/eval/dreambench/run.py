"""The resumable evaluation loop and its files (`evaluate_cases`, `check_run_settings`)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm.auto import tqdm

from ...utils.atomic import save_image_atomic, write_text_atomic
from ..crops import (
    DEFAULT_CROP_SIZES,
    DEFAULT_CROP_STRIDE,
    sliding_crops,
)
from ..metrics import CLIPScorer, DINOScorer
from ..sheets import SheetRow, contact_sheet
from .benchmark import DreamBench, _open_rgb
from .cases import EvalCase, find_case_images
from .generation import GenerationSettings, generate_case_images
from .scoring import _METRICS, score_case, summarize, summary_markdown

__all__ = ["check_run_settings", "evaluate_cases"]

_CSV_COLUMNS = ("case_id", "setting", "subjects", "index", "prompt", "num_images") + _METRICS


def check_run_settings(out_dir: str | Path, settings: dict, *, overwrite: bool = False) -> None:
    """Records `settings` in `<out_dir>/settings.json`; on a resumed run (the file exists) refuses
    different values unless `overwrite`, so that one folder never mixes two kinds of results.

    Args:
        out_dir: the run folder.
        settings: JSON-ready dict of what shapes the per-case results.
        overwrite: replace the stored settings instead of comparing.

    Raises:
        ValueError: if the stored settings differ (naming the keys).

    Example:
        >>> import tempfile
        >>> out = tempfile.mkdtemp()
        >>> check_run_settings(out, {"clip": "a"}); check_run_settings(out, {"clip": "a"})
        >>> check_run_settings(out, {"clip": "b"})
        Traceback (most recent call last):
        ...
        ValueError: Expected the settings stored in ... (clip: 'a'); use another output folder, the same settings, or overwrite.
    """
    path = Path(out_dir) / "settings.json"
    wanted = json.loads(json.dumps(settings))  # tuples → lists, as stored
    if path.exists() and not overwrite:
        stored = json.loads(path.read_text())
        changed = sorted(key for key in set(stored) | set(wanted) if stored.get(key) != wanted.get(key))
        if changed:
            details = ", ".join(f"{key}: {stored.get(key)!r}" for key in changed)
            raise ValueError(
                f"Expected the settings stored in {path} ({details}); use another output folder, the same settings, "
                "or overwrite."
            )
        return
    write_text_atomic(path, json.dumps(wanted, indent=2) + "\n")


def _case_rows(case_results: list[dict]) -> list[dict]:
    rows = []
    for result in case_results:
        row = {column: result[column] for column in _CSV_COLUMNS if column != "subjects"}
        row["subjects"] = "+".join(result["subjects"])
        rows.append(row)
    return rows


def _write_sheets(
    bench: DreamBench, results: list[dict], images_root: Path, sheets_dir: Path, reference_index: int, thumb_size: int
) -> list[Path]:

    written = []

    def caption(result: dict) -> str:
        return (
            f"[{result['case_id']}] {result['prompt']}\n"
            f"CLIP-I: {result['clip_i']:.2f}  |  CLIP-T: {result['clip_t']:.2f}  |  DINO: {result['dino']:.2f}"
        )

    def outputs(result: dict) -> list[Image.Image]:
        return [_open_rgb(images_root / name) for name in result["images"]]

    singles: dict[str, list[dict]] = {}
    for result in results:
        if result["setting"] == "single":
            singles.setdefault(result["subjects"][0], []).append(result)
    for name, rows in singles.items():
        subject = bench.subjects[name]
        sheet_rows = [SheetRow(f"{name} ({subject.class_name}): photos", [_open_rgb(p) for p in subject.image_paths])]
        sheet_rows += [SheetRow(caption(result), [], outputs(result)) for result in rows]
        path = sheets_dir / "single" / f"{name}.png"
        save_image_atomic(contact_sheet(sheet_rows, thumb_size=thumb_size, title=f"DreamBench single-subject: {name}"), path)
        written.append(path)
    multis = [result for result in results if result["setting"] == "multi"]
    if multis:
        sheet_rows = []
        for result in multis:
            photos = []
            for name in result["subjects"]:
                paths = bench.subjects[name].image_paths
                photos.append(_open_rgb(paths[min(reference_index, len(paths) - 1)]))
            sheet_rows.append(SheetRow(caption(result) + "\nsubjects: " + ", ".join(result["subjects"]), photos, outputs(result)))
        path = sheets_dir / "multi.png"
        save_image_atomic(contact_sheet(sheet_rows, thumb_size=thumb_size, title="DreamBench multi-subject"), path)
        written.append(path)
    return written


def evaluate_cases(
    bench: DreamBench,
    cases: Sequence[EvalCase],
    out_dir: str | Path,
    clip: CLIPScorer,
    dino: DINOScorer,
    *,
    images_root: str | Path | None = None,
    pipe: Any = None,
    generation: GenerationSettings = GenerationSettings(),
    crop_sizes: Sequence[float] = DEFAULT_CROP_SIZES,
    crop_stride: float = DEFAULT_CROP_STRIDE,
    overwrite: bool = False,
    allow_missing: bool = False,
    sheets: bool = True,
    thumb_size: int = 128,
    progress: bool = True,
) -> dict:
    """Generates (optionally) and scores cases, and writes every report of a run.

    Two modes: with `pipe`, images are generated into `images_root` (default
    `<out_dir>/images`) with `generate_case_images`; without, `images_root` is an existing folder
    laid out by case (`find_case_images`). A case whose `<out_dir>/cases/<case_id>.json` exists is
    read back instead of redone (unless `overwrite`), so an interrupted run resumes.

    Files written in `out_dir`:

    - `cases/<case_id>.json`: per-case scores (`score_case`) plus `images` (paths relative to
      `images_root`), written atomically when the case is done;
    - `results.csv` (one row per case: ids, prompt, number of images, the five metrics) and
      `results.json` (the per-case dicts);
    - `summary.json` (`summarize`, plus `missing_cases`, crop settings and `images_root`) and
      `summary.md` (`summary_markdown`);
    - with `sheets`: `sheets/single/<subject>.png` (the subject's photos, then each prompt with
      its outputs and scores) and `sheets/multi.png` (per case: the reference photo of each
      subject, the prompt, the outputs and scores).

    Args:
        bench: the benchmark.
        cases: the cases (`list_cases`), at least one.
        out_dir: the run folder.
        clip: a `CLIPScorer`.
        dino: a `DINOScorer`.
        images_root: scoring-only: the folder of generated images; generation: where images go.
        pipe: a reference-image pipeline (see `generate_case_images`), or None to score only.
        generation: the generation settings (used with `pipe`; its `reference_index` also picks
            the photo shown on multi-subject sheets).
        crop_sizes: sliding-crop sides for multi-subject cases.
        crop_stride: sliding-crop step.
        overwrite: redo cases whose JSON exists.
        allow_missing: scoring-only: skip cases without images (listed in the summary) instead
            of raising.
        sheets: write contact sheets; defaults to True.
        thumb_size: contact-sheet thumbnail side; defaults to 128.
        progress: show a progress bar over cases; defaults to True.

    Returns:
        The summary dict written to `summary.json`.

    Raises:
        ValueError: if `cases` is empty, neither `pipe` nor `images_root` is given, or (scoring
            only, without `allow_missing`) some cases have no image.

    Example:
        >>> summary = evaluate_cases(bench, cases, "runs/eval", clip, dino, images_root="my_images")  # doctest: +SKIP
    """
    if not cases:
        raise ValueError("Expected `cases` to hold at least one case, but got none.")
    if pipe is None and images_root is None:
        raise ValueError("Expected `pipe` (generation) or `images_root` (scoring only), but got neither.")
    if not isinstance(generation, GenerationSettings):
        raise ValueError(f"Expected `generation` to be a GenerationSettings, but got {type(generation).__name__}.")
    sliding_crops(16, 16, crop_sizes, crop_stride)  # validates the crop settings before any work
    out_dir = Path(out_dir)
    images_root = Path(images_root) if images_root is not None else out_dir / "images"
    missing: list[str] = []
    found: dict[str, list[Path]] = {}
    if pipe is None:
        for case in cases:
            found[case.case_id] = find_case_images(images_root, case)
            if not found[case.case_id]:
                missing.append(case.case_id)
        if missing and not allow_missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise ValueError(
                f"Expected images for every case under {images_root}/<case_id>/, but {len(missing)} of {len(cases)} "
                f"cases have none ({shown}); generate them, subsample the cases, or allow missing cases."
            )
    todo = [case for case in cases if case.case_id not in missing]
    photos: dict[str, list[Image.Image]] = {}
    cache: dict = {}
    results = []
    done = resumed = 0
    for case in tqdm(todo, desc="DreamBench cases", disable=not progress):
        path = out_dir / "cases" / f"{case.case_id}.json"
        if path.exists() and not overwrite:
            results.append(json.loads(path.read_text()))
            resumed += 1
            continue
        if pipe is not None:
            paths = generate_case_images(pipe, bench, case, images_root, generation)
        else:
            paths = found[case.case_id]
        for name in case.subjects:
            if name not in photos:
                photos[name] = [_open_rgb(p) for p in bench.subjects[name].image_paths]
        result = score_case(
            case,
            [_open_rgb(p) for p in paths],
            photos,
            clip,
            dino,
            crop_sizes=crop_sizes,
            crop_stride=crop_stride,
            cache=cache,
        )
        result["images"] = [p.relative_to(images_root).as_posix() for p in paths]
        write_text_atomic(path, json.dumps(result, indent=1) + "\n")
        results.append(result)
        done += 1

    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=list(_CSV_COLUMNS))
    writer.writeheader()
    writer.writerows(_case_rows(results))
    write_text_atomic(out_dir / "results.csv", table.getvalue())
    write_text_atomic(out_dir / "results.json", json.dumps(results, indent=1) + "\n")
    summary = summarize(results)
    summary.update(
        {
            "scored_cases": done,
            "resumed_cases": resumed,
            "missing_cases": missing,
            "crop_sizes": list(crop_sizes),
            "crop_stride": crop_stride,
            "images_root": str(images_root),
            "generation": asdict(generation) if pipe is not None else None,
        }
    )
    write_text_atomic(out_dir / "summary.md", summary_markdown(summary, crop_sizes=crop_sizes, crop_stride=crop_stride))
    if sheets and results:
        written = _write_sheets(bench, results, images_root, out_dir / "sheets", generation.reference_index, thumb_size)
        summary["sheets"] = [p.relative_to(out_dir).as_posix() for p in written]
    write_text_atomic(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary
