"""Building SemAlign-MS-style multi-subject training data (paper §3), stage by stage.

One small interface per stage, each with model-backed implementations (a hub id or a local folder;
tiny random models built in code for tests) and from-files ones, and per-item JSON records with
the provenance of every stage:

1. prompts (`mosaic_kit.dataset_builder.prompts`): `PromptTemplates`, `prompts_from_file`,
   `InstructionRewriter` (a local instruction model; a rewrite that loses a subject is refused);
2. images (`...images`): `DiffusersImageGenerator` (any diffusers text-to-image pipeline),
   `ImagesFromFolder`, `PhotoComposites` (real photos composed into multi-subject images);
3. subjects (`...subjects`): `GroundingDinoSam` (Grounding DINO + SAM in transformers),
   `SubjectsFromFiles` (boxes JSON, masks PNG);
4. filter (`...filtering`): CLIP agreement, `SharpnessScore` / `ClipQualityScore`, every subject
   exactly once, mask quality, composition (`FilterThresholds`, `decide`);
5. references (`...references`): `DiffusersEditor` (FLUX.1-Kontext, FLUX.2) on `cutout`, the
   cut-out itself, or files;
6. correspondences (`...correspondences`): `subject_pairs` with the project's extractors and
   filters, each subject's masks, eq. 2.

`DatasetBuilder` (`...build`) runs them from a `DatasetBuildConfig` with resume, shards, a
manifest that trains with ``recipes/flux_mosaic_train.py``, a summary and contact sheets;
``recipes/build_dataset.py`` is its command line. See the guide ``docs/guide/dataset.md``.
"""

from .records import (
    STAGES,
    StageStore,
    in_shard,
    item_seed,
    parse_shard,
    read_text_utf8,
    reject_reason_key,
    write_text_atomic,
)
from .prompts import (
    DEFAULT_TEMPLATES,
    InstructionRewriter,
    PromptRecord,
    PromptTemplates,
    prompts_from_file,
    subjects_mentioned,
    tiny_instruction_model,
)
from .images import (
    DiffusersImageGenerator,
    GeneratedImage,
    ImagesFromFolder,
    PhotoComposites,
    tensor_to_pil,
)
from .subjects import (
    DetectedSubjects,
    GroundingDinoSam,
    SubjectsFromFiles,
    box_iou,
    box_mask,
    nms,
    tiny_grounding_dino,
    tiny_sam,
)
from .filtering import (
    ClipQualityScore,
    FilterThresholds,
    REJECT_REASONS,
    SharpnessScore,
    decide,
    subject_scores,
)
from .references import (
    DiffusersEditor,
    cutout,
)
from .correspondences import (
    SubjectPairs,
    subject_pairs,
)
from .config import (
    IMAGE_SOURCES,
    PROMPT_SOURCES,
    QUALITY_SCORES,
    REFERENCE_SOURCES,
    RESUME_NEUTRAL_KEYS,
    SUBJECT_SOURCES,
    CorrespondenceStageConfig,
    DatasetBuildConfig,
    FilterStageConfig,
    ImageStageConfig,
    PromptStageConfig,
    ReferenceStageConfig,
    SubjectStageConfig,
    dataset_config_from_dict,
    dreambench_root,
    resolve_path,
    stage_settings,
)
from .build import DatasetBuilder
from .sheets import overlay_masks, panel_sheet

__all__ = [
    "SUBJECT_SOURCES",
    "REFERENCE_SOURCES",
    "QUALITY_SCORES",
    "PROMPT_SOURCES",
    "IMAGE_SOURCES",
    "ClipQualityScore",
    "CorrespondenceStageConfig",
    "DEFAULT_TEMPLATES",
    "DatasetBuildConfig",
    "DatasetBuilder",
    "DetectedSubjects",
    "DiffusersEditor",
    "DiffusersImageGenerator",
    "FilterStageConfig",
    "FilterThresholds",
    "GeneratedImage",
    "GroundingDinoSam",
    "ImageStageConfig",
    "ImagesFromFolder",
    "InstructionRewriter",
    "PhotoComposites",
    "PromptRecord",
    "PromptStageConfig",
    "PromptTemplates",
    "REJECT_REASONS",
    "RESUME_NEUTRAL_KEYS",
    "ReferenceStageConfig",
    "STAGES",
    "SharpnessScore",
    "StageStore",
    "SubjectPairs",
    "SubjectStageConfig",
    "SubjectsFromFiles",
    "box_iou",
    "box_mask",
    "panel_sheet",
    "cutout",
    "dataset_config_from_dict",
    "decide",
    "dreambench_root",
    "in_shard",
    "item_seed",
    "nms",
    "overlay_masks",
    "parse_shard",
    "prompts_from_file",
    "read_text_utf8",
    "reject_reason_key",
    "resolve_path",
    "stage_settings",
    "subject_pairs",
    "subject_scores",
    "subjects_mentioned",
    "tensor_to_pil",
    "tiny_grounding_dino",
    "tiny_instruction_model",
    "tiny_sam",
    "write_text_atomic",
]
