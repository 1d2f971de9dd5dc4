"""Scoring a case with the four XVerseBench metrics, and the summary arithmetic (`XVerseScorers`,
`score_case`, `summarize`).

Per case, on each of its images: DPG (the DSG score with dependencies), ID-Sim per human subject,
IP-Sim per other subject; once per case: AES on the 2×2 grid of its images, ×10.
The summary follows XVerse's ``idip_*_score.py`` and ``log_scores.py``, per split:

- DPG: mean over all images;
- ID-Sim: mean over all (image, human subject) pairs; IP-Sim: the same over non-human subjects;
- AES: mean over cases;
- AVG: the plain mean of DPG, ID-Sim, IP-Sim and AES;

and the paper's Overall: the mean of the single- and the multi-subject AVG (Table 2 of the
MOSAIC paper: (80.05 + 72.03) / 2 = 76.04). The same groups are also formed by subject count
(1, 2, 3).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image

from .aesthetics import AestheticModel, image_grid
from .benchmark import SPLITS, XVerseCase
from .dpg import VQAModel, dsg_score
from .faces import FaceIdentityScorer
from .subjects import SubjectSimilarityScorer

__all__ = ["METRICS", "XVerseScorers", "score_case", "summarize"]

METRICS = ("dpg", "id_sim", "ip_sim", "aes")
"""The four XVerseBench metrics, in the paper's column order (AVG is their mean)."""

AES_INPUTS = ("grid", "images")


@dataclass
class XVerseScorers:
    """The scorers of a run; a metric whose scorer is None is not computed (recorded as null,
    and AVG is then not available).

    Args:
        vqa: DPG's question answerer.
        faces: ID-Sim.
        subjects: IP-Sim.
        aesthetics: AES.
        aes_input: ``"grid"`` (XVerse: one score of the 2×2 grid per case) or ``"images"`` (the
            mean of each image's score); defaults to ``"grid"``.
    """

    vqa: VQAModel | None = None
    faces: FaceIdentityScorer | None = None
    subjects: SubjectSimilarityScorer | None = None
    aesthetics: AestheticModel | None = None
    aes_input: str = "grid"

    def __post_init__(self) -> None:
        for name, kind in (("vqa", VQAModel), ("faces", FaceIdentityScorer), ("subjects", SubjectSimilarityScorer),
                           ("aesthetics", AestheticModel)):
            value = getattr(self, name)
            if value is not None and not isinstance(value, kind):
                raise ValueError(f"Expected `{name}` to be None or a {kind.__name__}, but got {type(value).__name__}.")
        if self.aes_input not in AES_INPUTS:
            raise ValueError(f"Expected `aes_input` to be one of {list(AES_INPUTS)}, but got {self.aes_input!r}.")

    @property
    def missing(self) -> list[str]:
        """The metrics without a scorer."""
        names = {"dpg": self.vqa, "id_sim": self.faces, "ip_sim": self.subjects, "aes": self.aesthetics}
        return [metric for metric in METRICS if names[metric] is None]


def _r(value: float) -> float:
    return round(float(value), 4)


def score_case(case: XVerseCase, images: Sequence[Image.Image], photos: dict[str, Image.Image],
               scorers: XVerseScorers, *, cache: dict | None = None) -> dict[str, Any]:
    """Scores one case's images.

    Args:
        case: the case.
        images: its generated images (at least one).
        photos: the subject photos by subject name (`XVerseSubject.name`).
        scorers: the scorers.
        cache: optional dict reused across calls for the photos' face and DINO embeddings.

    Returns:
        A JSON-ready record: ids, prompt, subjects (name, kind, label), `num_images`, `dpg`
        (mean over images, or None) with `dpg_per_image` and `dsg_answers` (per image, per
        question id), `id_sim` and `ip_sim` (per subject name, one score per image), `aes`
        (×10, or None).

    Raises:
        ValueError: if `images` is empty or a subject photo is missing.
    """
    if not images:
        raise ValueError(f"Expected at least one image for case {case.case_id}, but got none.")
    missing = [s.name for s in case.subjects if s.name not in photos]
    if missing:
        raise ValueError(f"Expected the photos of {missing} in `photos` for case {case.case_id}, but got none.")
    cache = {} if cache is None else cache
    images = [image.convert("RGB") for image in images]
    record: dict[str, Any] = {
        "case_id": case.case_id,
        "split": case.split,
        "index": case.index,
        "prompt": case.prompt,
        "num_subjects": case.num_subjects,
        "subjects": [{"name": s.name, "kind": s.kind, "label": s.label} for s in case.subjects],
        "num_images": len(images),
        "dpg": None,
        "id_sim": None,
        "ip_sim": None,
        "aes": None,
    }
    if scorers.vqa is not None:
        qids = list(case.questions)
        per_image, answers = [], []
        for image in images:
            replies = scorers.vqa.answer(image, [case.questions[q] for q in qids])
            if len(replies) != len(qids):
                raise ValueError(f"Expected {len(qids)} answers from the VQA model, but got {len(replies)}.")
            by_id = dict(zip(qids, (str(r) for r in replies)))
            per_image.append(_r(dsg_score(by_id, case.dependencies).with_dependency))
            answers.append(by_id)
        record.update(dpg=_r(sum(per_image) / len(per_image)), dpg_per_image=per_image, dsg_answers=answers)
    humans = [s for s in case.subjects if s.is_human]
    others = [s for s in case.subjects if not s.is_human]
    if scorers.faces is not None:
        references = []
        for subject in humans:
            key = ("face", id(scorers.faces), subject.name)
            if key not in cache:
                cache[key] = scorers.faces.embed_reference(photos[subject.name])
            references.append(cache[key])
        per_subject: dict[str, list[float]] = {s.name: [] for s in humans}
        if humans:
            for image in images:
                for subject, value in zip(humans, scorers.faces.score(image, references)):
                    per_subject[subject.name].append(_r(value))
        record["id_sim"] = per_subject
    if scorers.subjects is not None:
        per_subject = {s.name: [] for s in others}
        counts: dict[str, list[int]] = {s.name: [] for s in others}
        for subject in others:
            key = ("dino", id(scorers.subjects), subject.name)
            if key not in cache:
                cache[key] = scorers.subjects.dino.embed_images([photos[subject.name]])[0]
            for image in images:
                value, found = scorers.subjects.score(image, subject.label, cache[key])
                per_subject[subject.name].append(_r(value))
                counts[subject.name].append(len(found))
        record["ip_sim"] = per_subject
        record["ip_instances"] = counts
    if scorers.aesthetics is not None:
        inputs = [image_grid(images)] if scorers.aes_input == "grid" else images
        values = scorers.aesthetics.score(inputs)
        record["aes"] = _r(10.0 * float(torch.as_tensor(values).float().mean()))
        record["aes_input"] = scorers.aes_input
    return record


