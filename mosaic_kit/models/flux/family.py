"""`MosaicFluxFamily`: FLUX.1 with the released multi-branch references behind the model boundary
(`mosaic_kit.models.ModelFamily`), the one owner of FLUX.1's encoding and decoding: VAE scale
and shift, 2×2 packing, position ids, prompt encoding and dtype casting."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..family import ModelFamily, ModelInputs, TokenLayout, check_trainable
from .lora import (
    DEFAULT_ADAPTER,
    _base,
    add_reference_lora,
    load_reference_lora,
    save_reference_lora,
)
from .packing import latent_image_ids, pack_latents, reference_position_ids, unpack_latents
from .transformer import MosaicFluxTransformer


class MosaicFluxFamily(ModelFamily):
    """FLUX.1 with K reference images (MOSAIC's multi-branch references, as released).

    Holds a diffusers ``FluxPipeline`` (any subclass, e.g. `mosaic_kit.pipelines.MosaicFluxPipeline`)
    for its prompt encoders and VAE, and a `MosaicFluxTransformer` over its transformer.

    Args:
        pipe: a diffusers ``FluxPipeline`` (transformer, VAE, both text encoders and tokenizers).
        reference_attention: ``"isolated"`` (released) or ``"full"`` (`MosaicFluxTransformer`).
        capture_blocks: ``"double"`` (released) or ``"all"``.
        reference_adapter: the peft adapter name of the reference LoRA.
        reference_timestep: the timestep of the reference tokens (released: 0).
        max_sequence_length: T5 tokens of a prompt (1 … 512; released: 512).

    Example:
        >>> from mosaic_kit.pipelines import tiny_mosaic_pipeline
        >>> family = MosaicFluxFamily(tiny_mosaic_pipeline(), max_sequence_length=16)
        >>> layout = family.token_layout((32, 48), [(32, 32)] * 2)
        >>> layout.target_grid.num_tokens, layout.reference_token_counts, family.token_channels
        (6, (4, 4), 16)
        >>> len(family.trainable_parameters("lora")) < len(family.trainable_parameters("all"))
        True
    """

    name = "flux1"

    def __init__(
        self,
        pipe: Any,
        reference_attention: str = "isolated",
        capture_blocks: str = "double",
        reference_adapter: str = DEFAULT_ADAPTER,
        reference_timestep: float = 0.0,
        max_sequence_length: int = 512,
    ) -> None:
        missing = [name for name in ("transformer", "vae", "encode_prompt", "vae_scale_factor") if not hasattr(pipe, name)]
        if missing:
            raise ValueError(
                f"Expected `pipe` to be a diffusers FluxPipeline (transformer, vae, encode_prompt), but "
                f"{type(pipe).__name__} has no {missing}."
            )
        length = max_sequence_length
        if isinstance(length, bool) or not isinstance(length, int) or not 1 <= length <= 512:
            raise ValueError(f"Expected `max_sequence_length` to be an int in [1, 512] (T5 tokens), but got {length!r}.")
        self.pipe = pipe
        self.max_sequence_length = length
        self._model = MosaicFluxTransformer(
            pipe.transformer, reference_attention=reference_attention, reference_timestep=reference_timestep,
            capture_blocks=capture_blocks, reference_adapter=reference_adapter,
        )

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, torch_dtype: torch.dtype | None = None, pipeline_class: type | None = None,
        **settings: Any,
    ) -> MosaicFluxFamily:
        """Loads a FLUX.1 base (a diffusers folder or hub id) and wraps it.

        Args:
            path: passed to ``pipeline_class.from_pretrained``.
            torch_dtype: the weights' dtype.
            pipeline_class: default diffusers' ``FluxPipeline``.
            **settings: the constructor's keyword arguments.
        """
        if pipeline_class is None:
            from diffusers import FluxPipeline

            pipeline_class = FluxPipeline
        return cls(pipeline_class.from_pretrained(path, torch_dtype=torch_dtype), **settings)

    # -- what the callers hold ---------------------------------------------------------------------
    @property
    def model(self) -> MosaicFluxTransformer:
        """The `MosaicFluxTransformer` (what an accelerator wraps)."""
        return self._model

    @property
    def transformer(self) -> nn.Module:
        """The stock diffusers ``FluxTransformer2DModel`` (weights and adapters)."""
        return self._model.transformer

    @property
    def reference_adapter(self) -> str:
        """The peft adapter name of the reference LoRA."""
        return self._model.reference_adapter

    @property
    def token_channels(self) -> int:
        """Channels of a packed token: 4 × the VAE's latent channels (64 for FLUX.1)."""
        return int(self.transformer.config.in_channels)

    @property
    def dtype(self) -> torch.dtype:
        """The denoiser's input dtype (its base weights'; trained LoRA weights may be float32)."""
        return _base(self._model._input_modules()["tokens"]).weight.dtype

    # -- encoding ----------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(
        self, prompts: str | Sequence[str], num_images_per_prompt: int = 1, max_sequence_length: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Both text encoders (the pipeline's ``encode_prompt``).

        Args:
            prompts: one prompt or B prompts.
            num_images_per_prompt: repeats of each prompt's embeddings.
            max_sequence_length: T5 tokens; default the family's.

        Returns:
            ``(text_embeddings (B, N_txt, D_joint), pooled (B, D_pooled), text_ids (N_txt, 3))``.
        """
        length = self.max_sequence_length if max_sequence_length is None else max_sequence_length
        prompts = list(prompts) if not isinstance(prompts, str) else prompts
        return self.pipe.encode_prompt(prompt=prompts, prompt_2=None, device=self.device,
                                       num_images_per_prompt=num_images_per_prompt, max_sequence_length=length)

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """VAE latents (latent mode, as released) with FLUX's shift and scale: the one place that
        applies them.

        Args:
            pixels: ``(N, 3, H, W)`` in ``[-1, 1]``.

        Returns:
            ``(N, C_vae, H/8, W/8)`` latents in the VAE's dtype.
        """
        vae = self.pipe.vae
        latents = vae.encode(pixels.to(self.device, vae.dtype)).latent_dist.mode()
        return (latents - vae.config.shift_factor) * vae.config.scaling_factor

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """`encode_pixels` of images in ``[0, 1]``: ``(N, 3, H, W)`` → ``(N, C_vae, H/8, W/8)``."""
        return self.encode_pixels(images.to(self.device, self.pipe.vae.dtype) * 2 - 1)

    @torch.no_grad()
    def encode_references(self, reference_pixels: torch.Tensor, num_images: int = 1) -> dict[str, Any]:
        """K references shared by every generated image → the forward's reference arguments.

        Args:
            reference_pixels: ``(K, 3, h, w)`` in ``[-1, 1]``.
            num_images: the batch the tokens are repeated to.

        Returns:
            ``reference_tokens`` ``(num_images, N_ref, C)`` (model dtype), ``reference_ids``
            ``(N_ref, 3)`` and ``reference_token_counts``.
        """
        references = self._reference_conditioning(self.encode_pixels(reference_pixels), 1, reference_pixels.shape[0])
        references["reference_tokens"] = references["reference_tokens"].expand(num_images, -1, -1)
        return self._cast(references)

    def _reference_conditioning(self, latents: torch.Tensor, batch: int, count: int) -> dict[str, Any]:
        """Packed reference tokens ``(batch, K·n, C)`` of ``(batch·K, C_vae, h, w)`` latents, with
        their position ids and token counts."""
        height, width = latents.shape[-2:]
        size = (height * self.vae_scale_factor, width * self.vae_scale_factor)
        tokens = pack_latents(latents).reshape(batch, -1, latents.shape[1] * 4)
        layout = self.token_layout(size, [size] * count)
        return {
            "reference_tokens": tokens,
            "reference_ids": reference_position_ids([size] * count, device=self.device,
                                                    pixels_per_token=self.pixels_per_token),
            "reference_token_counts": layout.reference_token_counts,
        }

    def _cast(self, conditioning: dict[str, Any]) -> dict[str, Any]:
        """Floating tensors (not the position ids) in the model's dtype."""
        dtype = self.dtype
        return {
            key: value.to(dtype) if isinstance(value, torch.Tensor) and value.is_floating_point() and "ids" not in key
            else value
            for key, value in conditioning.items()
        }

    @torch.no_grad()
    def encode_batch(self, batch: Any) -> ModelInputs:
        """Encodes a training or evaluation batch (see `ModelFamily.encode_batch`).

        Args:
            batch: ``targets`` ``(B, 3, H, W)``, ``references`` ``(B, K, 3, h, w)`` in ``[0, 1]``,
                ``captions`` (B strings); e.g. a `mosaic_kit.data.MosaicBatch`.

        Returns:
            `ModelInputs`: conditioning in the model's dtype, the clean packed target in float32.
        """
        for name in ("targets", "references", "captions"):
            if not hasattr(batch, name):
                raise ValueError(f"Expected `batch` with `targets`, `references` and `captions`, but it has no `{name}`.")
        if batch.references.ndim != 5 or batch.targets.ndim != 4:
            raise ValueError(
                f"Expected `batch.targets` (B, 3, H, W) and `batch.references` (B, K, 3, h, w), but got "
                f"{tuple(batch.targets.shape)} and {tuple(batch.references.shape)}."
            )
        text, pooled, text_ids = self.encode_prompts(batch.captions)
        target = self.encode_images(batch.targets)
        b, k = batch.references.shape[:2]
        height, width = target.shape[-2:]
        conditioning = {
            "text_embeddings": text,
            "pooled_embeddings": pooled,
            "text_ids": text_ids,
            "target_ids": latent_image_ids(height // 2, width // 2, device=self.device),
        }
        ref_size = tuple(batch.references.shape[-2:])
        if k:
            conditioning.update(self._reference_conditioning(self.encode_images(batch.references.flatten(0, 1)), b, k))
        layout = self.token_layout(tuple(batch.targets.shape[-2:]), [ref_size] * k)
        return ModelInputs(self._cast(conditioning), layout, target=pack_latents(target).float())

    @torch.no_grad()
    def encode_prompt_and_references(
        self,
        prompt: str | Sequence[str],
        reference_pixels: torch.Tensor,
        target_size: tuple[int, int],
        num_images_per_prompt: int = 1,
        max_sequence_length: int | None = None,
        reference_guidance: float | None = None,
    ) -> ModelInputs:
        """Encodes an inference request (no target image): the prompt and K references shared by
        every generated image.

        Args:
            prompt: the prompt.
            reference_pixels: ``(K, 3, h, w)`` the references in ``[-1, 1]`` (the pipeline's
                ``image_processor.preprocess``).
            target_size: ``(height, width)`` of the generated image in pixels.
            num_images_per_prompt: images generated (tokens are repeated).
            max_sequence_length: T5 tokens; default the family's.
            reference_guidance: guidance embedded for the reference stream (released: 1.0).

        Returns:
            `ModelInputs` without a target.
        """
        layout = self.token_layout(target_size, [tuple(reference_pixels.shape[-2:])] * reference_pixels.shape[0])
        text, pooled, text_ids = self.encode_prompts(prompt, num_images_per_prompt, max_sequence_length)
        references = self.encode_references(reference_pixels, num_images_per_prompt)
        height, width = target_size
        unit = self.pixels_per_token
        conditioning = {
            "text_embeddings": text, "pooled_embeddings": pooled, "text_ids": text_ids,
            "target_ids": latent_image_ids(height // unit, width // unit, device=self.device),
            **references,
        }
        if reference_guidance is not None:
            conditioning["reference_guidance"] = reference_guidance
        return ModelInputs(self._cast(conditioning), layout)

    @torch.no_grad()
    def cache_references(self, inputs: ModelInputs, guidance: float | torch.Tensor | None = None) -> ModelInputs:
        """The same inputs with the references replaced by their keys and values, computed once
        with references attending only to themselves (`MosaicFluxTransformer.build_reference_cache`).

        Args:
            inputs: from `encode_prompt_and_references`.
            guidance: the guidance scale (used for the references when no reference guidance was set).

        Returns:
            New `ModelInputs` whose forward reuses the cache at every step.
        """
        conditioning = dict(inputs.conditioning)
        batch = conditioning["pooled_embeddings"].shape[0]
        cache = self._model.build_reference_cache(
            conditioning.pop("reference_tokens"), conditioning.pop("reference_ids"), conditioning["pooled_embeddings"],
            conditioning.pop("reference_token_counts"), guidance=self._guidance(guidance, batch),
            reference_guidance=conditioning.get("reference_guidance"),
        )
        conditioning["reference_cache"] = cache
        return ModelInputs(conditioning, inputs.layout, inputs.target, dict(inputs.extras))

    # -- noising -----------------------------------------------------------------------------------
    def shift_mu(self, layout: TokenLayout) -> float:
        """FLUX's resolution shift: diffusers' ``calculate_shift`` over the target's tokens with the
        scheduler's settings (FLUX.1: 0.5 at 256 tokens, 1.15 at 4096)."""
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        config = getattr(getattr(self.pipe, "scheduler", None), "config", None) or {}
        return calculate_shift(
            layout.target_grid.num_tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5), config.get("max_shift", 1.15),
        )

    # -- the forward -------------------------------------------------------------------------------
    def _guidance(self, guidance: float | torch.Tensor | None, batch: int) -> torch.Tensor | None:
        if not self.transformer.config.guidance_embeds:
            return None
        if guidance is None:
            raise ValueError("Expected `guidance` for a guidance-distilled transformer (guidance_embeds=True).")
        if isinstance(guidance, torch.Tensor):
            return guidance
        return torch.full((batch,), float(guidance), device=self.device)

    def model_kwargs(
        self, inputs: ModelInputs, noisy: torch.Tensor, timestep: torch.Tensor,
        guidance: float | torch.Tensor | None = None,
    ) -> dict[str, Any]:
        """Keyword arguments of `MosaicFluxTransformer.forward` (without ``capture``).

        Args:
            inputs: from `encode_batch` or `encode_prompt_and_references`.
            noisy: ``(B, N_tgt, C)`` noisy packed target latents.
            timestep: ``(B,)`` flow-matching time in ``[0, 1]``.
            guidance: the guidance scale (a number, or a ``(B,)`` tensor used as it is); ignored when
                the transformer has no guidance embedding, required when it has one.
        """
        dtype = self.dtype
        kwargs = dict(inputs.conditioning)
        kwargs.update(target_tokens=noisy.to(dtype), timestep=timestep.to(dtype),
                      guidance=self._guidance(guidance, noisy.shape[0]))
        return kwargs

    # -- trainable parameters and the LoRA -----------------------------------------------------------
    def add_lora(self, rank: int, alpha: float | None = None) -> None:
        """A fresh reference LoRA (`add_reference_lora`); base weights frozen."""
        add_reference_lora(self.transformer, rank=rank, alpha=alpha, adapter_name=self.reference_adapter)

    def trainable_parameters(self, trainable: str = "lora") -> list[nn.Parameter]:
        """``"lora"``: the reference LoRA's parameters; ``"all"``: every transformer parameter.

        Raises:
            ValueError: ``trainable`` is not in `TRAINABLE`, or ``"lora"`` without a reference LoRA.
        """
        check_trainable(trainable)
        named = list(self.transformer.named_parameters())
        if trainable == "all":
            return [param for _, param in named]
        adapter = f".{self.reference_adapter}."
        chosen = [param for name, param in named if ".lora_" in name and adapter in name]
        if not chosen:
            raise ValueError(
                f"Expected a reference LoRA {self.reference_adapter!r} on the transformer for trainable='lora', but it "
                "has none (call `add_lora` or `load_lora` first)."
            )
        return chosen

    def save_lora(self, path: str | os.PathLike) -> Path:
        """`save_reference_lora`: diffusers' LoRA safetensors layout, with a digest, atomically."""
        return save_reference_lora(self.transformer, path, adapter_name=self.reference_adapter)

    def load_lora(self, path_or_state_dict: str | os.PathLike | dict[str, torch.Tensor], partial: bool = False) -> None:
        """`load_reference_lora` (checked; released checkpoints load unchanged)."""
        load_reference_lora(self.transformer, path_or_state_dict, adapter_name=self.reference_adapter, partial=partial)

    # -- decoding ----------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Packed latents → images: unpack, undo FLUX's scale and shift, VAE decode.

        Args:
            latents: ``(B, N_tgt, C)`` packed latents of a ``height × width`` image.
            height: image height in pixels (multiple of `pixels_per_token`).
            width: image width in pixels.

        Returns:
            ``(B, 3, height, width)`` float32 images in ``[0, 1]``.
        """
        self.token_layout((height, width), ())  # checks the size
        vae, factor = self.pipe.vae, self.vae_scale_factor
        unpacked = unpack_latents(latents, height // factor, width // factor)
        unpacked = unpacked / vae.config.scaling_factor + vae.config.shift_factor
        images = vae.decode(unpacked.to(vae.dtype), return_dict=False)[0]
        return ((images.float() + 1) / 2).clamp(0, 1)
