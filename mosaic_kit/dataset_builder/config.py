"""The data-building configuration: one dataclass per stage, read from a YAML/dict config.

Model entries take a hub id, a local folder, or ``"tiny"`` (a tiny random model built in code:
for tests and CPU smoke runs; its outputs mean nothing). Paths starting with ``@dreambench/``
resolve inside the DreamBench copy (`mosaic_kit.data.dreambench_root`: ``$MOSAIC_DREAMBENCH``, else
the folder ``python recipes/fetch_dreambench.py`` fills).
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..correspondence import DISJOINT_POLICIES
from ..correspondence.matching import MATCH_FILTERS
from ..data import dreambench_root
from ..utils.checks import check_int
from .filtering import FilterThresholds
from .prompts import PromptTemplates
from .records import STAGES

__all__ = [
    "IMAGE_SOURCES", "PROMPT_SOURCES", "QUALITY_SCORES", "REFERENCE_SOURCES", "SUBJECT_SOURCES",
    "CorrespondenceStageConfig", "DatasetBuildConfig", "FilterStageConfig", "ImageStageConfig", "PromptStageConfig",
    "RESUME_NEUTRAL_KEYS", "ReferenceStageConfig", "SubjectStageConfig", "dataset_config_from_dict", "dreambench_root",
    "resolve_path", "stage_settings",
]

PROMPT_SOURCES = ("templates", "file")
"""The values of ``prompts.source``."""
IMAGE_SOURCES = ("diffusers", "folder", "photo_composites")
"""The values of ``images.source``."""
SUBJECT_SOURCES = ("models", "files")
"""The values of ``subjects.source``."""
QUALITY_SCORES = ("sharpness", "clip_iqa")
"""The values of ``filter.quality``."""
REFERENCE_SOURCES = ("editor", "cutout", "files", "other_views")
"""The values of ``references.source``."""


RESUME_NEUTRAL_KEYS = ("output_dir", "sheets", "prompts.count", "images.batch_size")
"""The config keys that change no finished record, so a new value never blocks a resume: the
output folder itself; the contact sheets (redrawn by every `DatasetBuilder.finish`); the number of
prompts (prompt ``i`` is the same whatever the count: a larger count adds items, a smaller one
leaves the last ones out of the manifest); the image batch size (each image has its own seed).
Every other key counts (see `stage_settings`). Progress bars, threads and the shard are not
config keys: they never count."""


def _allowed(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"Expected `{name}` to be one of {list(allowed)}, but got {value!r}.")


def _counts(section: str, config: Any, minimums: dict[str, int | None]) -> None:
    """Each named field an integer (not a bool, not a float) >= its minimum, the error naming
    ``<section>.<field>``."""
    for name, minimum in minimums.items():
        check_int(f"{section}.{name}" if section else name, getattr(config, name), minimum=minimum)


def resolve_path(value: str | None) -> Path | None:
    """A config path: ``@dreambench/...`` inside `dreambench_root`, else as given (None stays None).

    Examples:
        >>> resolve_path("data/prompts.json")
        PosixPath('data/prompts.json')
    """
    if value is None:
        return None
    if value == "@dreambench" or value.startswith("@dreambench/"):
        return dreambench_root() / value[len("@dreambench/"):] if "/" in value else dreambench_root()
    return Path(value)


@dataclass
class PromptStageConfig:
    """Stage 1. ``source``: templates (``templates``: the arguments of `PromptTemplates`) or file
    (``file``, and ``names``: a placeholder → name mapping or a DreamBench-style ``prompts.json``);
    ``count`` prompts (an int >= 1; a file's first ``count``); ``rewriter``: optional
    ``{model, max_new_tokens, temperature}``. The templates are checked here (`PromptTemplates`).

    Examples:
        >>> PromptStageConfig(source="file", file="prompts.json", count=20).count
        20
    """

    source: str = "templates"
    count: int = 100
    file: str | None = None
    names: dict[str, str] | str | None = None
    templates: dict[str, Any] = field(default_factory=dict)
    rewriter: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        _allowed("prompts.source", self.source, PROMPT_SOURCES)
        if self.source == "file" and not self.file:
            raise ValueError("Expected `prompts.file` for prompts.source = 'file', but got none.")
        if self.source == "templates" and not self.templates.get("categories"):
            raise ValueError("Expected `prompts.templates.categories` for prompts.source = 'templates', but got none.")
        _counts("prompts", self, {"count": 1})
        if self.source == "templates":
            try:
                PromptTemplates(**self.templates)
            except (TypeError, ValueError) as error:
                raise ValueError(f"Expected `prompts.templates` to hold valid arguments of PromptTemplates, but: {error}") from None


@dataclass
class ImageStageConfig:
    """Stage 2. ``source``: diffusers (``model`` and the generation settings), folder
    (``folder``) or photo_composites (``root``, ``canvas_size``, ``scale_range``).

    Examples:
        >>> ImageStageConfig(source="folder", folder="images").folder
        'images'
    """

    source: str = "diffusers"
    model: str | None = None
    height: int = 512
    width: int = 512
    steps: int = 28
    guidance_scale: float = 3.5
    batch_size: int = 1
    dtype: str = "bfloat16"
    extra: dict[str, Any] = field(default_factory=dict)
    folder: str | None = None
    root: str | None = None
    canvas_size: int = 256
    scale_range: list[float] = field(default_factory=lambda: [0.3, 0.6])

    def __post_init__(self) -> None:
        _allowed("images.source", self.source, IMAGE_SOURCES)
        need = {"diffusers": "model", "folder": "folder", "photo_composites": "root"}[self.source]
        if not getattr(self, need):
            raise ValueError(f"Expected `images.{need}` for images.source = {self.source!r}, but got none.")
        _counts("images", self, {"height": 1, "width": 1, "steps": 1, "batch_size": 1, "canvas_size": 16})
        if self.canvas_size % 16:
            raise ValueError(f"Expected `images.canvas_size` to be a multiple of 16, but got {self.canvas_size}.")


@dataclass
class SubjectStageConfig:
    """Stage 4. ``source``: models (``detector``, ``segmenter``) or files (``folder``; null: the
    box files the images stage wrote; with ``segmenter`` set, boxes without masks are segmented).

    Examples:
        >>> SubjectStageConfig(source="files", segmenter=None).detector
        'IDEA-Research/grounding-dino-base'
    """

    source: str = "models"
    detector: str | None = "IDEA-Research/grounding-dino-base"
    segmenter: str | None = "facebook/sam-vit-huge"
    box_threshold: float = 0.35
    text_threshold: float = 0.25
    folder: str | None = None

    def __post_init__(self) -> None:
        _allowed("subjects.source", self.source, SUBJECT_SOURCES)
        if self.source == "models" and not self.detector:
            raise ValueError("Expected `subjects.detector` for subjects.source = 'models', but got none.")


@dataclass
class FilterStageConfig(FilterThresholds):
    """Stage "filter": the thresholds of `FilterThresholds` (its fields; null turns one off), plus
    ``clip`` (a CLIP model) and ``quality`` (`QUALITY_SCORES`).

    Examples:
        >>> FilterStageConfig(quality="sharpness", min_quality=20.0).min_quality
        20.0
        >>> FilterStageConfig(max_box_iou=0.5).thresholds
        FilterThresholds(min_clip=None, min_quality=None, exactly_once=True, min_mask_score=None, min_subject_area=None, max_subject_area=None, max_box_iou=0.5)
    """

    clip: str | None = None
    quality: str | None = "sharpness"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.quality is not None:
            _allowed("filter.quality", self.quality, QUALITY_SCORES)
        if self.min_clip is not None and not self.clip:
            raise ValueError("Expected `filter.clip` (a CLIP model) for filter.min_clip, but got none.")
        if self.quality == "clip_iqa" and not self.clip:
            raise ValueError("Expected `filter.clip` (a CLIP model) for filter.quality = 'clip_iqa', but got none.")
        if self.min_quality is not None and self.quality is None:
            raise ValueError("Expected `filter.quality` for filter.min_quality, but got none.")

    @property
    def thresholds(self) -> FilterThresholds:
        """The thresholds alone, as the filter takes them (`decide`)."""
        return FilterThresholds(**{f.name: getattr(self, f.name) for f in dataclasses.fields(FilterThresholds)})


@dataclass
class ReferenceStageConfig:
    """Stage 5. ``source``: editor (``editor`` model, ``prompt``), cutout, files (``files``: JSON
    ``{id: [path per subject]}``) or other_views (the images stage's other photos of each subject).

    Examples:
        >>> ReferenceStageConfig(source="editor", editor="black-forest-labs/FLUX.1-Kontext-dev").size
        512
    """

    source: str = "cutout"
    editor: str | None = None
    prompt: str | None = None
    size: int = 512
    steps: int = 28
    guidance_scale: float = 2.5
    dtype: str = "bfloat16"
    extra: dict[str, Any] = field(default_factory=dict)
    margin: float = 0.1
    background: float = 1.0
    files: str | None = None

    def __post_init__(self) -> None:
        _allowed("references.source", self.source, REFERENCE_SOURCES)
        if self.source == "editor" and not self.editor:
            raise ValueError("Expected `references.editor` for references.source = 'editor', but got none.")
        if self.source == "files" and not self.files:
            raise ValueError("Expected `references.files` for references.source = 'files', but got none.")
        _counts("references", self, {"size": 16 if self.source == "editor" else 1, "steps": 1})


@dataclass
class CorrespondenceStageConfig:
    """Stage 6: extractors (`mosaic_kit.features.parse_extractor_spec` strings), sizes of the
    manifest's images, the filter, eq. 2 policy, and the fewest pairs a reference must keep.

    Examples:
        >>> CorrespondenceStageConfig(extractors=["sift"], target_size=128, ref_size=64).disjoint
        'confidence'
    """

    extractors: list[str] = field(default_factory=lambda: ["sift"])
    grid: int = 64
    target_size: int = 512
    ref_size: int = 512
    filter: str = "mutual"
    cycle_radius: float = 1.0
    consensus_radius: float = 0.0
    disjoint: str = "confidence"
    max_points: int = 0
    min_pairs: int = 1

    def __post_init__(self) -> None:
        _allowed("correspondences.filter", self.filter, MATCH_FILTERS)
        _allowed("correspondences.disjoint", self.disjoint, DISJOINT_POLICIES)
        for name in ("target_size", "ref_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 16 or value % 16:
                raise ValueError(f"Expected `correspondences.{name}` to be a positive multiple of 16, but got {value!r}.")
        _counts("correspondences", self, {"grid": 1, "max_points": 0, "min_pairs": 0})


@dataclass
class DatasetBuildConfig:
    """The whole pipeline: output folder, seed, device, one section per stage, and how many
    samples each contact sheet shows (build one with `dataset_config_from_dict`).

    Examples:
        >>> config = DatasetBuildConfig(prompts=PromptStageConfig(source="file", file="prompts.json"),
        ...                             images=ImageStageConfig(source="folder", folder="images"))
        >>> config.references.source, config.correspondences.extractors
        ('cutout', ['sift'])
    """

    output_dir: str = "runs/dataset"
    seed: int = 0
    device: str = "cpu"
    prompts: PromptStageConfig = field(default_factory=PromptStageConfig)
    images: ImageStageConfig = field(default_factory=ImageStageConfig)
    subjects: SubjectStageConfig = field(default_factory=SubjectStageConfig)
    filter: FilterStageConfig = field(default_factory=FilterStageConfig)
    references: ReferenceStageConfig = field(default_factory=ReferenceStageConfig)
    correspondences: CorrespondenceStageConfig = field(default_factory=CorrespondenceStageConfig)
    sheets: int = 4

    def __post_init__(self) -> None:
        _counts("", self, {"seed": None, "sheets": 0})


def _canonical(value: Any) -> Any:
    """The JSON form of a setting, whole floats as ints (``20.0`` and ``20`` are the same setting)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    return value


def _flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def stage_settings(config: DatasetBuildConfig, stage: str) -> dict[str, Any]:
    """The settings the records of ``stage`` depend on, as dotted keys → values.

    They are ``seed``, ``device``, the stage's own section and the sections of the stages before
    it (a stage reads their records), without `RESUME_NEUTRAL_KEYS`; nested mappings are spelled
    out (``prompts.templates.min_subjects``), values in their JSON form with whole floats as ints.
    The filter's thresholds (the fields of
    `FilterThresholds`) count for the filter stage alone: they decide which items go on, but do
    not change the later records of an item that does.

    Args:
        config: the configuration.
        stage: one of `STAGES`.

    Returns:
        A JSON-serialisable dict, sorted by key.

    Raises:
        ValueError: for an unknown stage.

    Examples:
        >>> config = DatasetBuildConfig(prompts=PromptStageConfig(source="file", file="p.json"),
        ...                             images=ImageStageConfig(source="folder", folder="images"))
        >>> settings = stage_settings(config, "references")
        >>> settings["images.folder"], "filter.quality" in settings, "filter.min_quality" in settings
        ('images', True, False)
        >>> "correspondences.grid" in settings, "prompts.count" in settings, "filter.min_quality" in stage_settings(config, "filter")
        (False, False, True)
    """
    _allowed("stage", stage, STAGES)
    upstream = STAGES[: STAGES.index(stage) + 1]
    thresholds = {f"filter.{f.name}" for f in dataclasses.fields(FilterThresholds)}
    settings = {}
    for key, value in _flatten(dataclasses.asdict(config)).items():
        section = key.split(".", 1)[0]
        if key in RESUME_NEUTRAL_KEYS or (section in STAGES and section not in upstream):
            continue
        if key in thresholds and stage != "filter":
            continue
        settings[key] = _canonical(value)
    return dict(sorted(settings.items()))


_SECTIONS = {"prompts": PromptStageConfig, "images": ImageStageConfig, "subjects": SubjectStageConfig,
             "filter": FilterStageConfig, "references": ReferenceStageConfig,
             "correspondences": CorrespondenceStageConfig}


def dataset_config_from_dict(values: dict[str, Any]) -> DatasetBuildConfig:
    """A `DatasetBuildConfig` from nested dicts (a parsed YAML file); unknown keys are errors.

    Examples:
        >>> config = dataset_config_from_dict({"prompts": {"source": "file", "file": "p.json"},
        ...     "images": {"source": "folder", "folder": "imgs"}, "subjects": {"source": "files"}})
        >>> config.images.source, config.references.source
        ('folder', 'cutout')
        >>> dataset_config_from_dict({"prompt": {}})
        Traceback (most recent call last):
        ...
        ValueError: Expected only the keys [...], but got unknown ['prompt'].
    """
    if not isinstance(values, dict):
        raise ValueError(f"Expected the config to be a mapping, but got {type(values).__name__}.")
    if "out" in values:  # the old spelling of `output_dir`, kept for one release
        warnings.warn("The dataset config key `out` is deprecated and will be removed after mosaic_kit 0.1; "
                      "use `output_dir`.", FutureWarning, stacklevel=2)
        if "output_dir" in values and values["output_dir"] != values["out"]:
            raise ValueError(f"Expected `output_dir` or its old spelling `out`, but got both: "
                             f"output_dir={values['output_dir']!r}, out={values['out']!r}.")
        values = {("output_dir" if key == "out" else key): value for key, value in values.items()}
    top = {f.name for f in dataclasses.fields(DatasetBuildConfig)}
    unknown = sorted(set(values) - top)
    if unknown:
        raise ValueError(f"Expected only the keys {sorted(top)}, but got unknown {unknown}.")
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key in _SECTIONS:
            cls = _SECTIONS[key]
            names = {f.name for f in dataclasses.fields(cls)}
            bad = sorted(set(value or {}) - names)
            if bad:
                raise ValueError(f"Expected only the keys {sorted(names)} in `{key}`, but got unknown {bad}.")
            kwargs[key] = cls(**(value or {}))
        else:
            kwargs[key] = value
    return DatasetBuildConfig(**kwargs)
