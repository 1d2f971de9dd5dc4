"""Stage 5: one reference image per subject.

- `cutout`: the subject cut out of the target (its mask's box, widened by a margin, outside the
  mask filled with a background colour, padded to a square).
- `DiffusersEditor`: a new view of the cut-out from an image-editing pipeline (FLUX.1-Kontext,
  FLUX.2 with one input image, ...), the paper's viewpoint correction.
- With neither an editor nor files, the reference is the cut-out itself; references can also come
  from files (one image per subject, e.g. other photos of the same subject).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from PIL import Image

from ..utils.images import pil_to_tensor
from .images import tensor_to_pil
from .records import item_seed

__all__ = ["DiffusersEditor", "cutout"]


def cutout(image: Image.Image, mask: torch.Tensor, size: int, margin: float = 0.1,
           background: float = 1.0) -> tuple[Image.Image, torch.Tensor]:
    """The subject of ``mask`` cut out of ``image`` as a ``size × size`` reference, and its mask.

    The mask's bounding box is widened by ``margin`` times its size on each side, clipped to the
    image, made square around its centre (padding with ``background`` where the square leaves the
    image), pixels outside the mask are set to ``background``, and the square is resized
    (bicubic; the mask by nearest pixel centre).

    Args:
        image: the target image.
        mask: ``(H, W)`` bool subject mask (non-empty).
        size: the reference's side.
        margin: widening of the box per side, a fraction of its size.
        background: grey level in [0, 1] outside the subject.

    Returns:
        ``(reference, reference_mask)``: an RGB image and its ``(size, size)`` bool mask.

    Examples:
        >>> mask = torch.zeros(32, 64, dtype=torch.bool); mask[8:24, 40:56] = True
        >>> reference, ref_mask = cutout(Image.new("RGB", (64, 32), "red"), mask, size=16, margin=0.0)
        >>> reference.size, int(ref_mask.sum()), reference.getpixel((0, 0))
        ((16, 16), 256, (255, 0, 0))
    """
    if not isinstance(mask, torch.Tensor) or mask.shape != (image.height, image.width):
        raise ValueError(f"Expected `mask` of shape ({image.height}, {image.width}), but got "
                         f"{getattr(mask, 'shape', type(mask).__name__)}.")
    if not bool(mask.any()):
        raise ValueError("Expected a non-empty `mask`, but it has no pixel inside.")
    ys, xs = torch.nonzero(mask, as_tuple=True)
    x0, x1, y0, y1 = int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1
    pad_x, pad_y = margin * (x1 - x0), margin * (y1 - y0)
    x0, x1 = max(0, int(x0 - pad_x)), min(image.width, int(round(x1 + pad_x)))
    y0, y1 = max(0, int(y0 - pad_y)), min(image.height, int(round(y1 + pad_y)))
    side = max(x1 - x0, y1 - y0)
    cx0, cy0 = (x0 + x1 - side) // 2, (y0 + y1 - side) // 2
    pixels = pil_to_tensor(image.convert("RGB"))
    canvas = torch.full((3, side, side), float(background))
    canvas_mask = torch.zeros(side, side, dtype=torch.bool)
    sx0, sy0 = max(cx0, 0), max(cy0, 0)
    sx1, sy1 = min(cx0 + side, image.width), min(cy0 + side, image.height)
    region = mask[sy0:sy1, sx0:sx1]
    window = canvas[:, sy0 - cy0:sy1 - cy0, sx0 - cx0:sx1 - cx0]
    window[:, region] = pixels[:, sy0:sy1, sx0:sx1][:, region]
    canvas_mask[sy0 - cy0:sy1 - cy0, sx0 - cx0:sx1 - cx0] = region
    reference = tensor_to_pil(canvas).resize((size, size), Image.BICUBIC)
    centres = ((torch.arange(size) + 0.5) * side / size).long().clamp_max(side - 1)
    return reference, canvas_mask[centres][:, centres]


class DiffusersEditor:
    """A new view of a subject from an image-editing diffusers pipeline (one input image).

    Args:
        pipeline: e.g. `diffusers.FluxKontextPipeline` or `diffusers.Flux2KleinPipeline`,
            called with ``image``, ``prompt``, ``height``, ``width``, ``num_inference_steps``,
            ``guidance_scale``, ``generator`` (and ``max_area`` where it takes one).
        prompt: the edit instruction; ``{subject}`` is the subject's name.
        size: the reference's side.
        num_inference_steps: denoising steps.
        guidance_scale: the pipeline's guidance.
        seed: the run's seed (each edit gets `item_seed(seed, "<id>/<k>")`).
        extra: more keyword arguments for the pipeline.
        name: what the provenance calls the model.

    Examples:
        >>> from diffusers import FluxKontextPipeline
        >>> from mosaic_kit.pipelines.tiny import tiny_flux_components
        >>> editor = DiffusersEditor(FluxKontextPipeline(**tiny_flux_components()), size=32, num_inference_steps=2,
        ...                          extra={"max_sequence_length": 16, "_auto_resize": False})
        >>> view, info = editor(Image.new("RGB", (32, 32), "red"), "dog", "p0/0")
        >>> view.size, info["seed"] == item_seed(0, "p0/0")
        ((32, 32), True)
    """

    PROMPT = "Show the same {subject} from a different viewpoint, whole, on a plain white background."

    def __init__(self, pipeline: Any, *, prompt: str | None = None, size: int = 512, num_inference_steps: int = 28,
                 guidance_scale: float = 2.5, seed: int = 0, extra: dict | None = None, name: str = "editor") -> None:
        if not callable(pipeline):
            raise ValueError(f"Expected `pipeline` to be a diffusers editing pipeline, but got {type(pipeline).__name__}.")
        if isinstance(size, bool) or not isinstance(size, int) or size < 16:
            raise ValueError(f"Expected `size` to be an int >= 16, but got {size!r}.")
        self.pipeline = pipeline
        if hasattr(pipeline, "set_progress_bar_config"):
            pipeline.set_progress_bar_config(disable=True)
        self.prompt = prompt or self.PROMPT
        self.size, self.steps, self.guidance, self.seed = size, num_inference_steps, float(guidance_scale), seed
        self.extra, self.name = dict(extra or {}), name
        self._parameters = set(inspect.signature(pipeline.__call__).parameters)

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, device: str = "cpu", dtype: torch.dtype = torch.bfloat16,
                        **kwargs: Any) -> DiffusersEditor:
        """Loads any diffusers editing pipeline from a hub id or folder (``model_index.json`` names the class)."""
        from diffusers import DiffusionPipeline

        return cls(DiffusionPipeline.from_pretrained(name_or_path, torch_dtype=dtype).to(device), name=name_or_path, **kwargs)

    def __call__(self, image: Image.Image, subject: str, key: str) -> tuple[Image.Image, dict[str, Any]]:
        """The edited view of ``image`` (``size × size``) and its provenance; ``key`` seeds it."""
        seed = item_seed(self.seed, key)
        device = getattr(self.pipeline, "device", torch.device("cpu"))
        kwargs = dict(image=image, prompt=self.prompt.format(subject=subject), height=self.size, width=self.size,
                      num_inference_steps=self.steps, guidance_scale=self.guidance,
                      generator=torch.Generator(device=device).manual_seed(seed), **self.extra)
        if "max_area" in self._parameters:
            kwargs.setdefault("max_area", self.size * self.size)
        view = self.pipeline(**kwargs).images[0].convert("RGB")
        if view.size != (self.size, self.size):
            view = view.resize((self.size, self.size), Image.BICUBIC)
        return view, {"model": self.name, "prompt": kwargs["prompt"], "seed": seed, "steps": self.steps}


