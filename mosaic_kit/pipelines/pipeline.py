"""`MosaicFluxPipeline`: text + K reference images → one image, diffusers style."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import retrieve_timesteps
from diffusers.utils import BaseOutput
from PIL import Image

from ..data import open_image, to_rgb
from ..models import MosaicFluxFamily, MosaicFluxTransformer, load_reference_lora, resolution_shift_mu
from ..utils.finite import check_finite
from ..utils.images import tensor_to_pil

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
"""Allowed values of ``output_type`` in `MosaicFluxPipeline.__call__`."""

ImageInput = Image.Image | str | os.PathLike | np.ndarray | torch.Tensor
"""What a reference image may be: a PIL image, a file path, an ``(H, W, 3)`` uint8 array or a
``(3, H, W)`` float tensor in ``[0, 1]``."""


@dataclass
class MosaicFluxPipelineOutput(BaseOutput):
    """Output of `MosaicFluxPipeline`.

    Attributes:
        images: generated images (PIL images, a numpy array or a tensor, per ``output_type``).
        references: the preprocessed reference images as the model saw them (PIL).
    """

    images: list[Image.Image] | np.ndarray | torch.Tensor
    references: list[Image.Image]


def fit_on_white(image: Image.Image, size: int, scale: float = 0.9) -> Image.Image:
    """Released reference preprocessing: resize to fit ``scale · size`` (aspect kept), centred on a
    white ``size × size`` square.

    Args:
        image: a PIL image, converted with `mosaic_kit.data.to_rgb` (16-bit grey scaled, palette,
            CMYK; transparency composited on white; unsupported modes refused).
        size: the square's side in pixels.
        scale: the fraction of the side the longer image side fills.

    Returns:
        An RGB ``size × size`` image.

    Example:
        >>> out = fit_on_white(Image.new("RGB", (200, 100), "red"), 64)
        >>> out.size, out.getpixel((0, 0)), out.getpixel((32, 32))
        ((64, 64), (255, 255, 255), (255, 0, 0))
    """
    image = to_rgb(image)
    side = max(1, round(size * scale))
    ratio = side / max(image.size)
    resized = image.resize((max(1, round(image.width * ratio)), max(1, round(image.height * ratio))), Image.LANCZOS)
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(resized, ((size - resized.width) // 2, (size - resized.height) // 2))
    return canvas


def load_reference_image(image: ImageInput, index: int) -> Image.Image:
    """Reads one reference into an RGB PIL image (`mosaic_kit.data.to_rgb`: 16-bit grey scaled,
    palette, CMYK, alpha on white; files over `mosaic_kit.data.MAX_IMAGE_PIXELS` refused from
    their header), or raises a ValueError naming it (never substitutes).

    Args:
        image: see `ImageInput`.
        index: its position in ``reference_images`` (for the error message).

    Returns:
        An RGB PIL image.
    """
    name = f"reference_images[{index}]"
    if isinstance(image, Image.Image):
        return to_rgb(image, f"`{name}`")
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise ValueError(f"Expected `{name}` to be a readable image file, but {str(path)!r} does not exist.")
        try:
            return to_rgb(open_image(path), str(path))
        except ValueError as error:
            raise ValueError(f"Expected `{name}` to be a readable image file, but {str(path)!r} failed: {error}") from None
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] not in (3, 4) or image.dtype != np.uint8:
            raise ValueError(f"Expected `{name}` as an (H, W, 3|4) uint8 array, but got {image.shape} {image.dtype}.")
        return to_rgb(Image.fromarray(image), f"`{name}`")
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3 or not image.is_floating_point():
            raise ValueError(f"Expected `{name}` as a (3, H, W) float tensor in [0, 1], but got {tuple(image.shape)}.")
        if not torch.isfinite(image).all() or image.min() < 0 or image.max() > 1:
            raise ValueError(f"Expected `{name}` with finite values in [0, 1].")
        return tensor_to_pil(image)
    raise ValueError(f"Expected `{name}` to be a PIL image, a path, an array or a tensor, but got {type(image).__name__}.")


class MosaicFluxPipeline(FluxPipeline):
    """FLUX.1 with K reference subjects (MOSAIC).

    Built like any diffusers FLUX pipeline: ``MosaicFluxPipeline.from_pretrained(path_or_id,
    torch_dtype=torch.bfloat16)`` or ``MosaicFluxPipeline(**components)``; then
    ``load_mosaic_weights(lora_file)``. The transformer stays the stock diffusers model; encoding,
    the multi-reference forward and decoding go through the model family `family`
    (`mosaic_kit.models.MosaicFluxFamily`); the pipeline keeps the reference preprocessing, the
    initial noise and the scheduler loop.

    Attributes:
        max_references: the most references one call accepts (default 8).

    Example:
        >>> from mosaic_kit.pipelines import tiny_mosaic_pipeline
        >>> pipe = tiny_mosaic_pipeline()
        >>> refs = [Image.new("RGB", (40, 30), "red"), Image.new("RGB", (30, 40), "blue")]
        >>> out = pipe("a red and a blue thing", refs, height=32, width=48, ref_size=32,
        ...            num_inference_steps=2, generator=torch.Generator().manual_seed(0),
        ...            max_sequence_length=16, progress=False)
        >>> out.images[0].size, [r.size for r in out.references]
        ((48, 32), [(32, 32), (32, 32)])
    """

    max_references: int = 8
    reference_adapter: str = "mosaic"

    @property
    def family(self) -> MosaicFluxFamily:
        """The model boundary over this pipeline (`mosaic_kit.models.MosaicFluxFamily`): encoding,
        the multi-reference forward and decoding. Built on first use with the released settings,
        routing the adapter named `reference_adapter` to reference tokens; a trainer sets its own
        (``pipe.family = MosaicFluxFamily(pipe, capture_blocks="all")``) so samples use its settings."""
        family = getattr(self, "_family", None)
        if (family is None or family.transformer is not self.transformer
                or family.reference_adapter != self.reference_adapter):
            family = MosaicFluxFamily(self, reference_adapter=self.reference_adapter)
            self._family = family
        return family

    @family.setter
    def family(self, family: MosaicFluxFamily) -> None:
        if not isinstance(family, MosaicFluxFamily) or family.pipe is not self:
            raise ValueError(
                "Expected `family` to be a MosaicFluxFamily built over this pipeline (`MosaicFluxFamily(pipe, ...)`), "
                f"but got {type(family).__name__}{'' if not isinstance(family, MosaicFluxFamily) else ' over another pipeline'}."
            )
        self.reference_adapter = family.reference_adapter
        self._family = family

    @property
    def mosaic_transformer(self) -> MosaicFluxTransformer:
        """The multi-reference wrapper of ``self.transformer`` (``self.family.model``), routing the
        adapter named `reference_adapter` to reference tokens."""
        return self.family.model

    def load_mosaic_weights(self, path: str | os.PathLike, adapter_name: str = "mosaic") -> None:
        """Loads a MOSAIC reference LoRA (diffusers LoRA safetensors, e.g. the released
        checkpoint or one written by `recipes/flux_mosaic_train.py`) into the transformer.

        Other LoRAs (a style LoRA loaded with ``load_lora_weights``) stay active and act on every
        token, as in stock diffusers; this one acts on reference tokens only. Loading another LoRA
        afterwards with diffusers' ``load_lora_weights`` makes that one the only active adapter (as
        in stock diffusers): re-activate both with
        ``pipe.transformer.set_adapters(["mosaic", "style"])`` (the pipeline warns otherwise).

        Args:
            path: the ``.safetensors`` file, or a folder holding ``pytorch_lora_weights.safetensors``.
            adapter_name: peft adapter name (becomes `reference_adapter`).
        """
        path = Path(path)
        if path.is_dir():
            path = path / "pytorch_lora_weights.safetensors"
        load_reference_lora(self.transformer, path, adapter_name=adapter_name)
        self.reference_adapter = adapter_name

    def _check_call(self, prompt, reference_images, height, width, ref_size, num_inference_steps, guidance_scale,
                    output_type="pil", reference_guidance=1.0, use_reference_cache=False, num_images_per_prompt=1,
                    max_sequence_length=512, latents=None, progress=True):
        if not isinstance(prompt, str):
            raise ValueError(f"Expected `prompt` to be a string, but got {type(prompt).__name__}.")
        if isinstance(reference_images, (str, os.PathLike, Image.Image)) or not isinstance(reference_images, Sequence):
            raise ValueError(
                f"Expected `reference_images` to be a list of images, but got {type(reference_images).__name__}."
            )
        if not 1 <= len(reference_images) <= self.max_references:
            raise ValueError(
                f"Expected between 1 and max_references = {self.max_references} reference images, "
                f"but got {len(reference_images)}."
            )
        multiple = self.vae_scale_factor * 2
        for name, value in (("height", height), ("width", width), ("ref_size", ref_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0 or value % multiple:
                raise ValueError(f"Expected `{name}` to be a positive multiple of {multiple}, but got {value!r}.")
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"Expected `num_inference_steps` to be a positive int, but got {num_inference_steps!r}.")
        for name, value in (("guidance_scale", guidance_scale), ("reference_guidance", reference_guidance)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
                raise ValueError(f"Expected `{name}` to be a finite number, but got {value!r}.")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"Expected `output_type` to be one of {OUTPUT_TYPES}, but got {output_type!r}.")
        count = num_images_per_prompt
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"Expected `num_images_per_prompt` to be a positive int, but got {count!r}.")
        length = max_sequence_length
        if isinstance(length, bool) or not isinstance(length, int) or not 1 <= length <= 512:
            raise ValueError(f"Expected `max_sequence_length` to be an int in [1, 512] (T5 tokens), but got {length!r}.")
        for name, value in (("use_reference_cache", use_reference_cache), ("progress", progress)):
            if not isinstance(value, bool):
                raise ValueError(f"Expected `{name}` to be a bool, but got {value!r}.")
        if latents is not None:
            tokens = (height // multiple) * (width // multiple)
            shape = (num_images_per_prompt, tokens, self.transformer.config.in_channels)
            if not isinstance(latents, torch.Tensor) or tuple(latents.shape) != shape:
                got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
                raise ValueError(
                    f"Expected `latents` as packed tokens of shape (num_images_per_prompt, (height/16)·(width/16), "
                    f"C_in) = {shape}, but got {got}."
                )
            if not latents.is_floating_point():
                raise ValueError(f"Expected `latents` to be a floating-point tensor, but got {latents.dtype}.")
            check_finite("latents", latents, force=True)  # once per call: no hot-path cost

    @torch.no_grad()
    def encode_references(
        self, references: Sequence[Image.Image], ref_size: int, batch: int
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
        """VAE-encodes preprocessed references (latent mode, as released) into packed tokens
        (`MosaicFluxFamily.encode_references`).

        Args:
            references: K RGB ``ref_size × ref_size`` images.
            ref_size: their side in pixels.
            batch: the number of images generated (tokens are repeated).

        Returns:
            ``(tokens (batch, N_ref, C), ids (N_ref, 3), counts)``.
        """
        encoded = self.family.encode_references(self._reference_pixels(references, ref_size), batch)
        return encoded["reference_tokens"], encoded["reference_ids"], encoded["reference_token_counts"]

    def _reference_pixels(self, references: Sequence[Image.Image], ref_size: int) -> torch.Tensor:
        """``(K, 3, ref_size, ref_size)`` in ``[-1, 1]`` (diffusers' image processor)."""
        return self.image_processor.preprocess(list(references), height=ref_size, width=ref_size)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str,
        reference_images: Sequence[ImageInput],
        height: int = 512,
        width: int = 512,
        ref_size: int = 512,
        num_inference_steps: int = 28,
        guidance_scale: float = 3.5,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        reference_guidance: float = 1.0,
        use_reference_cache: bool = False,
        num_images_per_prompt: int = 1,
        max_sequence_length: int = 512,
        latents: torch.Tensor | None = None,
        progress: bool = True,
        fit_references: bool = True,
    ) -> MosaicFluxPipelineOutput:
        """Generates images of the prompt with the referenced subjects.

        Args:
            prompt: the text prompt.
            reference_images: 1 … ``max_references`` images (see `ImageInput`), one per subject,
                each fitted on white into a ``ref_size`` square at 0.9 scale (as released).
            height: output height in pixels (multiple of 16).
            width: output width in pixels (multiple of 16).
            ref_size: reference side in pixels (multiple of 16).
            num_inference_steps: denoising steps (released: 28).
            guidance_scale: FLUX guidance for text and target (released: 3.5).
            generator: seeds the initial noise.
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"`` (`OUTPUT_TYPES`).
            reference_guidance: guidance embedded for the reference stream (released: 1.0).
            use_reference_cache: compute the references' keys and values once, with references
                attending only to themselves, and reuse them at every step (`build_reference_cache`):
                faster, but the reference stream no longer sees the text or target it was trained
                with, so subject fidelity may drop.
            num_images_per_prompt: images generated (≥ 1).
            max_sequence_length: T5 tokens (1 … 512).
            latents: optional initial packed latents, ``(num_images_per_prompt, (height/16)·(width/16),
                C_in)``, finite.
            progress: show a progress bar.
            fit_references: fit each reference on white into the ``ref_size`` square (the released
                preprocessing); False: the references are already ``ref_size`` squares and are
                used as they are (`mosaic_kit.models.MosaicFluxFamily.sample`).

        Returns:
            `MosaicFluxPipelineOutput` with the images and the preprocessed references.
        """
        self._check_call(prompt, reference_images, height, width, ref_size, num_inference_steps, guidance_scale,
                         output_type, reference_guidance, use_reference_cache, num_images_per_prompt,
                         max_sequence_length, latents, progress)
        if not isinstance(fit_references, bool):
            raise ValueError(f"Expected `fit_references` to be a bool, but got {fit_references!r}.")
        references = [load_reference_image(img, k) for k, img in enumerate(reference_images)]
        if fit_references:
            references = [fit_on_white(image, ref_size) for image in references]
        elif any(image.size != (ref_size, ref_size) for image in references):
            raise ValueError(f"Expected `reference_images` of {ref_size}×{ref_size} with fit_references=False, but got "
                             f"sizes {[image.size for image in references]}.")
        adapters = getattr(self.transformer, "peft_config", {})
        if self.reference_adapter in adapters and self.reference_adapter not in self.transformer.active_adapters():
            warnings.warn(
                f"The reference LoRA {self.reference_adapter!r} is loaded but not active (active: "
                f"{self.transformer.active_adapters()}), so references go through the base weights. Loading another "
                "LoRA with `load_lora_weights` deactivates it; re-activate both with "
                f"`pipe.transformer.set_adapters([{self.reference_adapter!r}, ...])`.",
                UserWarning,
                stacklevel=2,
            )
        device = self._execution_device
        family = self.family
        batch = num_images_per_prompt

        inputs = family.encode_prompt_and_references(
            prompt, self._reference_pixels(references, ref_size), (height, width), num_images_per_prompt=batch,
            max_sequence_length=max_sequence_length, reference_guidance=reference_guidance,
        )
        target, _ = self.prepare_latents(
            batch, family.token_channels // 4, height, width, family.dtype, device, generator, latents
        )
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        mu = resolution_shift_mu(target.shape[1], self.scheduler.config)
        timesteps, _ = retrieve_timesteps(self.scheduler, num_inference_steps, device, sigmas=sigmas, mu=mu)
        if use_reference_cache:
            inputs = family.cache_references(inputs, guidance=guidance_scale)

        self.scheduler.set_begin_index(0)
        with self.progress_bar(total=len(timesteps), disable=not progress) as bar:
            for t in timesteps:
                timestep = t.expand(batch).to(target.dtype) / 1000  # FluxPipeline's rounding order
                velocity = family.forward(inputs, target, timestep, guidance=guidance_scale)
                target = self.scheduler.step(velocity, t, target, return_dict=False)[0]
                bar.update()

        if output_type == "latent":
            images = target
        else:
            decoded = family.decode(target, height, width)  # [0, 1]
            images = self.image_processor.postprocess(decoded, output_type=output_type,
                                                      do_denormalize=[False] * decoded.shape[0])
        self.maybe_free_model_hooks()
        return MosaicFluxPipelineOutput(images=images, references=references)

    def progress_bar(self, iterable=None, total=None, disable: bool = False):
        """diffusers' progress bar, which can also be switched off per call (the pipeline's own
        `set_progress_bar_config` is kept)."""
        if not disable:
            return super().progress_bar(iterable=iterable, total=total)
        saved = dict(getattr(self, "_progress_bar_config", {}))
        self._progress_bar_config = {**saved, "disable": True}
        try:
            return super().progress_bar(iterable=iterable, total=total)
        finally:
            self._progress_bar_config = saved
