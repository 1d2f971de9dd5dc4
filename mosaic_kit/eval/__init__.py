"""Evaluation: CLIP-I, CLIP-T and DINO metrics, multi-subject crop scoring, attention
localisation, and the DreamBench harness (single- and multi-subject).

- `CLIPScorer`, `DINOScorer`: batched embeddings and scores ×100 with transformers models from a
  local folder or hub id (`from_pretrained`) or model objects; `tiny_clip_scorer`,
  `tiny_dino_scorer` build tiny random ones in code (tests, smoke runs).
- `similarity_matrix`, `mean_similarity`: the cosine ×100 arithmetic on embeddings.
- `sliding_crops`, `subject_similarity`: per-subject scores on the whole image and on the best
  crop, so that a subject is not scored against the others in a multi-subject image.
- `attention_hit_rate`: the fraction of annotated reference points whose attention argmax
  lands within a radius of their target token.
- `DreamBench`, `list_cases`, `generate_case_images`, `score_case`, `evaluate_cases`,
  `summarize`, `summary_markdown`: the benchmark protocol and its reports (`recipes/evaluate.py`).
- `contact_sheet`, `SheetRow`: contact sheets of references, prompts and outputs.
- Sub-packages (imported by name): `mosaic_kit.eval.xversebench` (XVerseBench: case files,
  generation, DPG / ID-Sim / IP-Sim / AES, summary), `mosaic_kit.eval.judge` (an
  OmniContext-style MLLM judge), `mosaic_kit.eval.vlm` (a local vision-language model) and
  `mosaic_kit.eval.paper` (the paper's Tables 1 and 2 beside a run).
- `evaluate_synthetic` and its metrics (`attention_log_probability`, `reference_attention_maps`,
  `attention_overlap`, `subject_attention_mass`, `masked_ncc`, `locate_subject`,
  `palette_affinity`, `subject_fidelity`, ...): the synthetic-world ablation
  scores (`recipes/synthetic_ablation.py`).

Model-backed parts need transformers (extra `flux`), imported when first used.
"""

from .crops import (
    DEFAULT_CROP_SIZES,
    DEFAULT_CROP_STRIDE,
    SubjectSimilarity,
    sliding_crops,
    subject_similarity,
)
from .dreambench import (
    DREAMBENCH_ENV,
    IMAGE_SUFFIXES,
    SETTINGS,
    DreamBench,
    DreamBenchSubject,
    EvalCase,
    GenerationSettings,
    check_run_settings,
    evaluate_cases,
    find_case_images,
    generate_case_images,
    image_seed,
    list_cases,
    score_case,
    summarize,
    summary_markdown,
)
from .localisation import HIT_RATE_REDUCTIONS, attention_hit_rate
from .metrics import (
    CLIPScorer,
    DINOScorer,
    ImageEmbedder,
    mean_similarity,
    similarity_matrix,
    tiny_clip_scorer,
    tiny_dino_scorer,
)
from .sheets import SheetRow, contact_sheet
from .synthetic import (
    INTERVALS,
    mean_interval,
    baseline_presence_threshold,
    generate_with_family,
    presence_threshold,
    subject_presence,
    DEFAULT_TEMPLATE_SCALES,
    METRICS,
    OVERLAP_MEASURES,
    ReferenceAttentionMaps,
    SubjectAttentionMass,
    SubjectFidelity,
    SubjectMatch,
    SyntheticEvalConfig,
    SyntheticEvalResult,
    ablation_table,
    attention_log_probability,
    attention_overlap,
    evaluate_denoising,
    evaluate_generation,
    evaluate_synthetic,
    fidelity_baselines,
    held_out_world,
    locate_subject,
    masked_mse,
    masked_ncc,
    palette_affinity,
    plot_attention_maps,
    plot_metric_against_k,
    reference_attention_maps,
    subject_attention_mass,
    subject_fidelity,
    summarise_records,
    target_token_masks,
)

__all__ = [
    "INTERVALS",
    "mean_interval",
    "baseline_presence_threshold",
    "generate_with_family",
    "presence_threshold",
    "subject_presence",
    "DEFAULT_CROP_SIZES",
    "DEFAULT_CROP_STRIDE",
    "DEFAULT_TEMPLATE_SCALES",
    "DREAMBENCH_ENV",
    "HIT_RATE_REDUCTIONS",
    "IMAGE_SUFFIXES",
    "METRICS",
    "OVERLAP_MEASURES",
    "SETTINGS",
    "CLIPScorer",
    "DINOScorer",
    "DreamBench",
    "DreamBenchSubject",
    "EvalCase",
    "GenerationSettings",
    "ImageEmbedder",
    "ReferenceAttentionMaps",
    "SheetRow",
    "SubjectAttentionMass",
    "SubjectFidelity",
    "SubjectMatch",
    "SubjectSimilarity",
    "SyntheticEvalConfig",
    "SyntheticEvalResult",
    "ablation_table",
    "attention_hit_rate",
    "attention_log_probability",
    "attention_overlap",
    "check_run_settings",
    "contact_sheet",
    "evaluate_cases",
    "evaluate_denoising",
    "evaluate_generation",
    "evaluate_synthetic",
    "fidelity_baselines",
    "find_case_images",
    "generate_case_images",
    "held_out_world",
    "image_seed",
    "list_cases",
    "locate_subject",
    "masked_mse",
    "masked_ncc",
    "mean_similarity",
    "palette_affinity",
    "plot_attention_maps",
    "plot_metric_against_k",
    "reference_attention_maps",
    "score_case",
    "similarity_matrix",
    "sliding_crops",
    "subject_attention_mass",
    "subject_fidelity",
    "subject_similarity",
    "summarise_records",
    "summarize",
    "summary_markdown",
    "target_token_masks",
    "tiny_clip_scorer",
    "tiny_dino_scorer",
]
