"""Stage 2: one image per prompt, from a diffusers text-to-image pipeline or from files.

- `DiffusersImageGenerator`: any diffusers text-to-image pipeline (FLUX.1, FLUX.2 [klein], SD3,
  ...), batched, with one seed per image (`item_seed` of the run's seed and the item's id, so an
  image does not depend on its batch, shard or position).
- `ImagesFromFolder`: images you already have, ``<folder>/<id>.<png|jpg|jpeg|webp>``.
- `PhotoComposites`: multi-subject images composed from single-subject photos of a folder per
  identity (e.g. DreamBench), with the exact subject regions and the photos not used (other views
  of each subject). For CPU runs and tests: the "generated" images are real photos.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..utils.images import tensor_to_pil  # re-exported: the one converter
from ..data import open_image, to_rgb
from ..utils.images import pil_to_tensor
from .prompts import PromptRecord
from .records import item_seed

__all__ = ["DiffusersImageGenerator", "GeneratedImage", "ImagesFromFolder", "PhotoComposites", "tensor_to_pil"]

_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


@dataclass
class GeneratedImage:
    """One image of the images stage.

    Attributes:
        image: the RGB image.
        seed: the seed it was drawn with (None for files).
        provenance: how it was made (model, steps, file, layout, ...).
        subject_masks: per listed subject, its exact ``(H, W)`` bool region when the source knows
            it (`PhotoComposites`), else empty.
        other_views: per listed subject, paths of other images of the same subject (for
            references from files), else empty.

    Examples:
        >>> GeneratedImage(Image.new("RGB", (8, 8)), seed=3).subject_masks
        []
    """

    image: Image.Image
    seed: int | None
    provenance: dict[str, Any] = field(default_factory=dict)
    subject_masks: list[torch.Tensor] = field(default_factory=list)
    other_views: list[list[str]] = field(default_factory=list)


class DiffusersImageGenerator:
    """Text-to-image with any diffusers pipeline, batched, one seeded generator per image.

    Args:
        pipeline: a diffusers text-to-image pipeline (called with ``prompt``, ``height``,
            ``width``, ``num_inference_steps``, ``guidance_scale``, ``generator``).
        height: image height (a multiple of the pipeline's factor, 16 for FLUX).
        width: image width (likewise).
        num_inference_steps: denoising steps.
        guidance_scale: the pipeline's guidance scale.
        batch_size: prompts per pipeline call.
        seed: the run's seed (each image gets `item_seed(seed, id)`).
        extra: more keyword arguments for the pipeline (e.g. ``max_sequence_length``).
        name: what the provenance calls the model.

    Examples:
        >>> from diffusers import FluxPipeline
        >>> from mosaic_kit.pipelines.tiny import tiny_flux_components
        >>> pipe = FluxPipeline(**tiny_flux_components())
        >>> generator = DiffusersImageGenerator(pipe, height=32, width=32, num_inference_steps=2,
        ...                                     extra={"max_sequence_length": 16})
        >>> images = generator([PromptRecord("p0", "a dog and a cat", ["dog", "cat"])])
        >>> images[0].image.size, images[0].seed == item_seed(0, "p0")
        ((32, 32), True)
    """

    def __init__(self, pipeline: Any, *, height: int = 512, width: int = 512, num_inference_steps: int = 28,
                 guidance_scale: float = 3.5, batch_size: int = 1, seed: int = 0, extra: dict | None = None,
                 name: str = "pipeline") -> None:
        if not callable(pipeline):
            raise ValueError(f"Expected `pipeline` to be a diffusers pipeline, but got {type(pipeline).__name__}.")
        for label, value in (("height", height), ("width", width), ("num_inference_steps", num_inference_steps),
                             ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Expected `{label}` to be a positive int, but got {value!r}.")
        self.pipeline = pipeline
        if hasattr(pipeline, "set_progress_bar_config"):
            pipeline.set_progress_bar_config(disable=True)
        self.height, self.width, self.steps, self.guidance = height, width, num_inference_steps, float(guidance_scale)
        self.batch_size, self.seed, self.extra, self.name = batch_size, seed, dict(extra or {}), name

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, device: str = "cpu", dtype: torch.dtype = torch.bfloat16,
                        **kwargs: Any) -> DiffusersImageGenerator:
        """Loads any diffusers pipeline (its ``model_index.json`` names the class) from a hub id or folder."""
        from diffusers import DiffusionPipeline

        pipeline = DiffusionPipeline.from_pretrained(name_or_path, torch_dtype=dtype).to(device)
        return cls(pipeline, name=name_or_path, **kwargs)

    def __call__(self, records: Sequence[PromptRecord]) -> list[GeneratedImage]:
        """One image per record, in order."""
        out: list[GeneratedImage] = []
        device = getattr(self.pipeline, "device", torch.device("cpu"))
        for start in range(0, len(records), self.batch_size):
            batch = list(records[start:start + self.batch_size])
            seeds = [item_seed(self.seed, r.id) for r in batch]
            generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
            result = self.pipeline(
                prompt=[r.prompt for r in batch], height=self.height, width=self.width,
                num_inference_steps=self.steps, guidance_scale=self.guidance, generator=generators,
                output_type="pil", **self.extra,
            )
            for image, seed in zip(result.images, seeds):
                out.append(GeneratedImage(image.convert("RGB"), seed, {
                    "model": self.name, "height": self.height, "width": self.width, "steps": self.steps,
                    "guidance_scale": self.guidance, "seed": seed,
                }))
        return out


class ImagesFromFolder:
    """Images you already have: ``<folder>/<id>.png`` (or .jpg, .jpeg, .webp) per prompt id.

    Args:
        folder: the folder.

    Examples:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp()); Image.new("RGB", (8, 8)).save(folder / "p0.png")
        >>> ImagesFromFolder(folder)([PromptRecord("p0", "a dog", ["dog"])])[0].provenance["file"].endswith("p0.png")
        True
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ValueError(f"Expected `folder` to be a folder of images, but {self.folder} is not a folder.")

    def __call__(self, records: Sequence[PromptRecord]) -> list[GeneratedImage]:
        """One image per record (any mode `mosaic_kit.data` reads, as RGB).

        Raises:
            FileNotFoundError: naming the id, when it has no file.
            ValueError: naming the file, when it is not a readable image, is truncated or declares
                more pixels than allowed (a decompression bomb; see `mosaic_kit.data.open_image`).
        """
        out = []
        for record in records:
            path = next((self.folder / f"{record.id}{s}" for s in _SUFFIXES if (self.folder / f"{record.id}{s}").is_file()), None)
            if path is None:
                raise FileNotFoundError(f"no image for item {record.id!r} in {self.folder} (expected {record.id}.png/.jpg)")
            image = to_rgb(open_image(path), str(path))
            out.append(GeneratedImage(image, None, {"source": "folder", "file": str(path)}))
        return out


