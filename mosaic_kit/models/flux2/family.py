"""`Flux2Family`: FLUX.2 behind the model boundary, its inputs built by the stock pipeline's own
encoding steps."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from ..family import ModelInputs
from ..insequence import IN_SEQUENCE_LORA_FILE, InSequenceFamily
from .denoiser import Flux2Denoiser
from .lora import FLUX2_COMFYUI_KEYS, FLUX2_LORA_TARGETS

__all__ = ["FLUX2_LORA_FILE", "FLUX2_REFERENCE_TIME_SCALE", "Flux2Family"]

FLUX2_REFERENCE_TIME_SCALE = 10
"""Time-axis offset between references in FLUX.2's position ids (the pipelines' ``scale``)."""

FLUX2_LORA_FILE = IN_SEQUENCE_LORA_FILE
"""The file name `Flux2Family.save_lora` writes (diffusers' default weight name)."""


class Flux2Family(InSequenceFamily):
    """The FLUX.2 model family behind the model boundary (`ModelFamily`), on the in-sequence base
    (`mosaic_kit.models.insequence.InSequenceFamily`: the forward with MOSAIC's capture, the
    layout and the plain LoRA): encoding and decoding over a stock `Flux2KleinPipeline` (or
    `Flux2Pipeline`).

    One owner for FLUX.2's encoding and decoding: prompts through the pipeline's
    ``encode_prompt`` (Qwen3 hidden states of ``text_encoder_out_layers``), images through the
    pipeline's ``_encode_vae_image`` (distribution mode, 2×2 patchify, batch-norm
    normalisation), ids through its ``_prepare_latent_ids`` / ``_prepare_image_ids``, so a batch is
    encoded exactly as the stock pipeline encodes its references (tested against a pipeline call).

    Args:
        pipe: a `diffusers.Flux2KleinPipeline` or `diffusers.Flux2Pipeline`.
        capture_blocks: ``"all"`` (every block, eq. 8), ``"double"`` (the double-stream blocks),
            or a list of block names (``"transformer_blocks.0"``, ``"single_transformer_blocks.3"``).
        max_sequence_length: prompt tokens (the pipelines pad to 512).
        text_encoder_out_layers: encoder layers stacked into the prompt embedding; None: the
            pipeline's default (``(9, 18, 27)`` for [klein], ``(10, 20, 30)`` for [dev]).
        guidance: the embedded guidance when the transformer has a guidance embedding ([dev]);
            ignored by [klein], which has none.

    Raises:
        ValueError: on a pipeline without a FLUX.2 transformer or a bad option.

    Example:
        >>> from mosaic_kit.models.flux2.tiny import TINY_FLUX2_TEXT_OUT_LAYERS, tiny_flux2_pipeline
        >>> family = Flux2Family(tiny_flux2_pipeline(), max_sequence_length=16,
        ...     text_encoder_out_layers=TINY_FLUX2_TEXT_OUT_LAYERS)
        >>> inputs = family.encode(torch.rand(2, 3, 32, 32), ["a cat", "a dog"], torch.rand(2, 2, 3, 16, 16))
        >>> tuple(inputs.target.shape), inputs.layout.reference_token_counts
        ((2, 4, 16), (1, 1))
        >>> inputs.conditioning["reference_ids"][0, :, 0].tolist()  # T = 10·(k + 1)
        [10, 20]
        >>> tuple(family.forward(inputs, torch.randn(2, 4, 16), torch.tensor([0.5, 0.5])).shape)
        (2, 4, 16)
    """

    name = "flux2"
    config_extras = ("capture_blocks", "quantize")
    comfyui_lora_keys = FLUX2_COMFYUI_KEYS
    default_guidance_scale = 4.0
    min_sample_reference_side = 64
    min_sample_reference_reason = ("the stock FLUX.2 pipeline's image processor refuses references with a side under "
                                   "64 px (diffusers' Flux2ImageProcessor.check_image_input)")
    lora_targets = FLUX2_LORA_TARGETS
    architecture = "FLUX.2"
    denoiser_class = Flux2Denoiser

    def __init__(
        self,
        pipe: Any,
        capture_blocks: str | Sequence[str] = "all",
        max_sequence_length: int = 512,
        text_encoder_out_layers: Sequence[int] | None = None,
        guidance: float = 4.0,
    ) -> None:
        from diffusers import Flux2Transformer2DModel

        if not isinstance(getattr(pipe, "transformer", None), Flux2Transformer2DModel):
            raise ValueError(
                f"Expected `pipe` with a Flux2Transformer2DModel (Flux2KleinPipeline or Flux2Pipeline), but got "
                f"{type(pipe).__name__}."
            )
        if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, int) or max_sequence_length < 1:
            raise ValueError(f"Expected `max_sequence_length` to be a positive int, but got {max_sequence_length!r}.")
        super().__init__(pipe, capture_blocks)
        self.max_sequence_length = max_sequence_length
        self.text_encoder_out_layers = None if text_encoder_out_layers is None else tuple(text_encoder_out_layers)
        self.guidance = float(guidance)

    # -- building ----------------------------------------------------------------------------------
    @classmethod
    def tiny(cls, seed: int = 0, transformer_overrides: dict | None = None, pixel_space: int | None = None,
             pipeline_class: type | None = None, **kwargs: Any) -> Flux2Family:
        """A family over a tiny random `Flux2KleinPipeline` (`mosaic_kit.models.flux2.tiny`).

        Args:
            seed: seed of the random components.
            transformer_overrides: tiny transformer config entries to change.
            pixel_space: pixel space with this factor instead of the random autoencoder
                (`mosaic_kit.models.flux2.tiny.Flux2PixelAutoencoder`), or None.
            pipeline_class: the pipeline class (default the stock `Flux2KleinPipeline`).
            **kwargs: `Flux2Family` options; ``text_encoder_out_layers`` defaults to the tiny
                encoder's ``(1, 2, 3)`` and ``max_sequence_length`` to 32; ``quantize`` (a
                `mosaic_kit.models.quantize.QUANTIZE` setting, default ``"none"``) quantizes the
                frozen transformer (`mosaic_kit.models.quantize.quantize_transformer`).

        Returns:
            The family.

        Example:
            >>> Flux2Family.tiny().transformer.config.num_layers
            1
        """
        from .tiny import TINY_FLUX2_TEXT_OUT_LAYERS, tiny_flux2_components

        if pipeline_class is None:
            from diffusers import Flux2KleinPipeline

            pipeline_class = Flux2KleinPipeline
        from ..quantize import quantize_pipeline_transformer

        quantize = kwargs.pop("quantize", "none")
        pipe = quantize_pipeline_transformer(
            pipeline_class(**tiny_flux2_components(seed=seed, transformer_overrides=transformer_overrides,
                                                   pixel_space=pixel_space)), quantize)
        pipe.set_progress_bar_config(disable=True)
        kwargs.setdefault("text_encoder_out_layers", TINY_FLUX2_TEXT_OUT_LAYERS)
        kwargs.setdefault("max_sequence_length", 32)
        return cls(pipe, **kwargs)

    @classmethod
    def from_pretrained(cls, base: str | os.PathLike, torch_dtype: torch.dtype | None = torch.bfloat16,
                        pipeline_class: type | None = None, **kwargs: Any) -> Flux2Family:
        """A family over a FLUX.2 pipeline from the hub or a local folder.

        Args:
            base: hub id (``"black-forest-labs/FLUX.2-klein-4B"``) or a local pipeline folder; its
                ``model_index.json`` picks `Flux2KleinPipeline` or `Flux2Pipeline`.
            torch_dtype: weight dtype of the frozen components.
            pipeline_class: the pipeline class; None: the one the base's ``model_index.json`` names.
            **kwargs: `Flux2Family` options; ``quantize`` (default ``"none"``) quantizes the
                transformer while it loads (`mosaic_kit.models.quantize.pipeline_quantization_config`).

        Returns:
            The family.

        Example:
            >>> import tempfile
            >>> folder = tempfile.mkdtemp()
            >>> Flux2Family.tiny().pipe.save_pretrained(folder)
            >>> family = Flux2Family.from_pretrained(folder, torch_dtype=torch.float32, text_encoder_out_layers=(1, 2, 3))
            >>> type(family.pipe).__name__
            'Flux2KleinPipeline'
        """
        if pipeline_class is None:
            from diffusers import DiffusionPipeline

            pipeline_class = DiffusionPipeline
        from ..quantize import quantized_loading_kwargs

        from ..encoders import encoder_loading_kwargs

        extra = quantized_loading_kwargs(kwargs.pop("quantize", "none"), torch_dtype)
        extra.update(encoder_loading_kwargs(cls, kwargs.pop("encoders", True)))  # False: cached conditioning
        pipe = pipeline_class.from_pretrained(base, dtype=torch_dtype, **extra)
        pipe.set_progress_bar_config(disable=True)
        return cls(pipe, **kwargs)

    # -- encoding ----------------------------------------------------------------------------------
    @classmethod
    def bare_transformer_class(cls) -> type:
        """diffusers' ``Flux2Transformer2DModel`` (see `ModelFamily.bare_transformer_class`)."""
        from diffusers import Flux2Transformer2DModel

        return Flux2Transformer2DModel

    @classmethod
    def bare_model_kwargs(cls, transformer: torch.nn.Module, target_size: int, reference_sizes: Sequence[int],
                          text_tokens: int, randn: Any) -> dict[str, Any]:
        """The stock pipelines' layout (`ModelFamily.bare_model_kwargs`): ``hidden_states``
        ``[target | ref 1 | … | ref K]`` with ids ``(T, h, w, 0)``, T = 0 for the target and
        `FLUX2_REFERENCE_TIME_SCALE` · k for reference k (1-based); text ids ``(0, 0, 0, l)``.

        Example:
            >>> from mosaic_kit.models.flux2.tiny import TINY_FLUX2_TRANSFORMER_CONFIG
            >>> transformer = Flux2Family.bare_transformer_class()(**TINY_FLUX2_TRANSFORMER_CONFIG)
            >>> kwargs = Flux2Family.bare_model_kwargs(transformer, 64, [32], 8, torch.randn)
            >>> tuple(kwargs["hidden_states"].shape), kwargs["sequence_layout"].ref_tokens
            ((1, 20, 16), (4,))
        """
        from ..insequence import SequenceLayout

        conf, side = transformer.config, target_size // 16

        def grid(t: int, n: int) -> torch.Tensor:
            return torch.cartesian_prod(torch.tensor([t]), torch.arange(n), torch.arange(n), torch.tensor([0]))

        parts = [grid(0, side)] + [grid(FLUX2_REFERENCE_TIME_SCALE * (k + 1), size // 16)
                                   for k, size in enumerate(reference_sizes)]
        ref_tokens = [(size // 16) ** 2 for size in reference_sizes]
        txt_ids = torch.cartesian_prod(torch.tensor([0]), torch.tensor([0]), torch.tensor([0]), torch.arange(text_tokens))
        return {
            "hidden_states": randn(1, side * side + sum(ref_tokens), conf.in_channels, dtype=torch.bfloat16),
            "img_ids": torch.cat(parts)[None],
            "encoder_hidden_states": randn(1, text_tokens, conf.joint_attention_dim, dtype=torch.bfloat16),
            "txt_ids": txt_ids[None], "timestep": randn(1, dtype=torch.bfloat16).sigmoid(),
            "guidance": randn(1, dtype=torch.float32) if conf.guidance_embeds else None,
            "sequence_layout": SequenceLayout.concatenated(side * side, ref_tokens),
        }

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt embeddings and text ids through the pipeline's ``encode_prompt``.

        Args:
            prompts: B prompts.

        Returns:
            ``(prompt_embeds (B, L, D), text_ids (B, L, 4))``.

        Example:
            >>> embeds, ids = Flux2Family.tiny(max_sequence_length=8).encode_prompts(["a cat"])
            >>> tuple(embeds.shape), ids[0, :3].tolist()
            ((1, 8, 96), [[0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 2]])
        """
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"Expected `prompts` to be a list of strings, but got {prompts!r}.")
        kwargs = {} if self.text_encoder_out_layers is None else {"text_encoder_out_layers": self.text_encoder_out_layers}
        return self.pipe.encode_prompt(list(prompts), device=self.device, max_sequence_length=self.max_sequence_length,
                                       **kwargs)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised, patchified latents of images, as the pipelines encode references.

        Args:
            images: ``(N, 3, H, W)`` float in ``[0, 1]``, ``H`` and ``W`` multiples of 16.

        Returns:
            ``(N, 4·C_latent, H / 16, W / 16)`` in the autoencoder's dtype (one autoencoder call
            per image, as the pipelines encode references, so the values are theirs bit for bit).

        Example:
            >>> tuple(Flux2Family.tiny().encode_images(torch.rand(1, 3, 32, 48)).shape)
            (1, 16, 2, 3)
        """
        multiple = self.pixels_per_token
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"Expected `images` of shape (N, 3, H, W), but got {getattr(images, 'shape', type(images))}.")
        if images.shape[-2] % multiple or images.shape[-1] % multiple:
            raise ValueError(f"Expected `images` with H and W multiples of {multiple}, but got {tuple(images.shape[-2:])}.")
        vae = self.pipe.vae
        # channels-last, one image per autoencoder call: the memory layout and batching of the
        # pipelines' references (their preprocessing goes through an H×W×C array), because a
        # convolution over another layout or batch may differ in the last bits, and the encoding
        # must equal the stock pipeline's exactly
        pixels = (images.to(vae.device, vae.dtype) * 2 - 1).contiguous(memory_format=torch.channels_last)
        return torch.cat([self.pipe._encode_vae_image(image=pixels[i : i + 1], generator=None)
                          for i in range(pixels.shape[0])])

    @torch.no_grad()
    def encode_prompt_items(self, prompts: Sequence[str], references: torch.Tensor | None = None
                            ) -> list[dict[str, torch.Tensor]]:
        """`encode_prompts` per prompt: ``encoder_hidden_states`` ``(L, D)`` and ``txt_ids``
        ``(L, 4)`` (``references`` unused).

        Example:
            >>> item = Flux2Family.tiny(max_sequence_length=8).encode_prompt_items(["a cat"])[0]
            >>> {name: tuple(value.shape) for name, value in item.items()}
            {'encoder_hidden_states': (8, 96), 'txt_ids': (8, 4)}
        """
        embeds, ids = self.encode_prompts(prompts)
        return [{"encoder_hidden_states": embeds[b], "txt_ids": ids[b]} for b in range(len(prompts))]

    @torch.no_grad()
    def encode_image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """`encode_images` packed as the pipelines pack them: ``(N, 3, H, W)`` → ``(N, H·W / 256, C)``."""
        return self.pipe._pack_latents(self.encode_images(images))

    def encoded_inputs(self, prompt_items: Sequence[dict[str, torch.Tensor]], target_tokens: torch.Tensor | None,
                       reference_tokens: torch.Tensor | None, layout: Any) -> ModelInputs:
        """`ModelInputs` of the encoders' outputs (`ModelFamily.encoded_inputs`), ids through the
        pipeline's ``_prepare_latent_ids`` / ``_prepare_image_ids`` (they read only shapes)."""
        pipe, device, dtype, b = self.pipe, self.device, self.transformer.dtype, len(prompt_items)
        grid = layout.target_grid
        latent_ids = pipe._prepare_latent_ids(torch.zeros(b, 1, grid.rows, grid.cols)).to(device)
        reference_ids = None
        if layout.reference_grids:
            shapes = [torch.zeros(1, 1, g.rows, g.cols) for g in layout.reference_grids]
            reference_ids = pipe._prepare_image_ids(shapes).expand(b, -1, -1).to(device)
            reference_tokens = reference_tokens.flatten(1, 2).to(device, dtype)
        conditioning = {
            "encoder_hidden_states": torch.stack([item["encoder_hidden_states"] for item in prompt_items]).to(device, dtype),
            "txt_ids": torch.stack([item["txt_ids"] for item in prompt_items]).to(device), "latent_ids": latent_ids,
            "reference_tokens": reference_tokens if layout.reference_grids else None, "reference_ids": reference_ids}
        target = None if target_tokens is None else target_tokens.to(device, torch.float32)
        return self.encoded(conditioning, layout, target, b)

    # -- noising and the forward -------------------------------------------------------------------
    def _transformer_kwargs(self, inputs: ModelInputs, noisy: torch.Tensor, timestep: torch.Tensor,
                            guidance: float | torch.Tensor | None = None) -> dict[str, Any]:
        """The stock transformer's keyword arguments besides ``hidden_states`` and ``img_ids``
        (`InSequenceFamily.model_kwargs` adds those and the ``sequence_layout``), built as the
        pipelines build them.

        Args:
            inputs: the encoded batch.
            noisy: ``(B, N_tgt, C)`` noisy target tokens.
            timestep: ``(B,)`` flow-matching time in ``[0, 1]`` (the pipelines pass ``t / 1000``).
            guidance: embedded guidance for [dev] (None: the family's ``guidance``); [klein] has
                no guidance embedding and gets None.

        Returns:
            ``encoder_hidden_states``, ``txt_ids``, ``timestep``, ``guidance``.

        Example:
            >>> family = Flux2Family.tiny()
            >>> inputs = family.encode(torch.rand(1, 3, 32, 32), ["a"], torch.rand(1, 1, 3, 16, 16))
            >>> kwargs = family.model_kwargs(inputs, inputs.target, torch.tensor([1.0]))
            >>> tuple(kwargs["hidden_states"].shape), tuple(kwargs["img_ids"].shape), kwargs["guidance"]
            ((1, 5, 16), (1, 5, 4), None)
        """
        cond, dtype = inputs.conditioning, self.transformer.dtype
        return {"encoder_hidden_states": cond["encoder_hidden_states"].to(dtype), "txt_ids": cond["txt_ids"],
                "timestep": timestep.to(dtype), "guidance": self.embedded_guidance(guidance, self.guidance, noisy)}

    # -- sampling ----------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, prompt: str, references: Sequence[Any], height: int, width: int, num_inference_steps: int = 4,
               generator: torch.Generator | None = None, guidance_scale: float | None = None) -> Any:
        """One image from the stock pipeline's ``__call__`` (the LoRA as loaded), for validation
        sheets and evaluation: what a user of the stock pipeline gets.

        Args:
            prompt: the prompt.
            references: PIL images (each side at least 64 px, the pipelines' minimum), or none.
            height: image height in pixels (a multiple of 16).
            width: image width in pixels.
            num_inference_steps: denoising steps ([klein] is distilled to 4).
            generator: the noise generator.
            guidance_scale: classifier-free guidance of [klein] base / embedded guidance of [dev];
                ignored by distilled [klein]; None: `default_guidance_scale` (4.0).

        Returns:
            A PIL image.

        Example:
            >>> from PIL import Image
            >>> family = Flux2Family.tiny()
            >>> family.sample("a cat", [Image.new("RGB", (64, 64), "red")], 32, 32, num_inference_steps=1).size
            (32, 32)
        """
        kwargs = {} if self.text_encoder_out_layers is None else {"text_encoder_out_layers": self.text_encoder_out_layers}
        out = self.pipe(image=list(references) or None, prompt=prompt, height=height, width=width,
                        num_inference_steps=num_inference_steps, generator=generator,
                        guidance_scale=self.default_guidance_scale if guidance_scale is None else guidance_scale,
                        max_sequence_length=self.max_sequence_length, **kwargs)
        return out.images[0]

    # -- decoding ----------------------------------------------------------------------------------
    @torch.no_grad()
    def _decode(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Checked target tokens (`ModelFamily.decode`) to images, as the pipelines decode:
        unpack, undo the batch-norm normalisation, unpatchify, decode.

        Args:
            latents: ``(B, N_tgt, C)`` packed tokens.
            height: image height in pixels (a multiple of 16).
            width: image width in pixels.

        Returns:
            ``(B, 3, height, width)`` float32 in ``[0, 1]``.

        Example:
            >>> family = Flux2Family.tiny()
            >>> inputs = family.encode(torch.rand(1, 3, 32, 48), ["a"])
            >>> tuple(family.decode(inputs.target, 32, 48).shape)
            (1, 3, 32, 48)
        """
        pipe, vae = self.pipe, self.pipe.vae
        grid = self.token_layout((height, width), []).target_grid
        rows, cols = grid.rows, grid.cols
        grid = latents.transpose(1, 2).reshape(latents.shape[0], latents.shape[2], rows, cols).to(vae.dtype)
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(grid)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(grid)
        grid = pipe._unpatchify_latents(grid * std + mean)
        images = vae.decode(grid, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

