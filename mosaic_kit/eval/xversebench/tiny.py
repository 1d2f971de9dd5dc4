"""Tiny random stand-ins of every XVerseBench scorer, built in code (`tiny_xverse_scorers`)."""

from __future__ import annotations

from ..vlm import tiny_vision_language_model
from .aesthetics import tiny_aesthetic_model
from .dpg import VLMQuestionAnswerer
from .faces import FaceIdentityScorer, tiny_face_models
from .scoring import XVerseScorers
from .subjects import SubjectSimilarityScorer, tiny_subject_models

__all__ = ["tiny_xverse_scorers"]


def tiny_xverse_scorers(seed: int = 0) -> XVerseScorers:
    """`XVerseScorers` on tiny random models (a LLaVA for the VQA, a face detector and embedder,
    Florence-2, SAM 2 and a DINO ViT, a SigLIP aesthetic head): every step of every metric runs on
    a CPU in seconds; the numbers mean nothing. Deterministic given `seed`.

    Example:
        >>> tiny_xverse_scorers().missing
        []
    """
    detector, embedder = tiny_face_models(seed)
    grounder, segmenter, dino = tiny_subject_models(seed)
    return XVerseScorers(
        vqa=VLMQuestionAnswerer(tiny_vision_language_model(seed), max_new_tokens=2),
        faces=FaceIdentityScorer(detector, embedder),
        subjects=SubjectSimilarityScorer(grounder, segmenter, dino),
        aesthetics=tiny_aesthetic_model(seed),
    )
