"""Stage "filter": per-criterion scores, thresholds from the config, a decision with its reasons.

Criteria (each off when its threshold is None):

- ``min_clip``: prompt-image agreement, CLIP-T (cosine × 100 of CLIP's image and prompt embeddings,
  `mosaic_kit.eval.CLIPScorer`).
- ``min_quality``: an image-quality score: `SharpnessScore` (weight-free: variance of the
  Laplacian of the grey image, a no-reference blur measure) or `ClipQualityScore` (CLIP-IQA's
  antonym prompts "Good photo." / "Bad photo.", in [0, 1]).
- ``exactly_once``: every listed subject found exactly once (per distinct name, as many
  detections above the detector's threshold as the prompt lists).
- ``min_mask_score``: each subject's mask-quality score (SAM's predicted IoU).
- ``min_subject_area`` / ``max_subject_area``: each subject's mask area as a fraction of the image.
- ``max_box_iou``: largest IoU between two subjects' boxes (composition: subjects apart).

Every rejected item keeps all its scores and every failed criterion as a reason
(``"<key>: <detail>"``); the summary counts the keys.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from PIL import Image

from ..utils.images import pil_to_tensor
from .subjects import DetectedSubjects, box_iou

__all__ = ["REJECT_REASONS", "ClipQualityScore", "FilterThresholds", "SharpnessScore", "decide", "subject_scores"]

REJECT_REASONS = ("low_clip", "low_quality", "subject_missing", "subject_repeated", "low_mask_score",
                  "subject_too_small", "subject_too_large", "subjects_overlap")
"""The reason keys `decide` gives."""


@dataclass
class FilterThresholds:
    """The filter's thresholds; None switches a criterion off.

    Examples:
        >>> FilterThresholds(min_clip=20.0).min_clip
        20.0
    """

    min_clip: float | None = None
    min_quality: float | None = None
    exactly_once: bool = True
    min_mask_score: float | None = None
    min_subject_area: float | None = None
    max_subject_area: float | None = None
    max_box_iou: float | None = None

    def __post_init__(self) -> None:
        for name in (f.name for f in fields(FilterThresholds)):  # not a subclass's own fields
            value = getattr(self, name)
            if name == "exactly_once":
                if not isinstance(value, bool):
                    raise ValueError(f"Expected `exactly_once` to be a bool, but got {value!r}.")
            elif value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"Expected `{name}` to be a number or None, but got {value!r}.")
        for name in ("min_subject_area", "max_subject_area", "max_box_iou", "min_mask_score"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 1:
                raise ValueError(f"Expected `{name}` in [0, 1] or None, but got {value!r}.")


class SharpnessScore:
    """Weight-free image quality: variance of the Laplacian of the grey image (× 1000, on
    ``size × size``). Blurred or flat images score low.

    Examples:
        >>> sharp = Image.frombytes("L", (64, 64), bytes((i * 7919) % 256 for i in range(64 * 64))).convert("RGB")
        >>> score = SharpnessScore()
        >>> score([sharp])[0] > score([Image.new("RGB", (64, 64), "grey")])[0]
        True
    """

    name = "sharpness"

    def __init__(self, size: int = 256) -> None:
        self.size = size

    def __call__(self, images: Sequence[Image.Image]) -> list[float]:
        """One score per image."""
        import kornia

        scores = []
        for image in images:
            grey = pil_to_tensor(image.convert("RGB").resize((self.size, self.size), Image.BILINEAR)).mean(0)[None, None]
            laplacian = kornia.filters.laplacian(grey, kernel_size=3, border_type="reflect", normalized=False)
            scores.append(float(laplacian.var()) * 1000.0)
        return scores


class ClipQualityScore:
    """CLIP-IQA-style quality (Wang et al., 2023): softmax of an image's CLIP similarity to
    "Good photo." and "Bad photo.", the probability of "good", in [0, 1].

    Args:
        scorer: a `mosaic_kit.eval.CLIPScorer`.

    Examples:
        >>> from mosaic_kit.eval import tiny_clip_scorer
        >>> score, = ClipQualityScore(tiny_clip_scorer())([Image.new("RGB", (32, 32))])
        >>> 0 <= score <= 1
        True
    """

    name = "clip_iqa"
    PROMPTS = ("Good photo.", "Bad photo.")

    def __init__(self, scorer: Any) -> None:
        self.scorer = scorer

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image]) -> list[float]:
        """One score per image."""
        text = self.scorer.embed_texts(list(self.PROMPTS))
        logits = 100.0 * self.scorer.embed_images(list(images)) @ text.T
        return logits.softmax(-1)[:, 0].tolist()


def subject_scores(found: DetectedSubjects, image_size: tuple[int, int]) -> dict[str, Any]:
    """The subject criteria's scores of one image: counts, mask scores, areas, largest box IoU.

    Args:
        found: the subjects stage's result.
        image_size: ``(H, W)``.

    Examples:
        >>> found = DetectedSubjects(["dog", "cat"], [[0, 0, 4, 4], [4, 4, 8, 8]], [0.9, 0.8],
        ...     [torch.ones(8, 8, dtype=torch.bool), None], [0.9, 0.0], {"dog": 1, "cat": 1})
        >>> subject_scores(found, (8, 8))["areas"], subject_scores(found, (8, 8))["max_box_iou"]
        ([1.0, 0.0], 0.0)
    """
    height, width = image_size
    areas = [0.0 if m is None else float(m.sum()) / (height * width) for m in found.masks]
    boxes = [b for b in found.boxes if b is not None]
    max_iou = 0.0
    if len(boxes) > 1:
        iou = box_iou(torch.tensor(boxes), torch.tensor(boxes))
        iou.fill_diagonal_(0)
        max_iou = float(iou.max())
    return {"counts": dict(found.counts), "listed": {n: found.names.count(n) for n in dict.fromkeys(found.names)},
            "mask_scores": list(found.mask_scores), "areas": areas, "max_box_iou": max_iou}


def decide(scores: dict[str, Any], thresholds: FilterThresholds) -> tuple[bool, list[str]]:
    """Keeps an image when it passes every criterion; the reasons name each failed one.

    Args:
        scores: ``clip`` and ``quality`` (floats, when computed) and the keys of `subject_scores`.
        thresholds: the `FilterThresholds`.

    Returns:
        ``(kept, reasons)``; reasons are ``"<key>: <detail>"`` with keys from `REJECT_REASONS`.

    Raises:
        ValueError: when a threshold is set but its score is missing.

    Examples:
        >>> scores = {"clip": 18.0, "counts": {"dog": 2, "cat": 1}, "listed": {"dog": 1, "cat": 1},
        ...           "mask_scores": [0.9, 0.9], "areas": [0.2, 0.1], "max_box_iou": 0.0}
        >>> decide(scores, FilterThresholds(min_clip=20.0))
        (False, ['low_clip: 18.00 < 20.00', 'subject_repeated: dog found 2 times, listed 1'])
    """
    reasons = []

    def need(key: str) -> Any:
        if key not in scores or scores[key] is None:
            raise ValueError(f"Expected the score {key!r} in `scores` for the thresholds set, but it is missing.")
        return scores[key]

    if thresholds.min_clip is not None and need("clip") < thresholds.min_clip:
        reasons.append(f"low_clip: {scores['clip']:.2f} < {thresholds.min_clip:.2f}")
    if thresholds.min_quality is not None and need("quality") < thresholds.min_quality:
        reasons.append(f"low_quality: {scores['quality']:.3g} < {thresholds.min_quality:.3g}")
    if thresholds.exactly_once:
        counts, listed = need("counts"), need("listed")
        for name, wanted in listed.items():
            got = counts.get(name, 0)
            if got < wanted:
                reasons.append(f"subject_missing: {name} found {got} times, listed {wanted}")
            elif got > wanted:
                reasons.append(f"subject_repeated: {name} found {got} times, listed {wanted}")
    if thresholds.min_mask_score is not None:
        low = [k for k, s in enumerate(need("mask_scores")) if s < thresholds.min_mask_score]
        if low:
            reasons.append(f"low_mask_score: subjects {low} below {thresholds.min_mask_score}")
    if thresholds.min_subject_area is not None:
        small = [k for k, a in enumerate(need("areas")) if a < thresholds.min_subject_area]
        if small:
            reasons.append(f"subject_too_small: subjects {small} cover less than {thresholds.min_subject_area}")
    if thresholds.max_subject_area is not None:
        large = [k for k, a in enumerate(need("areas")) if a > thresholds.max_subject_area]
        if large:
            reasons.append(f"subject_too_large: subjects {large} cover more than {thresholds.max_subject_area}")
    if thresholds.max_box_iou is not None and need("max_box_iou") > thresholds.max_box_iou:
        reasons.append(f"subjects_overlap: box IoU {scores['max_box_iou']:.2f} > {thresholds.max_box_iou}")
    return not reasons, reasons
