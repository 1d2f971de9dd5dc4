"""XVerseBench (XVerse's multi-subject benchmark): its case files, generation through any
reference-image pipeline, the four metrics behind small scorer interfaces, and the summary in
the layout of the MOSAIC paper's Table 2.

- `XVerseBench.load`: the benchmark's own files (``XVerseBench_{single,multi}.json`` and their
  ``_DSG.json``, photos under ``assets/XVerseBench/``) from a folder the user gives;
  `list_cases` with ``max_cases`` and ``shard=(i, n)``.
- `generate_case_images`, `XVerseGeneration`: 768² targets, 256² references, 4 images per case,
  seeds 42-45, 28 steps, guidance 3.5.
- DPG (`dsg_score`, `VQAModel`, `VLMQuestionAnswerer`, `ModelScopeVQA`), ID-Sim
  (`FaceIdentityScorer`, `FaceDetector`, `FaceEmbedder`, `FacerRetinaFace`), IP-Sim
  (`SubjectSimilarityScorer`, `Florence2Grounder`, `Sam2Segmenter`, `xverse_dino_scorer`), AES
  (`AestheticModel`, `AestheticPredictorV25`, `SiglipAestheticModel`); tiny random stand-ins of
  each (`tiny_xverse_scorers`).
- `score_case`, `summarize`, `evaluate_xversebench` (one record per case, atomic, resumable),
  `summary_markdown`.

The protocol and what differs from XVerse's code: ``docs/eval/xversebench.md``.
"""

from .aesthetics import AestheticModel, AestheticPredictorV25, SiglipAestheticModel, image_grid, tiny_aesthetic_model
from .benchmark import SPLITS, SUBJECT_KINDS, XVerseBench, XVerseCase, XVerseSubject, check_shard, list_cases
from .dpg import DEFAULT_VQA_MODEL, DSGScore, ModelScopeVQA, VLMQuestionAnswerer, VQAModel, dsg_score, is_yes
from .faces import (
    ARCFACE_TEMPLATE,
    FACE_BOX_EXPANSION,
    Face,
    FaceDetector,
    FaceEmbedder,
    FaceIdentityScorer,
    FacerRetinaFace,
    ModuleFaceEmbedder,
    align_face,
    expand_box,
    similarity_transform,
    tiny_face_models,
)
from .generation import REFERENCE_ARGUMENTS, FamilySampler, XVerseGeneration, generate_case_images, prepare_reference
from .run import IMAGE_SUFFIXES, evaluate_xversebench, find_case_images, judge_task_type, summary_markdown
from .scoring import METRICS, XVerseScorers, score_case, summarize
from .subjects import (
    DEFAULT_DINO_MODEL,
    DEFAULT_GROUNDING_MODEL,
    DEFAULT_SEGMENTATION_MODEL,
    MAX_INSTANCES,
    Florence2Grounder,
    Sam2Segmenter,
    SubjectGrounder,
    SubjectSegmenter,
    SubjectSimilarityScorer,
    keep_instance,
    masked_instance,
    pad_to_square,
    tiny_subject_models,
    xverse_dino_scorer,
)
from .tiny import tiny_xverse_scorers

__all__ = [
    "FamilySampler",
    "ARCFACE_TEMPLATE",
    "DEFAULT_DINO_MODEL",
    "DEFAULT_GROUNDING_MODEL",
    "DEFAULT_SEGMENTATION_MODEL",
    "DEFAULT_VQA_MODEL",
    "FACE_BOX_EXPANSION",
    "IMAGE_SUFFIXES",
    "MAX_INSTANCES",
    "METRICS",
    "REFERENCE_ARGUMENTS",
    "SPLITS",
    "SUBJECT_KINDS",
    "AestheticModel",
    "AestheticPredictorV25",
    "DSGScore",
    "Face",
    "FaceDetector",
    "FaceEmbedder",
    "FaceIdentityScorer",
    "FacerRetinaFace",
    "Florence2Grounder",
    "ModelScopeVQA",
    "ModuleFaceEmbedder",
    "Sam2Segmenter",
    "SiglipAestheticModel",
    "SubjectGrounder",
    "SubjectSegmenter",
    "SubjectSimilarityScorer",
    "VLMQuestionAnswerer",
    "VQAModel",
    "XVerseBench",
    "XVerseCase",
    "XVerseGeneration",
    "XVerseScorers",
    "XVerseSubject",
    "align_face",
    "check_shard",
    "dsg_score",
    "evaluate_xversebench",
    "expand_box",
    "find_case_images",
    "generate_case_images",
    "image_grid",
    "is_yes",
    "judge_task_type",
    "keep_instance",
    "list_cases",
    "masked_instance",
    "pad_to_square",
    "prepare_reference",
    "score_case",
    "similarity_transform",
    "summarize",
    "summary_markdown",
    "tiny_aesthetic_model",
    "tiny_face_models",
    "tiny_subject_models",
    "tiny_xverse_scorers",
    "xverse_dino_scorer",
]