def _mean(values: list[float]) -> float | None:
    return _r(sum(values) / len(values)) if values else None


def _group(records: Sequence[dict]) -> dict[str, Any]:
    dpg = [v for r in records if r.get("dpg") is not None for v in r["dpg_per_image"]]
    ids = [v for r in records if r.get("id_sim") for values in r["id_sim"].values() for v in values]
    ips = [v for r in records if r.get("ip_sim") for values in r["ip_sim"].values() for v in values]
    aes = [r["aes"] for r in records if r.get("aes") is not None]
    entry: dict[str, Any] = {
        "cases": len(records),
        "images": sum(r["num_images"] for r in records),
        "dpg": _mean(dpg),
        "id_sim": _mean(ids),
        "ip_sim": _mean(ips),
        "aes": _mean(aes),
        "id_pairs": len(ids),
        "ip_pairs": len(ips),
    }
    values = [entry[m] for m in METRICS]
    entry["avg"] = _r(sum(values) / 4) if all(v is not None for v in values) else None
    return entry


def summarize(records: Sequence[dict]) -> dict[str, Any]:
    """The XVerseBench summary of per-case records (see the module docstring for the arithmetic).

    Args:
        records: `score_case` records.

    Returns:
        ``{"single": {...}, "multi": {...}, "by_subjects": {"1": ..., "2": ..., "3": ...},
        "overall": float | None}``; each group holds `cases`, `images`, `dpg`, `id_sim`,
        `ip_sim`, `aes`, `avg` (None where a metric has no value: no scorer, or no subject of
        that kind) and the pair counts `id_pairs`, `ip_pairs`. Splits and counts without cases
        are left out; `overall` needs both splits' AVG.

    Example:
        >>> single = {"split": "single", "num_subjects": 1, "num_images": 2, "dpg": 75.0, "dpg_per_image": [50.0, 100.0],
        ...           "id_sim": {"human_00_boy.jpg": [60.0, 80.0]}, "ip_sim": {}, "aes": 55.0}
        >>> multi = {"split": "multi", "num_subjects": 2, "num_images": 2, "dpg": 50.0, "dpg_per_image": [50.0, 50.0],
        ...          "id_sim": {"human_01_man.jpg": [40.0, 60.0]}, "ip_sim": {"object_00_van.jpg": [70.0, 90.0]}, "aes": 45.0}
        >>> summary = summarize([single, multi])
        >>> summary["single"]["avg"] is None, summary["multi"]["avg"]   # single has no IP-Sim pair; (50 + 50 + 80 + 45) / 4
        (True, 56.25)
    """
    summary: dict[str, Any] = {}
    for split in SPLITS:
        rows = [r for r in records if r["split"] == split]
        if rows:
            summary[split] = _group(rows)
    summary["by_subjects"] = {
        str(count): _group([r for r in records if r["num_subjects"] == count])
        for count in sorted({r["num_subjects"] for r in records})
    }
    averages = [summary.get(split, {}).get("avg") for split in SPLITS]
    summary["overall"] = _r(sum(averages) / 2) if all(a is not None for a in averages) else None
    return summary
