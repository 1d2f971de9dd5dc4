"""Generating a case's images with any pipeline, seeded per image (`generate_case_images`)."""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ...utils.atomic import save_image_atomic
from .benchmark import DreamBench, _open_rgb
from .cases import EvalCase

__all__ = ["GenerationSettings", "generate_case_images", "image_seed"]


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
        >>> from mosaic_kit.eval.dreambench import DreamBenchSubject, list_cases
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
