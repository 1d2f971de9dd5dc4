"""The DreamBench protocol, single- and multi-subject: cases, generation, scoring, reports.

The benchmark folder (`DreamBench.load`) holds one folder of photos per subject, `prompts.json`
(subjects with class noun and kind, 25 prompt templates per kind) and `pairs_multi.json`
(multi-subject cases). A case is one prompt with its subjects and a number of images:

- single-subject: subject × prompt, id `single/<subject>/<prompt index:02d>`;
- multi-subject: one entry of `pairs_multi.json`, id `multi/<pair index:02d>`.

Generated images live at `<images root>/<case id>/<image index:02d>.png` (scoring-only mode also
reads `.jpg`, `.jpeg` and `.webp`, in file-name order). Scores, all ×100:

- single: CLIP-I and DINO of each image against all photos of the subject (mean over photos),
  CLIP-T against the prompt; case score = mean over its images;
- multi: per subject, CLIP-I and DINO on the whole image and on the best sliding crop for that
  subject (`subject_similarity`), averaged over subjects; the crop score is the headline one;
  CLIP-T on the whole image against the whole prompt.

`evaluate_cases` runs the loop (resumable: a case whose JSON exists is not redone) and writes
the per-case JSON, `results.csv`, `results.json`, `summary.json`, `summary.md` (laid out like
the paper's Table 1) and contact sheets. See `docs/evaluation.md` and `recipes/evaluate.py`.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from ..data import open_image, to_rgb
from ..utils.atomic import save_image_atomic, write_text_atomic
from .crops import (
    DEFAULT_CROP_SIZES,
    DEFAULT_CROP_STRIDE,
    sliding_crops,
    subject_similarity,
)
from .metrics import CLIPScorer, DINOScorer, mean_similarity
from .sheets import SheetRow, contact_sheet

__all__ = [
    "DREAMBENCH_ENV",
    "IMAGE_SUFFIXES",
    "SETTINGS",
    "DreamBench",
    "DreamBenchSubject",
    "EvalCase",
    "GenerationSettings",
    "check_run_settings",
    "evaluate_cases",
    "find_case_images",
    "generate_case_images",
    "image_seed",
    "list_cases",
    "score_case",
    "summarize",
    "summary_markdown",
]

DREAMBENCH_ENV = "MOSAIC_DREAMBENCH"
"""Environment variable the recipe reads for the DreamBench folder."""

SETTINGS = ("single", "multi")
"""The two DreamBench settings: single-subject and multi-subject cases."""

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
"""File suffixes read as images (photos and, in scoring-only mode, generated images)."""

_METRICS = ("clip_i", "clip_t", "dino", "clip_i_whole", "dino_whole")
_CSV_COLUMNS = ("case_id", "setting", "subjects", "index", "prompt", "num_images") + _METRICS


# -- the benchmark ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class DreamBenchSubject:
    """One DreamBench subject.

    Args:
        name: folder name, e.g. `"dog"`.
        class_name: class noun, e.g. `"dog"` or `"stuffed animal"`.
        kind: `"live"` or `"object"` (selects the prompt list).
        image_paths: its photos, sorted by file name.

    Example:
        >>> DreamBenchSubject("dog", "dog", "live", ()).class_name
        'dog'
    """

    name: str
    class_name: str
    kind: str
    image_paths: tuple[Path, ...]


@dataclass(frozen=True)
class DreamBench:
    """The DreamBench folder: subjects, prompt templates and multi-subject cases.

    Args:
        root: the folder.
        subjects: subjects by name, in `prompts.json` order.
        prompts: prompt templates per kind (`"object"`, `"live"`), with `{0}` for the identifier
            token and `{1}` for the class noun.
        pairs: multi-subject cases, each `{"subjects": [names], "prompt": "a {dog} and a {can}"}`.

    Example:
        >>> bench = DreamBench(Path("."), {}, {"object": ("a {0} {1}",), "live": ()}, ())
        >>> template = bench.prompts.get("object")[0]
        >>> " ".join(template.format("", "can").split())
        'a can'
    """

    root: Path
    subjects: dict[str, DreamBenchSubject]
    prompts: dict[str, tuple[str, ...]]
    pairs: tuple[dict, ...]

    @classmethod
    def load(cls, root: str | Path) -> DreamBench:
        """Reads `prompts.json`, `pairs_multi.json` and the subject folders of `root`.

        Args:
            root: the DreamBench folder (see `/work/shared/data/dreambench/README.md` for the
                layout written for this toolkit).

        Returns:
            A `DreamBench`.

        Raises:
            ValueError: if a file is missing or malformed, a subject has no photos, or a pair
                names an unknown subject or a prompt without its `{name}` placeholders.

        Example:
            >>> bench = DreamBench.load(os.environ.get("MOSAIC_DREAMBENCH", "../shared/data/dreambench"))  # doctest: +SKIP
            >>> len(bench.subjects), len(bench.pairs)  # doctest: +SKIP
            (30, 20)
        """
        root = Path(root)
        if not root.is_dir():
            raise ValueError(f"Expected `root` to be the DreamBench folder, but {str(root)!r} is not a folder.")
        meta = _read_json(root / "prompts.json")
        if not isinstance(meta, dict) or not isinstance(meta.get("subjects"), list) or not isinstance(meta.get("prompts"), dict):
            raise ValueError(f"Expected {root / 'prompts.json'} with 'subjects' (list) and 'prompts' (dict).")
        prompts = {}
        for kind in ("object", "live"):
            templates = meta["prompts"].get(kind)
            if not isinstance(templates, list) or not templates or not all(isinstance(t, str) for t in templates):
                raise ValueError(f"Expected 'prompts.{kind}' in {root / 'prompts.json'} to be a non-empty list of strings.")
            prompts[kind] = tuple(templates)
        subjects = {}
        for entry in meta["subjects"]:
            if not isinstance(entry, dict) or not {"name", "class", "kind"} <= set(entry) or entry["kind"] not in prompts:
                raise ValueError(f"Expected a subject {{'name', 'class', 'kind': 'object'|'live'}}, but got {entry!r}.")
            folder = root / entry["name"]
            paths = tuple(sorted(p for p in folder.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES)) if folder.is_dir() else ()
            if not paths:
                raise ValueError(f"Expected photos of subject {entry['name']!r} in {folder}, but found none.")
            subjects[entry["name"]] = DreamBenchSubject(entry["name"], entry["class"], entry["kind"], paths)
        pairs = _read_json(root / "pairs_multi.json")
        if not isinstance(pairs, list):
            raise ValueError(f"Expected {root / 'pairs_multi.json'} to hold a list of cases.")
        for index, pair in enumerate(pairs):
            names = pair.get("subjects") if isinstance(pair, dict) else None
            if not isinstance(names, list) or not names or not isinstance(pair.get("prompt"), str):
                raise ValueError(f"Expected pairs_multi.json[{index}] = {{'subjects': [...], 'prompt': str}}, but got {pair!r}.")
            unknown = [name for name in names if name not in subjects]
            absent = [name for name in names if "{" + name + "}" not in pair["prompt"]]
            if unknown or absent:
                raise ValueError(
                    f"Expected pairs_multi.json[{index}] to name known subjects, each as {{name}} in its prompt, "
                    f"but got unknown {unknown} and missing placeholders {absent}."
                )
        return cls(root, subjects, prompts, tuple(pairs))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"Expected the file {path}, but it does not exist.") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"Expected JSON in {path}, but got: {error}.") from None


# -- cases -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EvalCase:
    """One benchmark case: a prompt, its subjects and how many images to score.

    Args:
        setting: `"single"` or `"multi"`.
        case_id: `single/<subject>/<index:02d>` or `multi/<index:02d>`; also its folder.
        subjects: subject names, in the prompt's order.
        prompt: the text given to the generator and to CLIP-T.
        index: prompt index in the kind's list (single) or index in `pairs_multi.json` (multi).
        num_images: images generated / scored for the case.

    Example:
        >>> case = EvalCase("single", "single/dog/03", ("dog",), "a dog on the beach", 3, 2)
        >>> list(map(Path.as_posix, case.image_paths("out/images")))
        ['out/images/single/dog/03/00.png', 'out/images/single/dog/03/01.png']
    """

    setting: str
    case_id: str
    subjects: tuple[str, ...]
    prompt: str
    index: int
    num_images: int

    def image_paths(self, images_root: str | Path) -> list[Path]:
        """Where generation writes this case's images: `<images_root>/<case_id>/<i:02d>.png`."""
        return [Path(images_root) / self.case_id / f"{i:02d}.png" for i in range(self.num_images)]


