"""Generating a case's images with any reference-image pipeline at the benchmark's sizes
(`XVerseGeneration`, `generate_case_images`, `prepare_reference`).

XVerse's protocol (``eval/eval_scripts/run_eval_*.sh``, ``eval/tools/idip_gen_split_idip.py``,
``src/flux/generate.py``): target 768×768, condition images 256×256 (transparent pixels on white,
padded to a square on white, resized), 4 images per prompt with seeds 42, 43, 44, 45, 28 steps,
guidance 3.5.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ...utils.atomic import save_image_atomic
from .benchmark import XVerseCase
from .subjects import pad_to_square

__all__ = ["REFERENCE_ARGUMENTS", "FamilySampler", "XVerseGeneration", "generate_case_images", "prepare_reference"]

REFERENCE_ARGUMENTS = ("reference_images", "image")
"""How a pipeline takes the references: ``reference_images`` (`MosaicFluxPipeline`) or ``image``
(diffusers' in-sequence pipelines: `Flux2KleinPipeline`, `Flux2Pipeline`, `FluxKontextPipeline`)."""

_RESERVED = ("prompt", "height", "width", "num_inference_steps", "guidance_scale", "generator", "ref_size") + REFERENCE_ARGUMENTS


@dataclass(frozen=True)
class XVerseGeneration:
    """How `generate_case_images` calls the pipeline.

    Args:
        height: output height; defaults to 768 (XVerse's target size).
        width: output width; defaults to 768.
        reference_size: condition image side; defaults to 256 (XVerse's condition size).
        num_inference_steps: defaults to 28.
        guidance_scale: defaults to 3.5.
        seed: image i of every case uses ``seed + i``; defaults to 42 (XVerse's).
        reference_argument: one of `REFERENCE_ARGUMENTS`; defaults to ``"reference_images"``.
        pass_reference_size: also pass ``ref_size=reference_size`` (`MosaicFluxPipeline` does its
            own reference preprocessing at that size); defaults to True.
        pipeline_kwargs: further keyword arguments of every call.

    Example:
        >>> XVerseGeneration().height, XVerseGeneration(seed=0).seed
        (768, 0)
    """

    height: int = 768
    width: int = 768
    reference_size: int = 256
    num_inference_steps: int = 28
    guidance_scale: float = 3.5
    seed: int = 42
    reference_argument: str = "reference_images"
    pass_reference_size: bool = True
    pipeline_kwargs: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, minimum in (("height", 1), ("width", 1), ("reference_size", 1), ("num_inference_steps", 1), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"Expected `{name}` to be an int >= {minimum}, but got {value!r}.")
        if isinstance(self.guidance_scale, bool) or not isinstance(self.guidance_scale, (int, float)):
            raise ValueError(f"Expected `guidance_scale` to be a number, but got {self.guidance_scale!r}.")
        if self.reference_argument not in REFERENCE_ARGUMENTS:
            raise ValueError(f"Expected `reference_argument` to be one of {list(REFERENCE_ARGUMENTS)}, but got {self.reference_argument!r}.")
        if not isinstance(self.pipeline_kwargs, dict) or set(self.pipeline_kwargs) & set(_RESERVED):
            raise ValueError(
                f"Expected `pipeline_kwargs` to be a dict without the arguments set by the harness {list(_RESERVED)}, "
                f"but got {self.pipeline_kwargs!r}."
            )


class FamilySampler:
    """A model family (any `mosaic_kit.models.ModelFamily`, e.g. from
    `mosaic_kit.pipelines.build_family`) as the pipeline `generate_case_images` calls: each call
    is one ``family.sample``, the family's own pipeline with its LoRA as loaded.

    Use it with ``XVerseGeneration(reference_argument="reference_images", pass_reference_size=False)``
    (the references arrive prepared at the benchmark's size), or with DreamBench's
    `mosaic_kit.eval.dreambench.generate_case_images`, whose ``ref_size`` it takes as the released
    preprocessing: each photo fitted on white into a ``ref_size`` square
    (`mosaic_kit.pipelines.fit_on_white`, what `MosaicFluxPipeline` does to its references).

    Args:
        family: the model family.

    Example:
        >>> class Grey:  # a stand-in with the family's ``sample`` signature
        ...     def sample(self, prompt, references, height, width, num_inference_steps, generator=None,
        ...                guidance_scale=None):
        ...         return Image.new("RGB", (width, height), "gray")
        >>> FamilySampler(Grey())(prompt="a cat", reference_images=[], height=8, width=12,
        ...                       num_inference_steps=1, guidance_scale=3.5, generator=None).images[0].size
        (12, 8)
        >>> class Sizes(Grey):  # what the family gets with a ``ref_size``
        ...     def sample(self, prompt, references, *args, **kwargs):
        ...         return Image.new("RGB", references[0].size)
        >>> FamilySampler(Sizes())(prompt="a cat", reference_images=[Image.new("RGB", (40, 20))], height=8, width=8,
        ...                        num_inference_steps=1, guidance_scale=3.5, generator=None, ref_size=16).images[0].size
        (16, 16)
    """

    def __init__(self, family: Any) -> None:
        if not callable(getattr(family, "sample", None)):
            raise ValueError(f"Expected a model family with a `sample` method, but got {type(family).__name__}.")
        self.family = family

    def __call__(self, *, prompt: str, reference_images: list[Image.Image], height: int, width: int,
                 num_inference_steps: int, guidance_scale: float, generator: torch.Generator | None,
                 ref_size: int | None = None, **options: Any) -> Any:
        """One ``family.sample`` (``options`` go to it); with ``ref_size``, each reference fitted
        on white into a ``ref_size`` square first. Returns an object whose ``.images[0]`` is the image."""
        if ref_size is not None:
            from ...pipelines.pipeline import fit_on_white

            reference_images = [fit_on_white(image, ref_size) for image in reference_images]
        image = self.family.sample(prompt, reference_images, height, width, num_inference_steps,
                                   generator=generator, guidance_scale=guidance_scale, **options)
        return type("FamilyOutput", (), {"images": [image]})()


def prepare_reference(photo: Image.Image, size: int) -> Image.Image:
    """A subject photo as XVerse conditions on it: padded to a square on white, resized to
    ``size × size`` (bicubic).

    Example:
        >>> prepare_reference(Image.new("RGB", (40, 20), "red"), 16).size
        (16, 16)
    """
    return pad_to_square(photo.convert("RGB")).resize((size, size), Image.Resampling.BICUBIC)


def generate_case_images(pipe: Any, case: XVerseCase, photos: dict[str, Image.Image], images_root: str | Path,
                         settings: XVerseGeneration = XVerseGeneration()) -> list[Path]:
    """Generates a case's images with any reference-image pipeline, skipping those already written.

    The pipeline is called once per image as ``pipe(prompt=case.prompt, <reference_argument>=[one
    prepared reference per subject], height=..., width=..., num_inference_steps=...,
    guidance_scale=..., generator=torch.Generator("cpu").manual_seed(seed + i), [ref_size=...],
    **pipeline_kwargs)`` and must return an object whose ``.images[0]`` is a PIL image. Images
    are written atomically as PNG.

    Args:
        pipe: the pipeline (any model family's: `MosaicFluxPipeline`, a stock FLUX.2 pipeline, ...).
        case: the case.
        photos: subject photos by subject name.
        images_root: where ``<case_id>/<i:02d>.png`` go.
        settings: sizes, steps, guidance, seed and the reference argument.

    Returns:
        The case's image paths.

    Raises:
        ValueError: if the pipeline's output has no PIL image.

    Example:
        >>> class Gray:
        ...     def __call__(self, *, prompt, reference_images, height, width, **kwargs):
        ...         return type("Out", (), {"images": [Image.new("RGB", (width, height), "gray")]})()
        >>> import tempfile
        >>> case = XVerseCase("single", 0, "a cat", (), {"1": "Is there a cat?"}, {"1": (0,)}, num_images=2)
        >>> paths = generate_case_images(Gray(), case, {}, tempfile.mkdtemp(), XVerseGeneration(height=16, width=24))
        >>> [Image.open(p).size for p in paths]
        [(24, 16), (24, 16)]
    """
    if not isinstance(settings, XVerseGeneration):
        raise ValueError(f"Expected `settings` to be an XVerseGeneration, but got {type(settings).__name__}.")
    paths = case.image_paths(images_root)
    if all(path.exists() for path in paths):
        return paths
    references = [prepare_reference(photos[s.name], settings.reference_size) for s in case.subjects]
    extra = dict(settings.pipeline_kwargs)
    if settings.pass_reference_size:
        extra["ref_size"] = settings.reference_size
    extra[settings.reference_argument] = references
    for index, path in enumerate(paths):
        if path.exists():
            continue
        output = pipe(
            prompt=case.prompt,
            height=settings.height,
            width=settings.width,
            num_inference_steps=settings.num_inference_steps,
            guidance_scale=settings.guidance_scale,
            generator=torch.Generator("cpu").manual_seed(settings.seed + index),
            **extra,
        )
        images = getattr(output, "images", None)
        if not images or not isinstance(images[0], Image.Image):
            raise ValueError(f"Expected the pipeline to return `.images` with a PIL image, but got {type(output).__name__}.")
        save_image_atomic(images[0], path)
    return paths