class PhotoComposites:
    """Multi-subject images composed from photos, one folder of photos per identity.

    For a record with ``identities`` (e.g. DreamBench folder names; else its ``subjects``), one
    photo per identity is drawn (seeded per item), and the photos are placed on a canvas with
    `mosaic_kit.data.compose_samples` (whole photos, ``paste="box"``, no overlap), so every
    subject's visible region is known exactly. The identity's other photos are recorded as other
    views of the subject. The subject regions are the pasted photos, not segmentations of the
    subject inside them.

    Args:
        root: folder with one sub-folder of images per identity.
        canvas_size: canvas side (a multiple of 16).
        scale_range: a photo's long side as a fraction of the canvas, ``(low, high)``.
        background: canvas grey level in [0, 1].
        seed: the run's seed.

    Examples:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> for name in ("dog", "cat"):
        ...     (root / name).mkdir()
        ...     for i in range(2): Image.new("RGB", (40, 30), name == "dog" and "red" or "blue").save(root / name / f"{i}.jpg")
        >>> image, = PhotoComposites(root, canvas_size=64)([PromptRecord("p0", "a dog and a cat", ["dog", "cat"])])
        >>> image.image.size, [int(m.sum()) > 0 for m in image.subject_masks], [len(v) for v in image.other_views]
        ((64, 64), [True, True], [1, 1])
    """

    def __init__(self, root: str | Path, *, canvas_size: int = 256, scale_range: tuple[float, float] = (0.3, 0.6),
                 background: float = 0.5, seed: int = 0) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"Expected `root` to be a folder with one folder of photos per identity, but {self.root} "
                             "is not a folder.")
        if isinstance(canvas_size, bool) or not isinstance(canvas_size, int) or canvas_size < 16 or canvas_size % 16:
            raise ValueError(f"Expected `canvas_size` to be a positive multiple of 16, but got {canvas_size!r}.")
        self.canvas_size, self.scale_range, self.background, self.seed = canvas_size, tuple(scale_range), background, seed

    def photos(self, identity: str) -> list[Path]:
        """The identity's photos, sorted; raises ValueError when there are none."""
        folder = self.root / identity
        photos = sorted(p for p in folder.glob("*") if p.suffix.lower() in _SUFFIXES) if folder.is_dir() else []
        if not photos:
            raise ValueError(f"Expected photos of identity {identity!r} in {folder}, but found none.")
        return photos

    def __call__(self, records: Sequence[PromptRecord]) -> list[GeneratedImage]:
        """One composite per record."""
        from ..data.composer import compose_samples
        from ..data.sample import MultiSubjectSample

        out = []
        for record in records:
            seed = item_seed(self.seed, record.id)
            rng = random.Random(seed)
            identities = record.identities or record.subjects
            parts, chosen, others = [], [], []
            for k, identity in enumerate(identities):
                photos = self.photos(identity)
                pick = rng.randrange(len(photos))
                chosen.append(str(photos[pick]))
                others.append([str(p) for i, p in enumerate(photos) if i != pick])
                photo = pil_to_tensor(to_rgb(open_image(photos[pick]), str(photos[pick])))
                parts.append(MultiSubjectSample(f"{record.id}-{k}", photo, [photo[:, :16, :16]], record.subjects[k],
                                                [torch.zeros(0, 4)], meta={"subjects": [record.subjects[k]]}))
            composite = compose_samples(
                parts, torch.Generator().manual_seed(seed), self.canvas_size, scale_range=self.scale_range,
                max_overlap=0.0, paste="box", crop_to_subject=False, background=self.background, sample_id=record.id,
            )
            masks = [m.bool() for m in composite.target_masks]
            out.append(GeneratedImage(tensor_to_pil(composite.target), seed, {
                "source": "photo_composites", "root": str(self.root), "photos": chosen, "seed": seed,
                "layout": [{"box": list(part["box"])} for part in composite.meta["layout"]],
            }, subject_masks=masks, other_views=others))
        return out