def _check_optional_count(name: str, value: object, available: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= available:
        raise ValueError(f"Expected `{name}` to be None or an int in [1, {available}], but got {value!r}.")
    return value


def _subset(items: Sequence, count: int | None, rng: random.Random) -> list:
    """`count` items drawn without replacement, kept in their original order (all when None)."""
    if count is None:
        return list(items)
    chosen = set(rng.sample(range(len(items)), count))
    return [item for i, item in enumerate(items) if i in chosen]


def _clean(text: str) -> str:
    return " ".join(text.split())


def list_cases(
    bench: DreamBench,
    *,
    settings: Sequence[str] = SETTINGS,
    max_subjects: int | None = None,
    max_prompts: int | None = None,
    max_multi: int | None = None,
    images_per_prompt: int = 4,
    seed: int = 0,
    identifier: str = "",
) -> list[EvalCase]:
    """The benchmark's cases, optionally subsampled (deterministically from `seed`).

    Single-subject prompts are the templates of the subject's kind with `{0}` = `identifier`
    and `{1}` = class noun ("a dog in the jungle" with the default empty identifier, "a sks dog
    in the jungle" with `"sks"`). Multi-subject prompts get each `{name}` replaced by
    `identifier` + class noun. Subsamples keep the benchmark's order; `max_subjects` and
    `max_prompts` apply to single-subject cases (the same prompt indices for every subject of a
    kind), `max_multi` to multi-subject cases.

    Args:
        bench: the benchmark.
        settings: which of `"single"`, `"multi"` to list; defaults to both.
        max_subjects: number of subjects drawn for single-subject cases; None for all 30.
        max_prompts: number of prompts drawn per kind; None for all 25.
        max_multi: number of multi-subject cases drawn; None for all.
        images_per_prompt: images per case (DreamBench: 4); defaults to 4.
        seed: seed of the draws; defaults to 0.
        identifier: the `{0}` token (e.g. `"sks"` for DreamBooth-style models); defaults to "".

    Returns:
        The cases, single-subject first (by subject, then prompt), then multi-subject.

    Raises:
        ValueError: on an unknown setting, or a count outside [1, available].

    Example:
        >>> bench = DreamBench(Path("."), {"dog": DreamBenchSubject("dog", "dog", "live", ())},
        ...                    {"object": ("a {0} {1}",), "live": ("a {0} {1} swimming",)},
        ...                    ({"subjects": ["dog"], "prompt": "a {dog} in a box"},))
        >>> for case in list_cases(bench, images_per_prompt=1):
        ...     print(case.case_id, "|", case.prompt)
        single/dog/00 | a dog swimming
        multi/00 | a dog in a box
    """
    if isinstance(settings, str) or not isinstance(settings, Sequence) or not settings or any(s not in SETTINGS for s in settings):
        raise ValueError(f"Expected `settings` to be a non-empty list drawn from {list(SETTINGS)}, but got {settings!r}.")
    if isinstance(images_per_prompt, bool) or not isinstance(images_per_prompt, int) or images_per_prompt < 1:
        raise ValueError(f"Expected `images_per_prompt` to be an int >= 1, but got {images_per_prompt!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"Expected `seed` to be an int, but got {seed!r}.")
    if not isinstance(identifier, str):
        raise ValueError(f"Expected `identifier` to be a string, but got {identifier!r}.")
    max_subjects = _check_optional_count("max_subjects", max_subjects, len(bench.subjects))
    max_prompts = _check_optional_count("max_prompts", max_prompts, min(len(t) for t in bench.prompts.values()))
    max_multi = _check_optional_count("max_multi", max_multi, max(1, len(bench.pairs)))
    cases = []
    if "single" in settings:
        names = _subset(list(bench.subjects), max_subjects, random.Random(f"{seed}:subjects"))
        chosen = {
            kind: _subset(range(len(templates)), max_prompts, random.Random(f"{seed}:prompts:{kind}"))
            for kind, templates in bench.prompts.items()
        }
        for name in names:
            subject = bench.subjects[name]
            for index in chosen[subject.kind]:
                prompt = _clean(bench.prompts[subject.kind][index].format(identifier, subject.class_name))
                cases.append(EvalCase("single", f"single/{name}/{index:02d}", (name,), prompt, index, images_per_prompt))
    if "multi" in settings:
        for index in _subset(range(len(bench.pairs)), max_multi, random.Random(f"{seed}:multi")):
            pair = bench.pairs[index]
            nouns = {name: _clean(f"{identifier} {bench.subjects[name].class_name}") for name in pair["subjects"]}
            prompt = _clean(pair["prompt"].format_map(nouns))
            cases.append(EvalCase("multi", f"multi/{index:02d}", tuple(pair["subjects"]), prompt, index, images_per_prompt))
    return cases


def find_case_images(images_root: str | Path, case: EvalCase) -> list[Path]:
    """A case's images in a folder laid out by case: `<images_root>/<case_id>/*`, files with a
    suffix in `IMAGE_SUFFIXES`, sorted by name, at most `case.num_images` of them.

    Args:
        images_root: the folder holding `single/...` and `multi/...`.
        case: the case.

    Returns:
        The paths (empty when the case folder is missing or holds no image).

    Example:
        >>> case = EvalCase("multi", "multi/00", ("dog", "can"), "a dog and a can", 0, 4)
        >>> find_case_images("/nonexistent", case)
        []
    """
    folder = Path(images_root) / case.case_id
    if not folder.is_dir():
        return []
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    return files[: case.num_images]


# -- generation ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GenerationSettings:
    """How `generate_case_images` calls the pipeline.

    Args:
        height: output height in pixels; defaults to 512 (the released checkpoint's size).
        width: output width in pixels; defaults to 512.
        num_inference_steps: denoising steps; defaults to 28 (released inference).
        guidance_scale: FLUX guidance; defaults to 3.5 (released inference).
        seed: base seed; image i of a case uses `image_seed(seed, case_id, i)`; defaults to 0.
        reference_index: which photo of each subject is the reference given to the pipeline
            (sorted by file name); defaults to 0 (`00.jpg`). Scoring always uses all photos.
        reference_size: passed as `ref_size` (the pipeline's reference square side, which does
            its own reference preprocessing); None to not pass it; defaults to 512.
        pipeline_kwargs: further keyword arguments for every pipeline call (e.g.
            `{"max_sequence_length": 64, "progress": False}` for `MosaicFluxPipeline`).

    Example:
        >>> GenerationSettings(height=32, width=32, num_inference_steps=2).guidance_scale
        3.5
    """

    height: int = 512
    width: int = 512
    num_inference_steps: int = 28
    guidance_scale: float = 3.5
    seed: int = 0
    reference_index: int = 0
    reference_size: int | None = 512
    pipeline_kwargs: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, minimum in (("height", 1), ("width", 1), ("num_inference_steps", 1), ("seed", 0),
                              ("reference_index", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"Expected `{name}` to be an int >= {minimum}, but got {value!r}.")
        size = self.reference_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise ValueError(f"Expected `reference_size` to be None or an int >= 1, but got {size!r}.")
        if isinstance(self.guidance_scale, bool) or not isinstance(self.guidance_scale, (int, float)):
            raise ValueError(f"Expected `guidance_scale` to be a number, but got {self.guidance_scale!r}.")
        if not isinstance(self.pipeline_kwargs, dict) or not all(isinstance(k, str) for k in self.pipeline_kwargs):
            raise ValueError(f"Expected `pipeline_kwargs` to be a dict with string keys, but got {self.pipeline_kwargs!r}.")
        reserved = sorted(set(self.pipeline_kwargs) & set(_PIPELINE_ARGUMENTS))
        if reserved:
            raise ValueError(f"Expected `pipeline_kwargs` without the arguments set by the harness, but got {reserved}.")


_PIPELINE_ARGUMENTS = (
    "prompt", "reference_images", "height", "width", "num_inference_steps", "guidance_scale", "generator", "ref_size",
)


def image_seed(seed: int, case_id: str, image_index: int) -> int:
    """The generator seed of image `image_index` of a case: `crc32("{seed}:{case_id}:{index}")`,
    so an image's seed does not depend on which other cases run (subsampling, resuming).

    Example:
        >>> image_seed(0, "single/dog/00", 0) == image_seed(0, "single/dog/00", 0) != image_seed(0, "single/dog/00", 1)
        True
    """
    return zlib.crc32(f"{seed}:{case_id}:{image_index}".encode())


def _open_rgb(path: Path) -> Image.Image:
    """The data package's checked opening: size limit, 16-bit grey and alpha handled, errors name the file."""
    return to_rgb(open_image(path), str(path))


def generate_case_images(
    pipe: Any,
    bench: DreamBench,
    case: EvalCase,
    images_root: str | Path,
    settings: GenerationSettings = GenerationSettings(),
) -> list[Path]:
    """Generates a case's images with a reference-image pipeline, skipping those already written.

    The pipeline is called once per image as
    `pipe(prompt=case.prompt, reference_images=[one photo per subject, PIL, as read],
    height=..., width=..., num_inference_steps=..., guidance_scale=...,
    generator=torch.Generator("cpu").manual_seed(image_seed(...)), ref_size=...,
    **settings.pipeline_kwargs)` (no `ref_size` when `settings.reference_size` is None) and must
    return an object whose `.images[0]` is a PIL image, as `mosaic_kit.pipelines.MosaicFluxPipeline`
    does; the pipeline preprocesses the references itself. Images are written atomically as PNG.

    Args:
        pipe: the pipeline.
        bench: the benchmark (for the reference photos).
        case: the case.
        images_root: where `<case_id>/<i:02d>.png` go.
        settings: sizes, steps, guidance, seed and reference choice.

    Returns:
        The case's image paths (`case.image_paths(images_root)`).

    Raises:
        ValueError: if a subject has no photo at `settings.reference_index`, or the pipeline's
            output has no PIL image.

    Example:
        >>> class Gray:  # any callable with the pipeline's interface
        ...     def __call__(self, *, prompt, reference_images, height, width, ref_size, **kwargs):
        ...         return type("Out", (), {"images": [Image.new("RGB", (width, height), "gray")]})()
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> (root / "bench" / "dog").mkdir(parents=True)
        >>> Image.new("RGB", (8, 8)).save(root / "bench" / "dog" / "00.jpg")
        >>> bench = DreamBench(root / "bench", {"dog": DreamBenchSubject("dog", "dog", "live",
        ...                    (root / "bench" / "dog" / "00.jpg",))}, {"live": ("a {0} {1}",)}, ())
        >>> case = list_cases(bench, settings=["single"], images_per_prompt=2)[0]
        >>> paths = generate_case_images(Gray(), bench, case, root / "images", GenerationSettings(height=16, width=32))
        >>> len(paths), {Image.open(p).size for p in paths}
        (2, {(32, 16)})
    """
    if not isinstance(settings, GenerationSettings):
        raise ValueError(f"Expected `settings` to be a GenerationSettings, but got {type(settings).__name__}.")
    paths = case.image_paths(images_root)
    if all(path.exists() for path in paths):
        return paths
    references = []
    for name in case.subjects:
        photos = bench.subjects[name].image_paths
        if settings.reference_index >= len(photos):
            raise ValueError(
                f"Expected `reference_index` < {len(photos)} (photos of subject {name!r}), but got {settings.reference_index}."
            )
        references.append(_open_rgb(photos[settings.reference_index]))
    extra = dict(settings.pipeline_kwargs)
    if settings.reference_size is not None:
        extra["ref_size"] = settings.reference_size
    for index, path in enumerate(paths):
        if path.exists():
            continue
        generator = torch.Generator("cpu").manual_seed(image_seed(settings.seed, case.case_id, index))
        output = pipe(
            prompt=case.prompt,
            reference_images=references,
            height=settings.height,
            width=settings.width,
            num_inference_steps=settings.num_inference_steps,
            guidance_scale=settings.guidance_scale,
            generator=generator,
            **extra,
        )
        images = getattr(output, "images", None)
        if not images or not isinstance(images[0], Image.Image):
            raise ValueError(f"Expected the pipeline to return `.images` with a PIL image, but got {type(output).__name__}.")
        save_image_atomic(images[0], path)
    return paths


# -- scoring ---------------------------------------------------------------------------------------
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


# -- the run ---------------------------------------------------------------------------------------
def check_run_settings(out_dir: str | Path, settings: dict, *, overwrite: bool = False) -> None:
    """Records `settings` in `<out_dir>/settings.json`; on a resumed run (the file exists) refuses
    different values unless `overwrite`, so that one folder never mixes two kinds of results.

    Args:
        out_dir: the run folder.
        settings: JSON-ready dict of what shapes the per-case results.
        overwrite: replace the stored settings instead of comparing.

    Raises:
        ValueError: if the stored settings differ (naming the keys).

    Example:
        >>> import tempfile
        >>> out = tempfile.mkdtemp()
        >>> check_run_settings(out, {"clip": "a"}); check_run_settings(out, {"clip": "a"})
        >>> check_run_settings(out, {"clip": "b"})
        Traceback (most recent call last):
        ...
        ValueError: Expected the settings stored in ... (clip: 'a'); use another output folder, the same settings, or overwrite.
    """
    path = Path(out_dir) / "settings.json"
    wanted = json.loads(json.dumps(settings))  # tuples → lists, as stored
    if path.exists() and not overwrite:
        stored = json.loads(path.read_text())
        changed = sorted(key for key in set(stored) | set(wanted) if stored.get(key) != wanted.get(key))
        if changed:
            details = ", ".join(f"{key}: {stored.get(key)!r}" for key in changed)
            raise ValueError(
                f"Expected the settings stored in {path} ({details}); use another output folder, the same settings, "
                "or overwrite."
            )
        return
    write_text_atomic(path, json.dumps(wanted, indent=2) + "\n")


def _case_rows(case_results: list[dict]) -> list[dict]:
    rows = []
    for result in case_results:
        row = {column: result[column] for column in _CSV_COLUMNS if column != "subjects"}
        row["subjects"] = "+".join(result["subjects"])
        rows.append(row)
    return rows


def _write_sheets(
    bench: DreamBench, results: list[dict], images_root: Path, sheets_dir: Path, reference_index: int, thumb_size: int
) -> list[Path]:
    written = []

    def caption(result: dict) -> str:
        return (
            f"[{result['case_id']}] {result['prompt']}\n"
            f"CLIP-I: {result['clip_i']:.2f}  |  CLIP-T: {result['clip_t']:.2f}  |  DINO: {result['dino']:.2f}"
        )

    def outputs(result: dict) -> list[Image.Image]:
        return [_open_rgb(images_root / name) for name in result["images"]]

    singles: dict[str, list[dict]] = {}
    for result in results:
        if result["setting"] == "single":
            singles.setdefault(result["subjects"][0], []).append(result)
    for name, rows in singles.items():
        subject = bench.subjects[name]
        sheet_rows = [SheetRow(f"{name} ({subject.class_name}): photos", [_open_rgb(p) for p in subject.image_paths])]
        sheet_rows += [SheetRow(caption(result), [], outputs(result)) for result in rows]
        path = sheets_dir / "single" / f"{name}.png"
        save_image_atomic(contact_sheet(sheet_rows, thumb_size=thumb_size, title=f"DreamBench single-subject: {name}"), path)
        written.append(path)
    multis = [result for result in results if result["setting"] == "multi"]
    if multis:
        sheet_rows = []
        for result in multis:
            photos = []
            for name in result["subjects"]:
                paths = bench.subjects[name].image_paths
                photos.append(_open_rgb(paths[min(reference_index, len(paths) - 1)]))
            sheet_rows.append(SheetRow(caption(result) + "\nsubjects: " + ", ".join(result["subjects"]), photos, outputs(result)))
        path = sheets_dir / "multi.png"
        save_image_atomic(contact_sheet(sheet_rows, thumb_size=thumb_size, title="DreamBench multi-subject"), path)
        written.append(path)
    return written


def evaluate_cases(
    bench: DreamBench,
    cases: Sequence[EvalCase],
    out_dir: str | Path,
    clip: CLIPScorer,
    dino: DINOScorer,
    *,
    images_root: str | Path | None = None,
    pipe: Any = None,
    generation: GenerationSettings = GenerationSettings(),
    crop_sizes: Sequence[float] = DEFAULT_CROP_SIZES,
    crop_stride: float = DEFAULT_CROP_STRIDE,
    overwrite: bool = False,
    allow_missing: bool = False,
    sheets: bool = True,
    thumb_size: int = 128,
    progress: bool = True,
) -> dict:
    """Generates (optionally) and scores cases, and writes every report of a run.

    Two modes: with `pipe`, images are generated into `images_root` (default
    `<out_dir>/images`) with `generate_case_images`; without, `images_root` is an existing folder
    laid out by case (`find_case_images`). A case whose `<out_dir>/cases/<case_id>.json` exists is
    read back instead of redone (unless `overwrite`), so an interrupted run resumes.

    Files written in `out_dir`:

    - `cases/<case_id>.json`: per-case scores (`score_case`) plus `images` (paths relative to
      `images_root`), written atomically when the case is done;
    - `results.csv` (one row per case: ids, prompt, number of images, the five metrics) and
      `results.json` (the per-case dicts);
    - `summary.json` (`summarize`, plus `missing_cases`, crop settings and `images_root`) and
      `summary.md` (`summary_markdown`);
    - with `sheets`: `sheets/single/<subject>.png` (the subject's photos, then each prompt with
      its outputs and scores) and `sheets/multi.png` (per case: the reference photo of each
      subject, the prompt, the outputs and scores).

    Args:
        bench: the benchmark.
        cases: the cases (`list_cases`), at least one.
        out_dir: the run folder.
        clip: a `CLIPScorer`.
        dino: a `DINOScorer`.
        images_root: scoring-only: the folder of generated images; generation: where images go.
        pipe: a reference-image pipeline (see `generate_case_images`), or None to score only.
        generation: the generation settings (used with `pipe`; its `reference_index` also picks
            the photo shown on multi-subject sheets).
        crop_sizes: sliding-crop sides for multi-subject cases.
        crop_stride: sliding-crop step.
        overwrite: redo cases whose JSON exists.
        allow_missing: scoring-only: skip cases without images (listed in the summary) instead
            of raising.
        sheets: write contact sheets; defaults to True.
        thumb_size: contact-sheet thumbnail side; defaults to 128.
        progress: show a progress bar over cases; defaults to True.

    Returns:
        The summary dict written to `summary.json`.

    Raises:
        ValueError: if `cases` is empty, neither `pipe` nor `images_root` is given, or (scoring
            only, without `allow_missing`) some cases have no image.

    Example:
        >>> summary = evaluate_cases(bench, cases, "runs/eval", clip, dino, images_root="my_images")  # doctest: +SKIP
    """
    if not cases:
        raise ValueError("Expected `cases` to hold at least one case, but got none.")
    if pipe is None and images_root is None:
        raise ValueError("Expected `pipe` (generation) or `images_root` (scoring only), but got neither.")
    if not isinstance(generation, GenerationSettings):
        raise ValueError(f"Expected `generation` to be a GenerationSettings, but got {type(generation).__name__}.")
    sliding_crops(16, 16, crop_sizes, crop_stride)  # validates the crop settings before any work
    out_dir = Path(out_dir)
    images_root = Path(images_root) if images_root is not None else out_dir / "images"
    missing: list[str] = []
    found: dict[str, list[Path]] = {}
    if pipe is None:
        for case in cases:
            found[case.case_id] = find_case_images(images_root, case)
            if not found[case.case_id]:
                missing.append(case.case_id)
        if missing and not allow_missing:
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise ValueError(
                f"Expected images for every case under {images_root}/<case_id>/, but {len(missing)} of {len(cases)} "
                f"cases have none ({shown}); generate them, subsample the cases, or allow missing cases."
            )
    todo = [case for case in cases if case.case_id not in missing]
    photos: dict[str, list[Image.Image]] = {}
    cache: dict = {}
    results = []
    done = resumed = 0
    for case in tqdm(todo, desc="DreamBench cases", disable=not progress):
        path = out_dir / "cases" / f"{case.case_id}.json"
        if path.exists() and not overwrite:
            results.append(json.loads(path.read_text()))
            resumed += 1
            continue
        if pipe is not None:
            paths = generate_case_images(pipe, bench, case, images_root, generation)
        else:
            paths = found[case.case_id]
        for name in case.subjects:
            if name not in photos:
                photos[name] = [_open_rgb(p) for p in bench.subjects[name].image_paths]
        result = score_case(
            case,
            [_open_rgb(p) for p in paths],
            photos,
            clip,
            dino,
            crop_sizes=crop_sizes,
            crop_stride=crop_stride,
            cache=cache,
        )
        result["images"] = [p.relative_to(images_root).as_posix() for p in paths]
        write_text_atomic(path, json.dumps(result, indent=1) + "\n")
        results.append(result)
        done += 1

    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=list(_CSV_COLUMNS))
    writer.writeheader()
    writer.writerows(_case_rows(results))
    write_text_atomic(out_dir / "results.csv", table.getvalue())
    write_text_atomic(out_dir / "results.json", json.dumps(results, indent=1) + "\n")
    summary = summarize(results)
    summary.update(
        {
            "scored_cases": done,
            "resumed_cases": resumed,
            "missing_cases": missing,
            "crop_sizes": list(crop_sizes),
            "crop_stride": crop_stride,
            "images_root": str(images_root),
            "generation": asdict(generation) if pipe is not None else None,
        }
    )
    write_text_atomic(out_dir / "summary.md", summary_markdown(summary, crop_sizes=crop_sizes, crop_stride=crop_stride))
    if sheets and results:
        written = _write_sheets(bench, results, images_root, out_dir / "sheets", generation.reference_index, thumb_size)
        summary["sheets"] = [p.relative_to(out_dir).as_posix() for p in written]
    write_text_atomic(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary
