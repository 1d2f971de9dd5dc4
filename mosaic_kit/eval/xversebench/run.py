"""The resumable XVerseBench loop and its files (`evaluate_xversebench`, `summary_markdown`)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm.auto import tqdm

from ...utils.atomic import write_text_atomic
from ..judge import MLLMJudge, judge_summary
from ..paper import xversebench_paper_table
from .benchmark import XVerseBench, XVerseCase, open_subject_photo
from .generation import XVerseGeneration, generate_case_images
from .scoring import XVerseScorers, score_case, summarize

__all__ = ["IMAGE_SUFFIXES", "evaluate_xversebench", "find_case_images", "judge_task_type", "summary_markdown"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
"""Suffixes read as generated images in scoring-only mode."""


def find_case_images(images_root: str | Path, case: XVerseCase) -> list[Path]:
    """A case's images in a folder laid out by case: ``<images_root>/<case_id>/*`` with a suffix
    in `IMAGE_SUFFIXES`, sorted by name, at most ``case.num_images``.

    Example:
        >>> find_case_images("/nonexistent", XVerseCase("single", 3, "a cat", (), {"1": "?"}, {}))
        []
    """
    folder = Path(images_root) / case.case_id
    if not folder.is_dir():
        return []
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    return files[: case.num_images]


def judge_task_type(case: XVerseCase) -> str:
    """The OmniContext-style task type of a case: ``single`` or ``multiple``, then ``character``
    (humans only), ``object`` (objects and animals only) or ``character_object``.

    Example:
        >>> from mosaic_kit.eval.xversebench.benchmark import XVerseSubject
        >>> man = XVerseSubject("human_01_man.jpg", "human", "man", "a man", Path("m.jpg"))
        >>> dog = XVerseSubject("animal_02_dog.jpg", "animal", "dog", "a dog", Path("d.jpg"))
        >>> judge_task_type(XVerseCase("multi", 0, "a man and a dog", (man, dog), {"1": "?"}, {}))
        'multiple_character_object'
    """
    count = "single" if case.num_subjects == 1 else "multiple"
    humans = {s.is_human for s in case.subjects}
    kind = "character" if humans == {True} else "object" if humans == {False} else "character_object"
    return f"{count}_{kind}"


def evaluate_xversebench(
    bench: XVerseBench,
    cases: Sequence[XVerseCase],
    out_dir: str | Path,
    scorers: XVerseScorers,
    *,
    images_root: str | Path | None = None,
    pipe: Any = None,
    generation: XVerseGeneration = XVerseGeneration(),
    judge: MLLMJudge | None = None,
    overwrite: bool = False,
    allow_missing: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Generates (optionally), scores and judges (optionally) cases; writes every report of a run.

    Two modes: with `pipe`, images are generated into `images_root` (default
    ``<out_dir>/images``) by `generate_case_images`; without, `images_root` is an existing folder
    laid out by case (`find_case_images`). A case whose record exists is read back instead of
    redone (unless `overwrite`), so an interrupted run resumes; shards of one run (disjoint
    `cases`, same `out_dir`) share the records, and each run's summary covers every record of
    `bench` found in `out_dir`.

    Files in `out_dir`:

    - ``cases/<split>/<index:03d>.json``: one record per case (`score_case`, plus ``images`` and,
      with a judge, ``judge``), written atomically when the case is done;
    - ``results.json``: the records of the summary; ``summary.json``: `summarize` plus the judge
      summary and the run's counts; ``summary.md``: `summary_markdown`.

    Args:
        bench: the benchmark.
        cases: this run's cases (`list_cases`), at least one.
        out_dir: the run folder.
        scorers: the metric scorers.
        images_root: scoring-only: the images; generation: where they go.
        pipe: a reference-image pipeline, or None to score existing images.
        generation: how to call the pipeline.
        judge: an optional `MLLMJudge` (each image judged for PF and SC).
        overwrite: redo cases whose record exists.
        allow_missing: scoring-only: skip cases without images instead of failing.
        progress: show a progress bar.

    Returns:
        The summary written to ``summary.json``.

    Raises:
        ValueError: on no cases, neither `pipe` nor `images_root`, or (scoring only, without
            `allow_missing`) cases without images.
    """
    if not cases:
        raise ValueError("Expected `cases` to hold at least one case, but got none.")
    if pipe is None and images_root is None:
        raise ValueError("Expected `pipe` (generation) or `images_root` (scoring only), but got neither.")
    if not isinstance(scorers, XVerseScorers):
        raise ValueError(f"Expected `scorers` to be an XVerseScorers, but got {type(scorers).__name__}.")
    out_dir = Path(out_dir)
    images_root = Path(images_root) if images_root is not None else out_dir / "images"
    found: dict[str, list[Path]] = {}
    missing: list[str] = []
    if pipe is None:
        for case in cases:
            found[case.case_id] = find_case_images(images_root, case)
            if not found[case.case_id]:
                missing.append(case.case_id)
        if missing and not allow_missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise ValueError(
                f"Expected images for every case under {images_root}/<split>/<index>/, but {len(missing)} of "
                f"{len(cases)} cases have none ({shown}); generate them, choose fewer cases, or allow missing cases."
            )
    photos: dict[str, Image.Image] = {}
    cache: dict = {}
    done = resumed = 0
    for case in tqdm([c for c in cases if c.case_id not in missing], desc="XVerseBench cases", disable=not progress):
        path = out_dir / "cases" / f"{case.case_id}.json"
        if path.exists() and not overwrite:
            resumed += 1
            continue
        for subject in case.subjects:
            if subject.name not in photos:
                photos[subject.name] = open_subject_photo(subject.image_path)
        if pipe is not None:
            paths = generate_case_images(pipe, case, photos, images_root, generation)
        else:
            paths = found[case.case_id]
        images = [open_subject_photo(p) for p in paths]
        record = score_case(case, images, photos, scorers, cache=cache)
        record["images"] = [p.relative_to(images_root).as_posix() for p in paths]
        if judge is not None:
            references = [photos[s.name] for s in case.subjects]
            verdicts = [judge.judge(case.prompt, references, image).to_dict() for image in images]
            record["judge"] = {"task_type": judge_task_type(case), "per_image": verdicts}
        write_text_atomic(path, json.dumps(record, indent=1) + "\n")
        done += 1

    records = []
    for split_cases in bench.cases.values():
        for case in split_cases:
            path = out_dir / "cases" / f"{case.case_id}.json"
            if path.exists():
                records.append(json.loads(path.read_text()))
    summary = summarize(records)
    judged = [
        {"task_type": r["judge"]["task_type"], **{k: v[k] for k in ("prompt_following", "subject_consistency")}}
        for r in records if r.get("judge") for v in r["judge"]["per_image"]
    ]
    summary.update({
        "judge": judge_summary(judged) if judged else None,
        "records": len(records),
        "benchmark_cases": bench.num_cases,
        "complete": len(records) == bench.num_cases,
        "run": {"cases": len(cases), "scored": done, "resumed": resumed, "missing": missing},
        "missing_scorers": scorers.missing,
        "images_root": str(images_root),
        "generation": asdict(generation) if pipe is not None else None,
    })
    write_text_atomic(out_dir / "results.json", json.dumps(records, indent=1) + "\n")
    write_text_atomic(out_dir / "summary.md", summary_markdown(summary))
    write_text_atomic(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def _cell(value: Any) -> str:
    return "n/a" if value is None else f"{float(value):.2f}"


def summary_markdown(summary: dict[str, Any], name: str = "this run") -> str:
    """The run's scores per split and per subject count, the paper's Table 2 with the run beside
    it, and the judge's scores per task type when there are any.

    Example:
        >>> group = {"cases": 2, "images": 8, "dpg": 90.0, "id_sim": 70.0, "ip_sim": 75.0, "aes": 55.0, "avg": 72.5}
        >>> text = summary_markdown({"single": group, "by_subjects": {"1": group}, "overall": None, "records": 2,
        ...                          "benchmark_cases": 300, "judge": None})
        >>> text.splitlines()[4]
        '| single | 2 | 8 | 90.00 | 70.00 | 75.00 | 55.00 | 72.50 |'
    """
    lines = [f"# XVerseBench ({summary.get('records', 0)} of {summary.get('benchmark_cases', '?')} cases scored)", "",
             "| Group | Cases | Images | DPG | ID-Sim | IP-Sim | AES | AVG |", "|---|---|---|---|---|---|---|---|"]
    groups = [(split, summary[split]) for split in ("single", "multi") if split in summary]
    groups += [(f"{count} subject(s)", entry) for count, entry in summary.get("by_subjects", {}).items()]
    for label, e in groups:
        lines.append(f"| {label} | {e['cases']} | {e['images']} | " + " | ".join(
            _cell(e.get(k)) for k in ("dpg", "id_sim", "ip_sim", "aes", "avg")) + " |")
    lines += ["", f"Overall (mean of the single- and multi-subject AVG): {_cell(summary.get('overall'))}", "",
              "## Beside the paper (Table 2)", "", xversebench_paper_table(summary, name)]
    judge = summary.get("judge")
    if judge:
        lines += ["## MLLM judge (OmniContext-style, 0-10)", "", "| Task type | Images | Failed | PF | SC | Overall |",
                  "|---|---|---|---|---|---|"]
        for task_type, e in judge["task_types"].items():
            lines.append(f"| {task_type} | {e['images']} | {e['failed']} | {_cell(e['prompt_following'])} | "
                         f"{_cell(e['subject_consistency'])} | {_cell(e['overall'])} |")
        lines.append(f"| **mean over task types** | | {judge['failed']} | {_cell(judge['prompt_following'])} | "
                     f"{_cell(judge['subject_consistency'])} | {_cell(judge['overall'])} |")
    return "\n".join(lines) + "\n"
