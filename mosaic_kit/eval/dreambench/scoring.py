"""Scoring a case (CLIP-I, CLIP-T, DINO; whole image and best crop per subject) and the summary
tables (`score_case`, `summarize`, `summary_markdown`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from ..crops import (
    DEFAULT_CROP_SIZES,
    DEFAULT_CROP_STRIDE,
    subject_similarity,
)
from ..metrics import CLIPScorer, DINOScorer, mean_similarity
from .benchmark import SETTINGS
from .cases import EvalCase

__all__ = ["score_case", "summarize", "summary_markdown"]

_METRICS = ("clip_i", "clip_t", "dino", "clip_i_whole", "dino_whole")


def _reference_embeddings(scorer: Any, name: str, photos: Sequence[Image.Image], cache: dict | None) -> torch.Tensor:
    key = (id(scorer), name)
    if cache is not None and key in cache:
        return cache[key]
    embeddings = scorer.embed_images(photos)
    if cache is not None:
        cache[key] = embeddings
    return embeddings


def _r(value: torch.Tensor | float) -> float:
    return round(float(value), 4)


def _rs(values: torch.Tensor) -> list[float]:
    return [_r(v) for v in values.flatten()]


def score_case(
    case: EvalCase,
    images: Sequence[Image.Image],
    references: dict[str, Sequence[Image.Image]],
    clip: CLIPScorer,
    dino: DINOScorer,
    *,
    crop_sizes: Sequence[float] = DEFAULT_CROP_SIZES,
    crop_stride: float = DEFAULT_CROP_STRIDE,
    cache: dict | None = None,
) -> dict:

    """Scores one case's images (see the module docstring for the protocol).

    Args:
        case: the case.
        images: its generated PIL images (at least one).
        references: photos per subject name (all of each of the case's subjects).
        clip: a `CLIPScorer` (CLIP-I and CLIP-T).
        dino: a `DINOScorer`.
        crop_sizes: sliding-crop sides for multi-subject cases (fractions of the shorter side).
        crop_stride: sliding-crop step (fraction of the crop side).
        cache: optional dict reused across calls to keep the photos' embeddings.

    Returns:
        A JSON-ready dict: `case_id`, `setting`, `subjects`, `index`, `prompt`, `num_images`,
        the case scores `clip_i`, `clip_t`, `dino` (multi: best-crop scores averaged over
        subjects), `clip_i_whole`, `dino_whole` (whole image; equal to the former for single
        cases), `per_image` (the same per image) and, for multi cases, `per_subject` (scores and
        the best crop box `[left, top, right, bottom]` of each image for each metric).

    Raises:
        ValueError: if `images` is empty or a subject's photos are missing from `references`.

    Example:
        >>> from mosaic_kit.eval import tiny_clip_scorer, tiny_dino_scorer
        >>> photo = Image.new("RGB", (32, 32), "red")
        >>> case = EvalCase("single", "single/dog/00", ("dog",), "a dog", 0, 1)
        >>> result = score_case(case, [photo], {"dog": [photo]}, tiny_clip_scorer(), tiny_dino_scorer())
        >>> result["clip_i"], result["dino"]
        (100.0, 100.0)
    """
    if not isinstance(images, Sequence) or len(images) == 0:
        raise ValueError(f"Expected `images` to hold at least one image for case {case.case_id}, but got none.")
    missing = [name for name in case.subjects if not references.get(name)]
    if missing:
        raise ValueError(f"Expected photos of {missing} in `references` for case {case.case_id}, but got none.")
    clip_refs = [_reference_embeddings(clip, name, references[name], cache) for name in case.subjects]
    dino_refs = [_reference_embeddings(dino, name, references[name], cache) for name in case.subjects]
    clip_images = clip.embed_images(images)
    text = clip.embed_texts([case.prompt])[0]
    clip_t = 100.0 * clip_images @ text
    result: dict[str, Any] = {
        "case_id": case.case_id,
        "setting": case.setting,
        "subjects": list(case.subjects),
        "index": case.index,
        "prompt": case.prompt,
        "num_images": len(images),
    }
    if case.setting == "single":
        clip_i = mean_similarity(clip_images, clip_refs[0])
        dino_score = mean_similarity(dino.embed_images(images), dino_refs[0])
        per_image = {"clip_i": clip_i, "clip_t": clip_t, "dino": dino_score, "clip_i_whole": clip_i, "dino_whole": dino_score}
    else:
        by_clip = subject_similarity(clip.embed_images, images, clip_refs, sizes=crop_sizes, stride=crop_stride)
        by_dino = subject_similarity(dino.embed_images, images, dino_refs, sizes=crop_sizes, stride=crop_stride)
        per_image = {
            "clip_i": by_clip.crop.mean(dim=1),
            "clip_t": clip_t,
            "dino": by_dino.crop.mean(dim=1),
            "clip_i_whole": by_clip.whole.mean(dim=1),
            "dino_whole": by_dino.whole.mean(dim=1),
        }
        result["per_subject"] = {
            name: {
                "clip_i": _r(by_clip.crop[:, s].mean()),
                "dino": _r(by_dino.crop[:, s].mean()),
                "clip_i_whole": _r(by_clip.whole[:, s].mean()),
                "dino_whole": _r(by_dino.whole[:, s].mean()),
                "clip_i_boxes": by_clip.best_box[:, s].tolist(),
                "dino_boxes": by_dino.best_box[:, s].tolist(),
            }
            for s, name in enumerate(case.subjects)
        }
    for metric in _METRICS:
        result[metric] = _r(per_image[metric].mean())
    result["per_image"] = {metric: _rs(per_image[metric]) for metric in _METRICS}
    return result


def summarize(results: Sequence[dict]) -> dict:
    """Benchmark scores per setting: each metric averaged over all scored images (cases weighted
    by their number of images, as DreamBench averages over generated images).

    Args:
        results: per-case dicts as returned by `score_case`.

    Returns:
        `{"single": {...}, "multi": {...}}` for the settings present, each with `cases`,
        `images` and the five metrics `clip_i`, `clip_t`, `dino`, `clip_i_whole`, `dino_whole`.

    Example:
        >>> rows = [{"setting": "single", "num_images": 1, "clip_i": 80.0, "clip_t": 30.0, "dino": 70.0,
        ...          "clip_i_whole": 80.0, "dino_whole": 70.0},
        ...         {"setting": "single", "num_images": 3, "clip_i": 84.0, "clip_t": 30.0, "dino": 74.0,
        ...          "clip_i_whole": 84.0, "dino_whole": 74.0}]
        >>> single = summarize(rows).get("single")
        >>> single["clip_i"], single["images"]
        (83.0, 4)
    """
    summary: dict[str, dict] = {}
    for setting in SETTINGS:
        rows = [row for row in results if row["setting"] == setting]
        if not rows:
            continue
        images = sum(row["num_images"] for row in rows)
        entry: dict[str, Any] = {"cases": len(rows), "images": images}
        for metric in _METRICS:
            entry[metric] = _r(sum(row[metric] * row["num_images"] for row in rows) / images)
        summary[setting] = entry
    return summary


def summary_markdown(summary: dict, *, crop_sizes: Sequence[float] = DEFAULT_CROP_SIZES,
                     crop_stride: float = DEFAULT_CROP_STRIDE) -> str:
    """The summary as a markdown table laid out like the paper's Table 1 (rows single / multi,
    columns CLIP-I, CLIP-T, DINO), plus the multi-subject whole-image scores.

    Example:
        >>> entry = {"cases": 1, "images": 4, "clip_i": 84.3, "clip_t": 31.64, "dino": 77.4,
        ...          "clip_i_whole": 84.3, "dino_whole": 77.4}
        >>> print(summary_markdown({"single": entry}).splitlines()[2])
        | Single-Subject | 1 | 4 | 84.30 | 31.64 | 77.40 |
    """
    lines = ["| Setting | Cases | Images | CLIP-I ↑ | CLIP-T ↑ | DINO ↑ |", "|---|---|---|---|---|---|"]
    names = {"single": "Single-Subject", "multi": "Multi-Subject"}
    for setting in SETTINGS:
        if setting in summary:
            e = summary[setting]
            lines.append(f"| {names[setting]} | {e['cases']} | {e['images']} | {e['clip_i']:.2f} | {e['clip_t']:.2f} | {e['dino']:.2f} |")
    if "multi" in summary:
        e = summary["multi"]
        lines.append(
            f"| Multi-Subject (whole image) | {e['cases']} | {e['images']} | {e['clip_i_whole']:.2f} | {e['clip_t']:.2f} "
            f"| {e['dino_whole']:.2f} |"
        )
        note = (
            "Multi-subject CLIP-I and DINO: per subject, the best of the sliding square crops "
            f"(sides {list(crop_sizes)} of the shorter image side, stride {crop_stride} of the crop side), "
            "averaged over subjects; the last row scores each subject on the whole image instead."
        )
        lines += ["", note]
    return "\n".join(lines) + "\n"
