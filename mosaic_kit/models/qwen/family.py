"""`QwenEditPlusFamily`: Qwen-Image-Edit-Plus (2509, 2511) behind the model boundary, on the
in-sequence base, its inputs built by the stock `QwenImageEditPlusPipeline`'s own encoding steps."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from ...utils.images import tensor_to_pil
from ..family import ModelInputs, TokenLayout
from ..insequence import IN_SEQUENCE_ADAPTER, IN_SEQUENCE_LORA_FILE, InSequenceFamily
from .denoiser import QwenEditPlusDenoiser

__all__ = ["QWEN_ADAPTER", "QWEN_LORA_FILE", "QWEN_LORA_TARGETS", "TINY_IMAGE_SIZES", "QwenEditPlusFamily"]

QWEN_ADAPTER = IN_SEQUENCE_ADAPTER
"""The LoRA's peft adapter name (the in-sequence base's, ``"mosaic"``)."""

QWEN_LORA_FILE = IN_SEQUENCE_LORA_FILE
"""The file name `QwenEditPlusFamily.save_lora` writes in a folder (diffusers' default)."""

QWEN_LORA_TARGETS: tuple[str, ...] = (
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2",
)
"""Default LoRA targets (linear-module name suffixes): every block's attention projections of the
image and text streams and both feed-forward layers of each stream. References and target share
these weights (in-sequence references): one plain adapter, as the stock LoRA loader expects."""

TINY_IMAGE_SIZES = {"condition_image_size": 64 * 64, "vae_image_size": 64 * 64}
"""The tiny family's pixel areas for the vision-language encoder and for `sample`'s references
(the stock 384² and 1024² would feed a tiny model thousands of tokens)."""


class QwenEditPlusFamily(InSequenceFamily):
    """Qwen-Image-Edit-Plus (2509 and 2511) behind the model boundary, on the in-sequence base
    (`mosaic_kit.models.insequence.InSequenceFamily`: the forward with MOSAIC's capture, the one
    `SequenceLayout`, building, and the plain peft LoRA that the stock ``load_lora_weights``
    loads), over a stock `diffusers.QwenImageEditPlusPipeline`, laid out as it lays out its references.

    Every reference is used twice, as the pipeline uses it: resized to about
    ``condition_image_size`` pixels of area for the Qwen2.5-VL text encoder, which sees reference
    ``k`` as "Picture k" in its prompt (`encode_prompts`), and VAE-encoded at its own size for the
    transformer, whose image stream is ``[target | ref 1 | … | ref K]``, each packed 2×2, with
    ``img_shapes`` listing ``(1, rows, cols)`` of the target and then of each reference
    (`encode_images`, `encode`). The transformer predicts every image token; the target's are kept.
    With ``zero_cond_t`` (2511) the references are modulated at timestep 0. The stock pipeline runs
    one sample at a time; a training batch encodes each sample as it would and pads the prompt
    embeddings with a mask, as its ``_get_qwen_prompt_embeds`` pads a list of prompts.

    Args:
        pipe: a `diffusers.QwenImageEditPlusPipeline`.
        capture_blocks: ``"all"``/``"double"`` (every block) or a list of block names.
        condition_image_size: pixel area of the references the text encoder sees; None: the
            pipeline module's ``CONDITION_IMAGE_SIZE`` (384²), read when encoding.
        vae_image_size: pixel area `sample` resizes references to before the VAE (the stock
            pipeline's ``VAE_IMAGE_SIZE``, 1024², when None). Training encodes references at their
            own size: train with references of that area to train exactly what `sample` runs.
        negative_prompt: the negative prompt of `sample`'s true classifier-free guidance.

    Raises:
        ValueError: a pipeline without a Qwen-Image transformer, or a bad option.

    Example:
        >>> family = QwenEditPlusFamily.tiny()
        >>> inputs = family.encode(torch.rand(2, 3, 32, 32), ["a cat", "a dog"], torch.rand(2, 2, 3, 16, 32))
        >>> tuple(inputs.target.shape), inputs.layout.reference_token_counts
        ((2, 4, 16), (2, 2))
        >>> inputs.conditioning["img_shapes"][0]
        [(1, 2, 2), (1, 1, 2), (1, 1, 2)]
        >>> tuple(family.forward(inputs, torch.randn(2, 4, 16), torch.tensor([0.5, 0.5])).shape)
        (2, 4, 16)
        >>> len(family.add_lora(rank=2))  # 12 linears × 2 blocks
        24
    """

    name = "qwen_edit_plus"
    config_extras = ("capture_blocks", "quantize")
    encoder_components = ("text_encoder", "tokenizer", "processor", "vae")
    prompt_uses_references = True  # the prompt shows the references to Qwen2.5-VL ("Picture k")
    default_guidance_scale = 4.0
    lora_targets = QWEN_LORA_TARGETS
    architecture = "Qwen-Image"
    denoiser_class = QwenEditPlusDenoiser
    pipeline_class_name = "QwenImageEditPlusPipeline"
    transformer_class_name = "QwenImageTransformer2DModel"
    tiny_defaults = TINY_IMAGE_SIZES

    def __init__(self, pipe: Any, capture_blocks: str | Sequence[str] = "all", condition_image_size: int | None = None,
                 vae_image_size: int | None = None, negative_prompt: str = " ") -> None:
        super().__init__(pipe, capture_blocks)
        for key, value in (("condition_image_size", condition_image_size), ("vae_image_size", vae_image_size)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"Expected `{key}` to be a positive int (pixels of area) or None, but got {value!r}.")
        if not isinstance(negative_prompt, str):
            raise ValueError(f"Expected `negative_prompt` to be a string, but got {negative_prompt!r}.")
        self.condition_image_size, self.vae_image_size = condition_image_size, vae_image_size
        self.negative_prompt = negative_prompt

    @staticmethod
    def tiny_components(seed: int, transformer_overrides: dict | None, pixel_space: int | None) -> dict[str, Any]:
        """Tiny random `QwenImageEditPlusPipeline` components (`mosaic_kit.models.qwen.tiny`) for
        `tiny` (``transformer_overrides={"zero_cond_t": False}``: the 2509 transformer;
        ``pixel_space``: `mosaic_kit.models.qwen.tiny.QwenPixelAutoencoder` instead of the VAE).

        Example:
            >>> QwenEditPlusFamily.tiny(transformer_overrides={"zero_cond_t": False}).transformer.zero_cond_t
            False
            >>> QwenEditPlusFamily.tiny(pixel_space=2).pixels_per_token
            4
        """
        from .tiny import tiny_qwen_edit_plus_components

        return tiny_qwen_edit_plus_components(seed=seed, transformer_overrides=transformer_overrides,
                                              pixel_space=pixel_space)

    @classmethod
    def bare_model_kwargs(cls, transformer: torch.nn.Module, target_size: int, reference_sizes: Sequence[int],
                          text_tokens: int, randn: Any) -> dict[str, Any]:
        """The stock pipeline's layout (`ModelFamily.bare_model_kwargs`): ``hidden_states``
        ``[target | ref 1 | … | ref K]`` packed 2×2, ``img_shapes`` listing each image, no text mask.

        Example:
            >>> from mosaic_kit.models.qwen.tiny import TINY_QWEN_TRANSFORMER_CONFIG
            >>> transformer = QwenEditPlusFamily.bare_transformer_class()(**TINY_QWEN_TRANSFORMER_CONFIG)
            >>> kwargs = QwenEditPlusFamily.bare_model_kwargs(transformer, 64, [32], 8, torch.randn)
            >>> kwargs["img_shapes"], tuple(kwargs["hidden_states"].shape)
            ([[(1, 4, 4), (1, 2, 2)]], (1, 20, 16))
        """
        from ..insequence import SequenceLayout

        conf, side = transformer.config, target_size // 16
        ref_tokens = [(size // 16) ** 2 for size in reference_sizes]
        return {
            "hidden_states": randn(1, side * side + sum(ref_tokens), conf.in_channels, dtype=torch.bfloat16),
            "encoder_hidden_states": randn(1, text_tokens, conf.joint_attention_dim, dtype=torch.bfloat16),
            "encoder_hidden_states_mask": None, "timestep": randn(1, dtype=torch.bfloat16).sigmoid(),
            "img_shapes": [[(1, side, side)] + [(1, size // 16, size // 16) for size in reference_sizes]],
            "sequence_layout": SequenceLayout.concatenated(side * side, ref_tokens),
        }

    @contextlib.contextmanager
    def image_sizes(self) -> Iterator[None]:
        """Within it, the stock pipeline module's ``CONDITION_IMAGE_SIZE`` and ``VAE_IMAGE_SIZE``
        (read at call time) are the family's (those that are not None); restored after."""
        from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as module

        saved = module.CONDITION_IMAGE_SIZE, module.VAE_IMAGE_SIZE
        module.CONDITION_IMAGE_SIZE = self.condition_image_size or saved[0]
        module.VAE_IMAGE_SIZE = self.vae_image_size or saved[1]
        try:
            yield
        finally:
            module.CONDITION_IMAGE_SIZE, module.VAE_IMAGE_SIZE = saved

    # -- encoding: the vision-language prompt ------------------------------------------------------
    def condition_images(self, references: torch.Tensor) -> list[Any]:
        """One sample's references as the pipeline gives them to the text encoder: 8-bit PIL images
        resized by its image processor to about ``condition_image_size`` pixels of area
        (``calculate_dimensions``: sides multiples of 32, the aspect ratio kept).

        Args:
            references: ``(K, 3, h, w)`` float in ``[0, 1]``.

        Returns:
            K PIL images.
        """
        from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as module

        area = self.condition_image_size or module.CONDITION_IMAGE_SIZE
        images = []
        for reference in references:
            width, height = module.calculate_dimensions(area, reference.shape[-1] / reference.shape[-2])
            images.append(self.pipe.image_processor.resize(tensor_to_pil(reference), height, width))
        return images

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], references: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prompt embeddings through the pipeline's ``encode_prompt``, one sample per call with its
        references as "Picture 1", "Picture 2", …, padded with zeros to the longest and masked.

        Args:
            prompts: B prompts.
            references: ``(B, K, 3, h, w)`` float in ``[0, 1]``, or None.

        Returns:
            ``(prompt_embeds (B, L, D), mask (B, L) long or None when nothing is padded)``.

        Example:
            >>> family = QwenEditPlusFamily.tiny()
            >>> embeds, mask = family.encode_prompts(["a cat", "a big dog"], torch.rand(2, 1, 3, 32, 32))
            >>> embeds.shape[0], mask[:, -1].tolist()
            (2, [0, 1])
        """
        return self._pad_prompts([item["encoder_hidden_states"] for item in self.encode_prompt_items(prompts, references)])

    @torch.no_grad()
    def encode_prompt_items(self, prompts: Sequence[str], references: torch.Tensor | None = None
                            ) -> list[dict[str, torch.Tensor]]:
        """The pipeline's ``encode_prompt`` per prompt with its sample's references:
        ``encoder_hidden_states`` ``(L_b, D)`` (unpadded; `encoded_inputs` pads and masks)."""
        items = []
        for b, prompt in enumerate(prompts):
            images = None if references is None or references.shape[1] == 0 else self.condition_images(references[b])
            items.append({"encoder_hidden_states": self.pipe.encode_prompt(prompt, image=images, device=self.device)[0][0]})
        return items

    def _pad_prompts(self, embeds: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        embeds = [e.to(self.device) for e in embeds]
        length = max(e.shape[0] for e in embeds)
        mask = torch.stack([torch.arange(length, device=self.device) < e.shape[0] for e in embeds]).long()
        padded = torch.stack([torch.cat([e, e.new_zeros(length - e.shape[0], e.shape[1])]) for e in embeds])
        return padded, None if bool(mask.all()) else mask

    # -- encoding: the image stream ----------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Packed, normalised latents of images, as the pipeline encodes its references: one VAE
        call per image (distribution mode, ``latents_mean``/``latents_std``), packed 2×2.

        Args:
            images: ``(N, 3, H, W)`` float in ``[0, 1]``, H and W multiples of 16.

        Returns:
            ``(N, H·W / 256, C)`` in the VAE's dtype.

        Example:
            >>> tuple(QwenEditPlusFamily.tiny().encode_images(torch.rand(1, 3, 32, 48)).shape)
            (1, 6, 16)
        """
        pipe, vae = self.pipe, self.pipe.vae
        # channels-last, as the pipeline's preprocessing leaves an H×W×C array: a convolution over
        # another memory layout may differ in the last bits, and the encoding must be the pipeline's
        pixels = (images.to(vae.device, vae.dtype) * 2 - 1).contiguous(memory_format=torch.channels_last)
        packed = []
        for i in range(pixels.shape[0]):
            latents = pipe._encode_vae_image(image=pixels[i : i + 1].unsqueeze(2), generator=None)
            packed.append(pipe._pack_latents(latents, 1, latents.shape[1], latents.shape[3], latents.shape[4]))
        return torch.cat(packed)

    @torch.no_grad()
    def encode(self, targets: torch.Tensor | None, prompts: Sequence[str], references: torch.Tensor | None = None,
               target_size: tuple[int, int] | None = None) -> ModelInputs:
        """Encodes targets, prompts and references into the transformer's inputs.

        Args:
            targets: ``(B, 3, H, W)`` in ``[0, 1]``, or None for inference (give ``target_size``).
            prompts: B prompts.
            references: ``(B, K, 3, h, w)`` in ``[0, 1]``, or None.
            target_size: ``(H, W)`` in pixels when ``targets`` is None.

        Returns:
            `ModelInputs` (`InSequenceFamily.encoded`): ``target`` ``(B, N_tgt, C)`` float32 (None
            without targets), the layout, and ``conditioning`` (``encoder_hidden_states``,
            ``encoder_hidden_states_mask``, ``img_shapes``, ``reference_tokens`` (None without
            references), ``sequence_layout``; ``latent_ids`` and ``reference_ids`` None: Qwen-Image
            takes no position ids).
        """
        b, layout = self.encoding_layout(targets, prompts, references, target_size)
        k = len(layout.reference_grids)
        target = None if targets is None else self.encode_image_tokens(targets)
        refs = torch.stack([self.encode_image_tokens(references[:, j]) for j in range(k)], dim=1) if k else None
        return self.encoded_inputs(self.encode_prompt_items(prompts, references), target, refs, layout)

    encode_image_tokens = encode_images

    def encoded_inputs(self, prompt_items: Sequence[dict[str, torch.Tensor]], target_tokens: torch.Tensor | None,
                       reference_tokens: torch.Tensor | None, layout: TokenLayout) -> ModelInputs:
        """`ModelInputs` of the encoders' outputs (`ModelFamily.encoded_inputs`): prompts padded to
        the longest and masked (`encode_prompts`), ``img_shapes`` from the layout."""
        device, dtype, b = self.device, self.transformer.dtype, len(prompt_items)
        embeds, mask = self._pad_prompts([item["encoder_hidden_states"] for item in prompt_items])
        shapes = [(1, g.rows, g.cols) for g in (layout.target_grid, *layout.reference_grids)]
        conditioning = {"encoder_hidden_states": embeds.to(device, dtype), "encoder_hidden_states_mask": mask,
                        "img_shapes": [list(shapes) for _ in range(b)],
                        "reference_tokens": reference_tokens.flatten(1, 2).to(device, dtype) if layout.reference_grids
                        else None, "latent_ids": None, "reference_ids": None}  # positions: ``img_shapes`` (the per-image RoPE)
        target = None if target_tokens is None else target_tokens.to(device, torch.float32)
        return self.encoded(conditioning, layout, target, b)

    # -- the forward -------------------------------------------------------------------------------
    def _transformer_kwargs(self, inputs: ModelInputs, noisy: torch.Tensor, timestep: torch.Tensor,
                            guidance: float | torch.Tensor | None = None) -> dict[str, Any]:
        """The prompt, its mask, ``img_shapes`` and the time in the model's dtype; ``guidance`` only
        for a transformer with a guidance embedding (the edit models have none; default 1.0)."""
        cond = inputs.conditioning
        return {"encoder_hidden_states": cond["encoder_hidden_states"],
                "encoder_hidden_states_mask": cond["encoder_hidden_states_mask"],
                "timestep": timestep.to(self.transformer.dtype), "img_shapes": cond["img_shapes"],
                "guidance": self.embedded_guidance(guidance, 1.0, noisy)}

    # -- sampling ----------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, prompt: str, references: Sequence[Any], height: int, width: int, num_inference_steps: int = 40,
               generator: torch.Generator | None = None, guidance_scale: float | None = None) -> Any:
        """One image from the stock pipeline's ``__call__`` (the LoRA as loaded), with the family's
        image areas (`image_sizes`): what a user of the stock pipeline gets.

        Args:
            prompt: the prompt.
            references: one or more PIL images (the pipeline needs at least one).
            height: image height in pixels (a multiple of 16).
            width: image width in pixels.
            num_inference_steps: denoising steps.
            generator: the noise generator.
            guidance_scale: the pipeline's ``true_cfg_scale`` (with `negative_prompt` when above 1);
                None: `default_guidance_scale` (4.0).

        Raises:
            ValueError: no reference.

        Example:
            >>> from PIL import Image
            >>> family = QwenEditPlusFamily.tiny()
            >>> family.sample("a cat", [Image.new("RGB", (32, 32), "red")], 32, 32, num_inference_steps=1).size
            (32, 32)
        """
        if not references:
            raise ValueError("Expected at least one reference image (QwenImageEditPlusPipeline edits images), but got none.")
        scale = self.default_guidance_scale if guidance_scale is None else float(guidance_scale)
        with self.image_sizes():
            out = self.pipe(image=list(references), prompt=prompt, negative_prompt=self.negative_prompt if scale > 1 else None,
                            true_cfg_scale=scale, height=height, width=width, num_inference_steps=num_inference_steps,
                            generator=generator)
        return out.images[0]

    # -- decoding ----------------------------------------------------------------------------------
    @torch.no_grad()
    def _decode(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Checked target tokens to ``(B, 3, H, W)`` float32 images in ``[0, 1]``, as the pipeline
        decodes: unpack, undo the latent normalisation, decode the single frame."""
        pipe, vae = self.pipe, self.pipe.vae
        grid = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor).to(vae.dtype)
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(grid)
        inverse_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(grid)  # the pipeline's arithmetic
        images = vae.decode(grid / inverse_std + mean, return_dict=False)[0][:, :, 0]
        return (images.float() / 2 + 0.5).clamp(0, 1)
