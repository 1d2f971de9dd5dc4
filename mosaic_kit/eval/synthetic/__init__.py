"""Scores for the synthetic multi-subject world: attention, interference, denoising and samples.

The synthetic world (`mosaic_kit.data.SyntheticWorld`) knows everything about a sample: the exact
reference → target token pairs, each subject's visible mask in the target and each subject's two
palette colours. That makes four families of scores possible, all defined on held-out subjects:

- **attention alignment** (per annotated point, from `mosaic_kit.attention.PointAttentionRows`):
  the hit-rate (`mosaic_kit.eval.attention_hit_rate`) and the mean log-probability at the true
  target token, `attention_log_probability`;
- **interference** between references: `reference_attention_maps` (each reference's mean row,
  the quantity MDL works on), `attention_overlap` (Bhattacharyya coefficient or histogram
  intersection between references' maps) and `subject_attention_mass` (how much of a
  reference's map falls on its own subject, and how much on the others);
- **denoising fidelity** (teacher-forced: the true target noised to a level σ, one model call):
  `masked_mse` of the one-step estimate ``x̂0 = x_σ - σ·v̂`` inside each subject's visible
  region, and the *reference gain*: the share of that error which disappears when the model gets
  the sample's own references rather than another sample's (how much it uses the references);
- **sample fidelity** (free generation through the model family from held-out references):
  `subject_fidelity` finds each reference's best-matching window (`locate_subject`, masked
  normalised cross-correlation `masked_ncc` over positions and scales), measures its own palette
  there (`palette_affinity`) and the other subjects' palettes (attribute leakage); a subject is
  *present* when that colour score passes `presence_threshold`, halfway between the ground truth
  and chance (`subject_presence`).

`evaluate_synthetic` runs all of them for K = 1…6 on a trained pipeline, `summarise_records`
and `ablation_table` aggregate runs (the recipe ``recipes/synthetic_ablation.py``), and
`plot_metric_against_k` / `plot_attention_maps` draw the figures (matplotlib, imported lazily).

The package is split by job: `.scores` (the metrics, no model), `.runner` (the model, through
the model boundary `mosaic_kit.models.ModelFamily`) and `.report` (tables and figures). Every
name is importable from here and from `mosaic_kit.eval`.
"""

from .report import (
    INTERVALS,
    mean_interval,
    ablation_table,
    plot_attention_maps,
    plot_metric_against_k,
    summarise_records,
)
from .runner import (
    baseline_presence_threshold,
    generate_with_family,
    SyntheticEvalConfig,
    SyntheticEvalResult,
    evaluate_denoising,
    evaluate_generation,
    evaluate_synthetic,
    fidelity_baselines,
    held_out_world,
)
from .scores import (
    presence_threshold,
    subject_presence,
    DEFAULT_TEMPLATE_SCALES,
    METRICS,
    OVERLAP_MEASURES,
    ReferenceAttentionMaps,
    SubjectAttentionMass,
    SubjectFidelity,
    SubjectMatch,
    attention_log_probability,
    attention_overlap,
    locate_subject,
    masked_mse,
    masked_ncc,
    palette_affinity,
    reference_attention_maps,
    subject_attention_mass,
    subject_fidelity,
    target_token_masks,
)

__all__ = [
    "INTERVALS",
    "mean_interval",
    "baseline_presence_threshold",
    "generate_with_family",
    "presence_threshold",
    "subject_presence",
    "DEFAULT_TEMPLATE_SCALES",
    "METRICS",
    "OVERLAP_MEASURES",
    "ReferenceAttentionMaps",
    "SubjectAttentionMass",
    "SubjectFidelity",
    "SubjectMatch",
    "SyntheticEvalConfig",
    "SyntheticEvalResult",
    "ablation_table",
    "attention_log_probability",
    "attention_overlap",
    "evaluate_denoising",
    "evaluate_generation",
    "evaluate_synthetic",
    "fidelity_baselines",
    "held_out_world",
    "locate_subject",
    "masked_mse",
    "masked_ncc",
    "palette_affinity",
    "plot_attention_maps",
    "plot_metric_against_k",
    "reference_attention_maps",
    "subject_attention_mass",
    "subject_fidelity",
    "summarise_records",
    "target_token_masks",
]
