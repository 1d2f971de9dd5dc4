"""`KontextFamily`: FLUX.1-Kontext with K references, on the in-sequence base."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ...utils.checks import check_int, check_option
from ..family import ModelInputs, TokenLayout
from ..insequence import InSequenceFamily
from .positions import REFERENCE_METHODS, kontext_reference_ids

__all__ = ["KONTEXT_LORA_TARGETS", "KontextFamily"]

KONTEXT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                        "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp")
"""Default LoRA targets (linear-module name suffixes): attention, feed-forward and ``proj_mlp`` projections."""


class KontextFamily(InSequenceFamily):
    """FLUX.1-Kontext behind the model boundary, laid out as the stock `FluxKontextPipeline` lays
    out its reference (``[target | ref 1 | … | ref K]``, one plain peft LoRA), with the position
    method of several references chosen as in ComfyUI (`kontext_reference_ids`).

    Args:
        pipe: a `diffusers.FluxKontextPipeline`.
        capture_blocks: ``"all"``, ``"double"`` or a list of block names.
        reference_method: ``"offset"``, ``"index"`` or ``"uxo"`` (`REFERENCE_METHODS`).
        max_sequence_length: T5 prompt tokens.

    Raises:
        ValueError: a pipeline without a `FluxTransformer2DModel`, or a bad option (naming it).

    Example:
        >>> family = KontextFamily.tiny(reference_method="index")
        >>> inputs = family.encode(torch.rand(1, 3, 32, 32), ["a cat"], torch.rand(1, 2, 3, 16, 16))
        >>> inputs.conditioning["reference_ids"].tolist()  # reference k at index k, no offset
        [[1.0, 0.0, 0.0], [2.0, 0.0, 0.0]]
        >>> tuple(family.forward(inputs, torch.randn(1, 4, 16), torch.tensor([0.5])).shape)
        (1, 4, 16)
    """

    name = "kontext"
    config_extras = ("capture_blocks", "quantize")
    lora_targets = KONTEXT_LORA_TARGETS
    architecture = "FLUX.1"
    pipeline_class_name = "FluxKontextPipeline"
    transformer_class_name = "FluxTransformer2DModel"
    tiny_defaults = {"max_sequence_length": 32}
    encoder_components = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae")
    family_options = {"reference_method": REFERENCE_METHODS}  # model.family_options / --family-option

    def __init__(self, pipe: Any, capture_blocks: str | Sequence[str] = "all", reference_method: str = "offset",
                 max_sequence_length: int = 512) -> None:
        check_option("reference_method", reference_method, REFERENCE_METHODS)
        super().__init__(pipe, capture_blocks)
        self.reference_method = reference_method
        self.max_sequence_length = check_int("max_sequence_length", max_sequence_length, minimum=1)

    @staticmethod
    def tiny_components(seed: int, transformer_overrides: dict | None, pixel_space: int | None) -> dict[str, Any]:
        """FLUX.1's tiny random components (`mosaic_kit.models.flux.tiny`): Kontext's architecture."""
        from ..flux.tiny import tiny_flux_components

        return tiny_flux_components(seed=seed, transformer_overrides=transformer_overrides, pixel_space=pixel_space)

    # -- encoding: the stock pipeline's steps ------------------------------------------------------------
    @torch.no_grad()
    def encode_image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` in [0, 1] → ``(N, H·W / 256, C)``: ``_encode_vae_image`` (mode), ``_pack_latents``,
        one image per call (as the stock pipeline encodes its one image; a batch may differ in the last bits)."""
        vae, tokens = self.pipe.vae, []
        for i in range(images.shape[0]):
            grid = self.pipe._encode_vae_image(image=(images[i : i + 1] * 2 - 1).to(vae.device, vae.dtype), generator=None)
            tokens.append(self.pipe._pack_latents(grid, *grid.shape))
        return torch.cat(tokens)

    @torch.no_grad()
    def encode_prompt_items(self, prompts: Sequence[str], references: torch.Tensor | None = None
                            ) -> list[dict[str, torch.Tensor]]:
        """The pipeline's ``encode_prompt`` per prompt: ``encoder_hidden_states`` ``(L, D)`` and
        ``pooled_projections`` ``(D_pooled,)`` (``references`` unused)."""
        text, pooled, _ = self.pipe.encode_prompt(prompt=list(prompts), prompt_2=None, device=self.device,
                                                  max_sequence_length=self.max_sequence_length)
        return [{"encoder_hidden_states": text[b], "pooled_projections": pooled[b]} for b in range(len(prompts))]

    @staticmethod
    def _reference_ids(layout: TokenLayout, method: str) -> torch.Tensor:
        grids = [(g.rows, g.cols) for g in layout.reference_grids]
        return kontext_reference_ids((layout.target_grid.rows, layout.target_grid.cols), grids, method)

    def encoded_inputs(self, prompt_items: Sequence[dict[str, torch.Tensor]], target_tokens: torch.Tensor | None,
                       reference_tokens: torch.Tensor | None, layout: TokenLayout) -> ModelInputs:
        """`ModelInputs` of the encoders' outputs (`ModelFamily.encoded_inputs`), with the ids the
        pipeline makes (text ids of zeros, latent ids, reference ids by ``reference_method``)."""
        device, dtype, grid = self.device, self.transformer.dtype, layout.target_grid
        text = torch.stack([item["encoder_hidden_states"] for item in prompt_items]).to(device)
        pooled = torch.stack([item["pooled_projections"] for item in prompt_items]).to(device)
        cond = {"encoder_hidden_states": text.to(dtype), "pooled_projections": pooled.to(dtype),
                "txt_ids": torch.zeros(text.shape[1], 3, device=device, dtype=text.dtype),
                "latent_ids": self.pipe._prepare_latent_image_ids(None, grid.rows, grid.cols, device, text.dtype),
                "reference_tokens": None, "reference_ids": None}
        if layout.reference_grids:
            cond["reference_tokens"] = reference_tokens.to(device).flatten(1, 2).to(dtype)
            cond["reference_ids"] = self._reference_ids(layout, self.reference_method).to(device, text.dtype)
        target = None if target_tokens is None else target_tokens.to(device).float()
        return self.encoded(cond, layout, target, len(prompt_items))

    def _transformer_kwargs(self, inputs: ModelInputs, noisy: torch.Tensor, timestep: torch.Tensor,
                            guidance: float | torch.Tensor | None = None) -> dict[str, Any]:
        """Text, pooled text, text ids, the timestep in [0, 1] (the pipeline's ``t / 1000``) and the
        embedded guidance (None: `default_guidance_scale`)."""
        cond = inputs.conditioning
        return {"encoder_hidden_states": cond["encoder_hidden_states"], "pooled_projections": cond["pooled_projections"],
                "txt_ids": cond["txt_ids"], "timestep": timestep.to(self.transformer.dtype),
                "guidance": self.embedded_guidance(guidance, self.default_guidance_scale, noisy)}

    # -- sampling: the stock loop with K references ----------------------------------------------------
    @torch.no_grad()
    def sample(self, prompt: str, references: Sequence[Any], height: int, width: int, num_inference_steps: int = 28,
               generator: torch.Generator | None = None, guidance_scale: float | None = None,
               reference_method: str | None = None) -> Any:
        """One image with K references placed by ``reference_method`` (None: the family's), through the
        stock `FluxKontextPipeline`'s steps and loop; with one reference it equals the stock pipeline
        called with ``_auto_resize=False, max_area=height * width``.

        Args:
            prompt: the prompt.
            references: PIL images, each side a multiple of 16 (used at their own size).
            height: image height in pixels (a multiple of 16).
            width: image width in pixels.
            num_inference_steps: Euler steps.
            generator: the noise generator.
            guidance_scale: embedded guidance (None: `default_guidance_scale`).
            reference_method: ``"offset"``, ``"index"`` or ``"uxo"``, or None.

        Returns:
            A PIL image.
        """
        import numpy as np
        from diffusers.pipelines.flux.pipeline_flux_kontext import retrieve_timesteps

        from ..family import resolution_shift_mu

        pipe, device, method = self.pipe, self.device, reference_method or self.reference_method
        layout = self.token_layout((height, width), [(r.height, r.width) for r in references])
        text, pooled, text_ids = pipe.encode_prompt(prompt=[prompt], prompt_2=None, device=device,
                                                    max_sequence_length=self.max_sequence_length)
        latents, _, latent_ids, _ = pipe.prepare_latents(None, 1, self.token_channels // 4, height, width, text.dtype,
                                                         device, generator)
        hidden_refs = [pipe._pack_latents(grid, *grid.shape) for grid in (
            pipe._encode_vae_image(pipe.image_processor.preprocess(r, r.height, r.width).to(device, text.dtype), None)
            for r in references)]
        ids = torch.cat([latent_ids, self._reference_ids(layout, method).to(latent_ids)]) if references else latent_ids
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        mu = resolution_shift_mu(latents.shape[1], pipe.scheduler.config)
        timesteps, _ = retrieve_timesteps(pipe.scheduler, num_inference_steps, device, sigmas=sigmas, mu=mu)
        guidance = self.embedded_guidance(guidance_scale, self.default_guidance_scale, latents)
        pipe.scheduler.set_begin_index(0)
        for t in timesteps:
            prediction = self.transformer(
                hidden_states=torch.cat([latents, *hidden_refs], dim=1), timestep=t.expand(1).to(latents.dtype) / 1000,
                guidance=guidance, pooled_projections=pooled, encoder_hidden_states=text, txt_ids=text_ids, img_ids=ids,
                joint_attention_kwargs={}, return_dict=False)[0][:, : latents.shape[1]]
            latents = pipe.scheduler.step(prediction, t, latents, return_dict=False)[0]
        return pipe.image_processor.postprocess(self._vae_decode(latents, height, width), output_type="pil")[0]

    # -- decoding ----------------------------------------------------------------------------------------
    def _vae_decode(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        vae = self.pipe.vae
        grid = self.pipe._unpack_latents(latents, height, width, self.vae_scale_factor)
        return vae.decode((grid / vae.config.scaling_factor + vae.config.shift_factor).to(vae.dtype), return_dict=False)[0]

    @torch.no_grad()
    def _decode(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Checked packed latents → ``(B, 3, H, W)`` float32 in [0, 1], as the pipeline decodes."""
        return (self._vae_decode(latents, height, width).float() / 2 + 0.5).clamp(0, 1)
