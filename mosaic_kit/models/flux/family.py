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

from .._lora_origin import check_lora_family, check_lora_fits, lora_family_metadata, recorded_lora_family
from ..family import ModelFamily, ModelInputs, check_trainable
from .lora import (
    DEFAULT_ADAPTER,
    FLUX1_COMFYUI_KEYS,
    REFERENCE_LORA_TARGETS,
    _base,
    add_reference_lora,
    load_reference_lora,
    read_lora_file,
    reference_lora_state_dict,
    scale_lora_state,
    write_lora_file,
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
    architecture = "FLUX.1"  # the model its LoRAs are made for (LoRA errors name the family that loads one)
    lora_targets = REFERENCE_LORA_TARGETS  # the reference-routed modules (a peft regex)
    config_extras = ("reference_attention", "capture_blocks", "quantize")
    encoder_components = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae")
    group_offload_types = ("leaf_level",)
    group_offload_reason = ("MosaicFluxTransformer calls the transformer's modules itself, never its forward, which "
                            "onloads what block-level groups leave outside the blocks; use leaf_level")
    default_guidance_scale = 3.5  # released inference
    samples_through_forward = True  # MosaicFluxPipeline denoises through `forward`
    comfyui_lora_keys = FLUX1_COMFYUI_KEYS

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
    def tiny(cls, seed: int = 0, transformer_overrides: dict | None = None, pixel_space: int | None = None,
             pipeline_class: type | None = None, **settings: Any) -> MosaicFluxFamily:
        """A family over a tiny random FLUX.1 pipeline (`mosaic_kit.models.flux.tiny`).

        Args:
            seed: seed of the random components.
            transformer_overrides: tiny transformer config entries to change.
            pixel_space: pixel space with this factor instead of the random VAE, or None.
            pipeline_class: the pipeline class (default diffusers' ``FluxPipeline``; the registry
                passes `mosaic_kit.pipelines.MosaicFluxPipeline`, which `sample` needs).
            **settings: the constructor's keyword arguments; ``max_sequence_length`` defaults to 32;
                ``quantize`` (a `mosaic_kit.models.quantize.QUANTIZE` setting, default ``"none"``)
                quantizes the frozen transformer (`mosaic_kit.models.quantize.quantize_transformer`).

        Returns:
            The family (progress bars off).

        Example:
            >>> MosaicFluxFamily.tiny().max_sequence_length, type(MosaicFluxFamily.tiny().pipe).__name__
            (32, 'FluxPipeline')
        """
        from .tiny import tiny_flux_components

        if pipeline_class is None:
            from diffusers import FluxPipeline

            pipeline_class = FluxPipeline
        from ..quantize import quantize_pipeline_transformer

        quantize = settings.pop("quantize", "none")
        pipe = quantize_pipeline_transformer(
            pipeline_class(**tiny_flux_components(seed=seed, transformer_overrides=transformer_overrides,
                                                  pixel_space=pixel_space)), quantize)
        pipe.set_progress_bar_config(disable=True)
        settings.setdefault("max_sequence_length", 32)
        settings.setdefault("reference_adapter", getattr(pipe, "reference_adapter", DEFAULT_ADAPTER))
        return cls(pipe, **settings)

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
            **settings: the constructor's keyword arguments; ``quantize`` (default ``"none"``)
                quantizes the transformer while it loads
                (`mosaic_kit.models.quantize.pipeline_quantization_config`).
        """
        if pipeline_class is None:
            from diffusers import FluxPipeline

            pipeline_class = FluxPipeline
        from ..quantize import quantized_loading_kwargs

        from ..encoders import encoder_loading_kwargs

        extra = quantized_loading_kwargs(settings.pop("quantize", "none"), torch_dtype)
        extra.update(encoder_loading_kwargs(cls, settings.pop("encoders", True)))
        pipe = pipeline_class.from_pretrained(path, torch_dtype=torch_dtype, **extra)
        pipe.set_progress_bar_config(disable=True)
        settings.setdefault("reference_adapter", getattr(pipe, "reference_adapter", DEFAULT_ADAPTER))
        return cls(pipe, **settings)

    @classmethod
    def bare_transformer_class(cls) -> type:
        """diffusers' ``FluxTransformer2DModel`` (see `ModelFamily.bare_transformer_class`)."""
        from diffusers import FluxTransformer2DModel

        return FluxTransformer2DModel

    @classmethod
    def bare_denoiser(cls, transformer: nn.Module, rank: int) -> MosaicFluxTransformer:
        """The released design around ``transformer``: the reference LoRA (`add_reference_lora`)
        and a `MosaicFluxTransformer` capturing from the double blocks (see `ModelFamily.bare_denoiser`)."""
        add_reference_lora(transformer, rank=rank)
        return MosaicFluxTransformer(transformer, capture_blocks="double")

    @classmethod
    def bare_model_kwargs(cls, transformer: nn.Module, target_size: int, reference_sizes: Sequence[int],
                          text_tokens: int, randn: Any) -> dict[str, Any]:
        """The released layout (`ModelFamily.bare_model_kwargs`): packed target and reference
        tokens, T5 embeddings and the pooled CLIP embedding, plain grid ids for the target,
        width-shifted ids for reference k (`reference_position_ids`).

        Example:
            >>> from mosaic_kit.models.flux.tiny import TINY_TRANSFORMER_CONFIG
            >>> transformer = MosaicFluxFamily.bare_transformer_class()(**TINY_TRANSFORMER_CONFIG)
            >>> kwargs = MosaicFluxFamily.bare_model_kwargs(transformer, 64, [32, 32], 8, torch.randn)
            >>> tuple(kwargs["target_tokens"].shape), kwargs["reference_token_counts"]
            ((1, 16, 16), (4, 4))
        """
        conf, side = transformer.config, target_size // 16
        counts = tuple((size // 16) ** 2 for size in reference_sizes)
        return {
            "target_tokens": randn(1, side * side, conf.in_channels, dtype=torch.bfloat16),
            "text_embeddings": randn(1, text_tokens, conf.joint_attention_dim, dtype=torch.bfloat16),
            "pooled_embeddings": randn(1, conf.pooled_projection_dim, dtype=torch.bfloat16),
            "timestep": randn(1, dtype=torch.bfloat16).sigmoid(),
            "target_ids": latent_image_ids(side, side), "text_ids": torch.zeros(text_tokens, 3),
            "reference_tokens": randn(1, sum(counts), conf.in_channels, dtype=torch.bfloat16),
            "reference_ids": reference_position_ids([(size, size) for size in reference_sizes]),
            "reference_token_counts": counts,
            "guidance": randn(1, dtype=torch.bfloat16) if conf.guidance_embeds else None,
        }

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
    def _encode_batch(self, batch: Any) -> ModelInputs:
        """Encodes a checked training or evaluation batch (see `ModelFamily.encode_batch`):
        conditioning in the model's dtype, the clean packed target in float32; one VAE call per
        image (`encode_image_tokens`)."""
        b, k = batch.references.shape[:2]
        prompts = self.encode_prompt_items(batch.captions)
        target = self.encode_image_tokens(batch.targets)
        references = self.encode_image_tokens(batch.references.flatten(0, 1)).unflatten(0, (b, k)) if k else None
        layout = self.token_layout(tuple(batch.targets.shape[-2:]), [tuple(batch.references.shape[-2:])] * k)
        return self.encoded_inputs(prompts, target, references, layout)

    @torch.no_grad()
    def encode_prompt_items(self, prompts: Sequence[str], references: torch.Tensor | None = None
                            ) -> list[dict[str, torch.Tensor]]:
        """`encode_prompts` per prompt: ``text_embeddings`` ``(N_txt, D_joint)`` and
        ``pooled_embeddings`` ``(D_pooled,)`` (``references`` unused).

        Example:
            >>> family = MosaicFluxFamily.tiny(max_sequence_length=8)
            >>> {k: tuple(v.shape) for k, v in family.encode_prompt_items(["a cat"])[0].items()}
            {'text_embeddings': (8, 32), 'pooled_embeddings': (32,)}
        """
        text, pooled, _ = self.encode_prompts(list(prompts))
        return [{"text_embeddings": text[b], "pooled_embeddings": pooled[b]} for b in range(len(prompts))]

    @torch.no_grad()
    def encode_image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Packed latents of images in ``[0, 1]``, one VAE call per image: ``(N, 3, H, W)`` →
        ``(N, H·W / 256, 4·C_vae)`` in the VAE's dtype."""
        return torch.cat([pack_latents(self.encode_images(images[i : i + 1])) for i in range(images.shape[0])])

    def encoded_inputs(self, prompt_items: Sequence[dict[str, torch.Tensor]], target_tokens: torch.Tensor | None,
                       reference_tokens: torch.Tensor | None, layout: Any) -> ModelInputs:
        """`ModelInputs` of the encoders' outputs (`ModelFamily.encoded_inputs`): text ids as the
        pipeline's ``encode_prompt`` makes them, target and reference ids from the layout."""
        device = self.device
        text = torch.stack([item["text_embeddings"] for item in prompt_items]).to(device)
        grid = layout.target_grid
        conditioning = {
            "text_embeddings": text,
            "pooled_embeddings": torch.stack([item["pooled_embeddings"] for item in prompt_items]).to(device),
            "text_ids": torch.zeros(text.shape[1], 3, device=device, dtype=text.dtype),
            "target_ids": latent_image_ids(grid.rows, grid.cols, device=device),
        }
        sizes = [(g.height, g.width) for g in layout.reference_grids]
        if sizes:
            conditioning.update({
                "reference_tokens": reference_tokens.flatten(1, 2).to(device),
                "reference_ids": reference_position_ids(sizes, device=device, pixels_per_token=self.pixels_per_token),
                "reference_token_counts": layout.reference_token_counts,
            })
        target = None if target_tokens is None else target_tokens.to(device).float()
        return ModelInputs(self._cast(conditioning), layout, target=target, batch_size=len(prompt_items))

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
        return ModelInputs(self._cast(conditioning), layout, batch_size=num_images_per_prompt)

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
        return ModelInputs(conditioning, inputs.layout, inputs.target, dict(inputs.extras), inputs.batch_size)

    # -- the forward -------------------------------------------------------------------------------
    def _guidance(self, guidance: float | torch.Tensor | None, batch: int) -> torch.Tensor | None:
        if not self.transformer.config.guidance_embeds:
            return None
        if guidance is None:
            raise ValueError("Expected `guidance` for a guidance-distilled transformer (guidance_embeds=True).")
        if isinstance(guidance, torch.Tensor):
            return guidance
        return torch.full((batch,), float(guidance), device=self.device)

    def _model_kwargs(
        self, inputs: ModelInputs, noisy: torch.Tensor, timestep: torch.Tensor,
        guidance: float | torch.Tensor | None = None,
    ) -> dict[str, Any]:
        """Keyword arguments of `MosaicFluxTransformer.forward` (without ``capture``), for inputs
        checked by `ModelFamily.model_kwargs`.

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

    def lora_parameters(self) -> dict[str, nn.Parameter]:
        """The reference LoRA's parameters by their file key (``transformer.<module>.lora_A.weight``).

        Example:
            >>> family = MosaicFluxFamily.tiny()
            >>> family.add_lora(rank=2)
            >>> sorted(family.lora_parameters())[0]
            'transformer.single_transformer_blocks.0.attn.to_k.lora_A.weight'
        """
        return self._adapter_lora_parameters(self.reference_adapter, "reference LoRA")

    def save_lora(self, path: str | os.PathLike, state_dict: dict[str, torch.Tensor] | None = None,
                  format: str = "diffusers") -> Path:
        """The FLUX.1 LoRA file: `save_reference_lora` (diffusers' LoRA safetensors layout,
        ``alpha / rank`` folded into ``lora_B``, with a digest, atomically), which the released
        code, `load_reference_lora` and `mosaic_kit.pipelines.MosaicFluxPipeline` load; or the same
        LoRA in ComfyUI's format (``format="comfyui"``: `FLUX1_COMFYUI_KEYS`, fused
        ``img_attn.qkv`` and ``linear1``, see `mosaic_kit.models.comfyui`).

        ComfyUI has no reference branch: it applies a LoRA to every token of its FLUX model, so
        there the reference LoRA acts on text and target tokens too (as a plain LoRA would),
        unlike mosaic_kit's multi-branch forward, which applies it to reference tokens only. The
        LoRA on the top-level ``proj_out`` that released checkpoints carry, which neither
        mosaic_kit's nor the released forward ever applies, is left out of the ComfyUI file.

        Args:
            path: the ``.safetensors`` file.
            state_dict: raw values keyed as `lora_parameters` to write instead of the model's own
                (folded the same way).
            format: ``"diffusers"`` or ``"comfyui"``.

        Returns:
            The path written.

        Raises:
            ValueError: an unknown ``format``; for ComfyUI, a path that is not a ``.safetensors``
                file or a partial fused module (`mosaic_kit.models.comfyui.diffusers_to_comfyui`).

        Example:
            >>> import tempfile
            >>> family = MosaicFluxFamily.tiny()
            >>> family.add_lora(rank=2)
            >>> file = family.save_lora(tempfile.mkdtemp() + "/lora_comfyui.safetensors", format="comfyui")
            >>> sorted(read_lora_file(file))[:2]
            ['lora_unet_double_blocks_0_img_attn_proj.alpha', 'lora_unet_double_blocks_0_img_attn_proj.lora_down.weight']
        """
        from ..comfyui import check_lora_format

        check_lora_format(format)
        if state_dict is None:
            state = reference_lora_state_dict(self.transformer, self.reference_adapter, scaled=True)
        else:
            state = scale_lora_state(self.transformer, state_dict, self.reference_adapter)
        if format == "comfyui":
            inert = ("transformer.proj_out.lora_A.weight", "transformer.proj_out.lora_B.weight")
            return self.write_comfyui_lora({k: v for k, v in state.items() if k not in inert}, path)
        return write_lora_file(state, path, metadata=lora_family_metadata(self))

    def load_lora(self, path_or_state_dict: str | os.PathLike | dict[str, torch.Tensor], partial: bool = False) -> None:
        """`load_reference_lora` (checked; released checkpoints load unchanged); a folder means its
        ``pytorch_lora_weights.safetensors``.

        A file that records another model family (`mosaic_kit.models.LORA_FAMILY_KEY`, e.g. a
        FLUX.1-Kontext LoRA, which applies to every token) is refused, after the check that its
        keys fit this transformer (a LoRA of another architecture is named as such first).

        Raises:
            ValueError: naming the file: made for another model or model family, damaged, or not
                fitting the reference-routed modules (`load_reference_lora`).
        """
        if not isinstance(path_or_state_dict, dict) and Path(path_or_state_dict).is_dir():
            path_or_state_dict = Path(path_or_state_dict) / "pytorch_lora_weights.safetensors"
        if not isinstance(path_or_state_dict, dict):
            recorded = recorded_lora_family(path_or_state_dict)
            if recorded is not None and recorded != type(self).name:  # a file of another family: which model first
                label = f"LoRA file {str(path_or_state_dict)!r}"
                check_lora_fits(read_lora_file(path_or_state_dict), self.transformer, label, self.architecture)
                check_lora_family(self, recorded, label)
        load_reference_lora(self.transformer, path_or_state_dict, adapter_name=self.reference_adapter, partial=partial)

    # -- sampling ----------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, prompt: str, references: Sequence[Any], height: int, width: int, num_inference_steps: int,
               generator: torch.Generator | None = None, guidance_scale: float | None = None,
               use_reference_cache: bool = False) -> Any:
        """One image from the family's multi-reference pipeline (`mosaic_kit.pipelines.MosaicFluxPipeline`,
        which the registry builds), with the references as given (``fit_references=False``).

        Args:
            prompt: the prompt.
            references: K square PIL images of one size (the reference side).
            height: image height in pixels.
            width: image width in pixels.
            num_inference_steps: denoising steps.
            generator: the noise generator.
            guidance_scale: None: `default_guidance_scale` (3.5, released).
            use_reference_cache: compute the references' keys and values once (see the pipeline).

        Returns:
            A PIL image.

        Raises:
            TypeError: the family's pipeline is not a multi-reference pipeline.
        """
        if not isinstance(getattr(type(self.pipe), "family", None), property):
            raise TypeError(f"Expected the family's pipeline to run K references (mosaic_kit.pipelines."
                            f"MosaicFluxPipeline, as the registry builds it), but got {type(self.pipe).__name__}.")
        self.pipe.family = self
        sizes = {getattr(r, "size", None) for r in references}
        side = next(iter(sizes))[0] if len(sizes) == 1 and None not in sizes else None
        if side is None or next(iter(sizes))[1] != side:
            raise ValueError(f"Expected `references` to be square PIL images of one size, but got sizes {sorted(map(str, sizes))}.")
        guidance = self.default_guidance_scale if guidance_scale is None else guidance_scale
        return self.pipe(prompt, list(references), height=height, width=width, ref_size=side, fit_references=False,
                         num_inference_steps=num_inference_steps, generator=generator, guidance_scale=guidance,
                         max_sequence_length=self.max_sequence_length, progress=False,
                         use_reference_cache=use_reference_cache).images[0]

    # -- decoding ----------------------------------------------------------------------------------
    @torch.no_grad()
    def _decode(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Checked packed latents (`ModelFamily.decode`) → images: unpack, undo FLUX's scale and
        shift, VAE decode.

        Args:
            latents: ``(B, N_tgt, C)`` packed latents of a ``height × width`` image.
            height: image height in pixels (multiple of `pixels_per_token`).
            width: image width in pixels.

        Returns:
            ``(B, 3, height, width)`` float32 images in ``[0, 1]``.
        """
        vae, factor = self.pipe.vae, self.vae_scale_factor
        unpacked = unpack_latents(latents, height // factor, width // factor)
        unpacked = unpacked / vae.config.scaling_factor + vae.config.shift_factor
        images = vae.decode(unpacked.to(vae.dtype), return_dict=False)[0]
        return ((images.float() + 1) / 2).clamp(0, 1)
