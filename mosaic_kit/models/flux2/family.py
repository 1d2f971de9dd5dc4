"""`Flux2Family`: FLUX.2 behind the model boundary, its inputs built by the stock pipeline's own
encoding steps."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..flux.lora import write_lora_file
from ..family import ModelFamily, ModelInputs, TokenLayout, check_trainable
from ..insequence import CaptureProcessors, SequenceLayout
from .denoiser import Flux2Denoiser
from .lora import FLUX2_ADAPTER, FLUX2_COMFYUI_KEYS, FLUX2_LORA_TARGETS, add_flux2_lora

__all__ = ["FLUX2_LORA_FILE", "FLUX2_REFERENCE_TIME_SCALE", "Flux2Family"]

FLUX2_REFERENCE_TIME_SCALE = 10
"""Time-axis offset between references in FLUX.2's position ids (the pipelines' ``scale``)."""

FLUX2_LORA_FILE = "pytorch_lora_weights.safetensors"
"""The file name `Flux2Family.save_lora` writes (diffusers' default weight name)."""


class Flux2Family(ModelFamily):
    """The FLUX.2 model family behind the model boundary (`ModelFamily`): encoding, the
    multi-reference forward with MOSAIC's capture, the LoRA and decoding, over a stock
    `Flux2KleinPipeline` (or `Flux2Pipeline`).

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
        self.pipe = pipe
        self._model = Flux2Denoiser(pipe.transformer, capture_blocks)
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
        from ..quantize import quantize_transformer

        quantize = kwargs.pop("quantize", "none")
        pipe = pipeline_class(**tiny_flux2_components(seed=seed, transformer_overrides=transformer_overrides,
                                                           pixel_space=pixel_space))
        pipe.register_modules(transformer=quantize_transformer(pipe.transformer, quantize))
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
        from ..quantize import pipeline_quantization_config

        quantization = pipeline_quantization_config(kwargs.pop("quantize", "none"), torch_dtype)
        extra = {} if quantization is None else {"quantization_config": quantization}
        pipe = pipeline_class.from_pretrained(base, dtype=torch_dtype, **extra)
        pipe.set_progress_bar_config(disable=True)
        return cls(pipe, **kwargs)

    # -- what the callers hold ---------------------------------------------------------------------
    @property
    def model(self) -> Flux2Denoiser:
        """The `Flux2Denoiser` (what an accelerator wraps)."""
        return self._model

    @property
    def transformer(self) -> nn.Module:
        """The stock `Flux2Transformer2DModel` (with the LoRA once added)."""
        return self.pipe.transformer

    @property
    def token_channels(self) -> int:
        """C: channels of a patchified latent token (4 × the autoencoder's latent channels)."""
        return int(self.transformer.config.in_channels)

    def capture_handle(self) -> CaptureProcessors:
        """The capture processors on the chosen blocks (installed on first use).

        Example:
            >>> Flux2Family.tiny(capture_blocks="double").capture_handle().block_names
            ('transformer_blocks.0',)
        """
        return self._model.capture_handle()

    # -- encoding ----------------------------------------------------------------------------------
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
    def encode(self, targets: torch.Tensor | None, prompts: Sequence[str], references: torch.Tensor | None = None,
               target_size: tuple[int, int] | None = None) -> ModelInputs:
        """Encodes targets, prompts and references into the transformer's inputs.

        Args:
            targets: ``(B, 3, H, W)`` in ``[0, 1]``, or None for inference (give ``target_size``).
            prompts: B prompts.
            references: ``(B, K, 3, h, w)`` in ``[0, 1]`` (every sample's K slots; a placeholder
                image where a sample has fewer), or None.
            target_size: ``(H, W)`` in pixels when ``targets`` is None.

        Returns:
            `ModelInputs`: ``target`` ``(B, N_tgt, C)`` float32 (None without targets), the
            layout, and ``conditioning`` (``encoder_hidden_states``, ``txt_ids``, ``latent_ids``,
            ``reference_tokens``, ``reference_ids``; the last two None without references).

        Example:
            >>> inputs = Flux2Family.tiny().encode(torch.rand(1, 3, 32, 48), ["a cat"])
            >>> grid = inputs.layout.target_grid
            >>> inputs.conditioning["reference_tokens"] is None, (grid.rows, grid.cols)
            (True, (2, 3))
        """
        pipe = self.pipe
        if targets is None and target_size is None:
            raise ValueError("Expected `targets` or `target_size`, but got neither.")
        self.check_encode_inputs(targets, prompts, references)  # the contract every family shares
        if targets is None:
            b, (height, width) = len(prompts), target_size
        else:
            b, (height, width) = targets.shape[0], tuple(targets.shape[-2:])
        k = 0 if references is None else references.shape[1]
        ref_sizes = [tuple(references.shape[-2:])] * k if k else []
        layout = self.token_layout((int(height), int(width)), [(int(h), int(w)) for h, w in ref_sizes])
        device, dtype = self.device, self.transformer.dtype
        rows, cols = layout.target_grid.rows, layout.target_grid.cols
        grid = torch.zeros(b, self.token_channels, rows, cols)  # the ids only read its shape
        latents = None
        if targets is not None:
            grid = self.encode_images(targets)
            latents = pipe._pack_latents(grid).to(device, torch.float32)
        latent_ids = pipe._prepare_latent_ids(grid).to(device)
        prompt_embeds, text_ids = self.encode_prompts(prompts)
        reference_tokens = reference_ids = None
        if k:
            per_slot = self.encode_images(references.flatten(0, 1)).unflatten(0, (b, k))
            ids = pipe._prepare_image_ids([per_slot[0, j : j + 1] for j in range(k)])  # (1, N_ref, 4)
            reference_ids = ids.expand(b, -1, -1).to(device)
            reference_tokens = torch.cat([pipe._pack_latents(per_slot[:, j]) for j in range(k)], dim=1).to(device, dtype)
        conditioning = {"encoder_hidden_states": prompt_embeds.to(device, dtype), "txt_ids": text_ids.to(device),
                        "latent_ids": latent_ids, "reference_tokens": reference_tokens, "reference_ids": reference_ids}
        return ModelInputs(conditioning=conditioning, layout=layout, target=latents, batch_size=b)

    def _encode_batch(self, batch: Any) -> ModelInputs:
        """Encodes a checked `mosaic_kit.data.MosaicBatch` (targets, captions, references; see
        `ModelFamily.encode_batch`).

        Args:
            batch: anything with ``targets``, ``captions`` and ``references`` (a `MosaicBatch`).

        Returns:
            The `ModelInputs`; the reference slots are ``batch.references``'s K slots.

        Example:
            >>> from mosaic_kit.data import MultiSubjectSample, collate_samples
            >>> image = torch.rand(3, 32, 32)
            >>> batch = collate_samples([MultiSubjectSample("a", image, [image], "a cat", [torch.zeros(0, 4)])],
            ...     target_size=32, ref_size=16)
            >>> Flux2Family.tiny().encode_batch(batch).layout.reference_token_counts
            (1,)
        """
        return self.encode(batch.targets, list(batch.captions), batch.references)

    def sequence_layout(self, layout: TokenLayout) -> SequenceLayout:
        """Where the target and each reference sit in the transformer's image stream,
        ``[target | ref 1 | … | ref K]`` (what the capture processors read).

        Args:
            layout: the token layout (with references).

        Returns:
            The `SequenceLayout` shared by the batch.

        Example:
            >>> family = Flux2Family.tiny()
            >>> layout = family.token_layout((32, 32), [(16, 16), (16, 16)])
            >>> family.sequence_layout(layout).ref_index.tolist()
            [[4, 5]]
        """
        if not layout.reference_grids:
            raise ValueError("Expected a `layout` with references, but got none.")
        return SequenceLayout.concatenated(layout.target_grid.num_tokens, layout.reference_token_counts)

    # -- noising and the forward -------------------------------------------------------------------
    def _model_kwargs(self, inputs: ModelInputs, noisy: torch.Tensor, timestep: torch.Tensor,
                      guidance: float | torch.Tensor | None = None) -> dict[str, Any]:
        """The `Flux2Denoiser`'s keyword arguments, built as the pipelines build the transformer's
        (inputs checked by `ModelFamily.model_kwargs`).

        Args:
            inputs: the encoded batch.
            noisy: ``(B, N_tgt, C)`` noisy target tokens.
            timestep: ``(B,)`` flow-matching time in ``[0, 1]`` (the pipelines pass ``t / 1000``).
            guidance: embedded guidance for [dev] (None: the family's ``guidance``); [klein] has
                no guidance embedding and gets None.

        Returns:
            ``hidden_states`` ``[target | refs]``, ``img_ids``, ``encoder_hidden_states``,
            ``txt_ids``, ``timestep``, ``guidance``, ``tgt_tokens``, ``ref_tokens``.

        Example:
            >>> family = Flux2Family.tiny()
            >>> inputs = family.encode(torch.rand(1, 3, 32, 32), ["a"], torch.rand(1, 1, 3, 16, 16))
            >>> kwargs = family.model_kwargs(inputs, inputs.target, torch.tensor([1.0]))
            >>> tuple(kwargs["hidden_states"].shape), tuple(kwargs["img_ids"].shape), kwargs["guidance"]
            ((1, 5, 16), (1, 5, 4), None)
        """
        cond, dtype = inputs.conditioning, self.transformer.dtype
        n_tgt = inputs.layout.target_grid.num_tokens
        hidden, ids = noisy.to(dtype), cond["latent_ids"]
        if cond["reference_tokens"] is not None:
            hidden = torch.cat([hidden, cond["reference_tokens"].to(dtype)], dim=1)
            ids = torch.cat([ids, cond["reference_ids"]], dim=1)
        embedded = None
        if self.transformer.config.guidance_embeds:
            value = self.guidance if guidance is None else guidance
            embedded = torch.as_tensor(value, dtype=torch.float32, device=noisy.device).expand(noisy.shape[0])
        return {"hidden_states": hidden, "img_ids": ids, "encoder_hidden_states": cond["encoder_hidden_states"].to(dtype),
                "txt_ids": cond["txt_ids"], "timestep": timestep.to(dtype), "guidance": embedded,
                "tgt_tokens": n_tgt, "ref_tokens": inputs.layout.reference_token_counts}

    # -- LoRA --------------------------------------------------------------------------------------
    def add_lora(self, rank: int, alpha: float | None = None, targets: Sequence[str] = FLUX2_LORA_TARGETS,
                 init: str | bool = True) -> list[str]:
        """Adds a peft LoRA (adapter ``"mosaic"`` (`FLUX2_ADAPTER`)) on the transformer: `add_flux2_lora`.

        Example:
            >>> family = Flux2Family.tiny()
            >>> len(family.add_lora(rank=4))  # 12 in the double block, 2 in each single block
            16
        """
        return add_flux2_lora(self.transformer, rank, alpha, targets, init)

    def trainable_parameters(self, trainable: str = "lora") -> list[nn.Parameter]:
        """The transformer's parameters that train for ``trainable``: its LoRA, or every weight.

        Args:
            trainable: ``"lora"`` or ``"all"``.

        Returns:
            The parameters, in module order.

        Example:
            >>> family = Flux2Family.tiny()
            >>> _ = family.add_lora(rank=2)
            >>> len(family.trainable_parameters("lora")), len(family.trainable_parameters("all")) > 32
            (32, True)
        """
        check_trainable(trainable)
        params = [p for name, p in self.transformer.named_parameters() if trainable == "all" or ".lora_" in name]
        if not params:
            raise ValueError("Expected trainable parameters, but found none (add a LoRA first with `add_lora`).")
        return params

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """The LoRA weights of adapter ``"mosaic"`` (`FLUX2_ADAPTER`) without the ``transformer.`` prefix (peft's
        ``get_peft_model_state_dict``).

        Example:
            >>> family = Flux2Family.tiny()
            >>> _ = family.add_lora(rank=2, targets=["to_q"])
            >>> sorted(family.lora_state_dict())[0]
            'transformer_blocks.0.attn.to_q.lora_A.weight'
        """
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(self.transformer, adapter_name=FLUX2_ADAPTER)

    def lora_parameters(self) -> dict[str, nn.Parameter]:
        """The LoRA's parameters by their file key (``transformer.<module>.lora_A.weight``).

        Example:
            >>> family = Flux2Family.tiny()
            >>> _ = family.add_lora(rank=2, targets=["to_q"])
            >>> sorted(family.lora_parameters())[0]
            'transformer.transformer_blocks.0.attn.to_q.lora_A.weight'
        """
        found = {}
        for name, param in self.transformer.named_parameters():
            for part in ("lora_A", "lora_B"):
                marker = f".{part}.{FLUX2_ADAPTER}.weight"
                if name.endswith(marker):
                    found[f"transformer.{name[: -len(marker)]}.{part}.weight"] = param
        if not found:
            raise ValueError(f"Expected a LoRA adapter {FLUX2_ADAPTER!r} on the transformer (`add_lora`), but found none.")
        return found

    def save_lora(self, path: str | os.PathLike, state_dict: dict[str, torch.Tensor] | None = None,
                  format: str = "diffusers") -> Path:
        """Writes the LoRA in diffusers' layout with its adapter metadata and mosaic_kit's digest
        (`LORA_DIGEST_KEY`), atomically and durably: the one writer of FLUX.2 LoRA files (the
        trainer's final, EMA and checkpoint files too); or, with ``format="comfyui"``, the same
        LoRA in ComfyUI's format (`FLUX2_COMFYUI_KEYS`:
        ``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight``, ..., q/k/v fused,
        ``alpha / rank`` folded into ``lora_up``), which ComfyUI's LoRA loader and diffusers'
        ``Flux2KleinPipeline.load_lora_weights`` (its kohya converter) read.

        Diffusers lays the file out in a temporary folder beside the destination; its tensors and
        metadata are then written with `write_lora_file` (the digest added; temporary file, fsync,
        rename, fsync of the folder).

        The keys are ``transformer.<module>.lora_A.weight``; the metadata carries ``lora_alpha``
        (without it a reload would use alpha = rank). ``Flux2KleinPipeline.load_lora_weights``
        and ``Flux2Pipeline.load_lora_weights`` load it exactly, without mosaic_kit.

        Args:
            path: a ``.safetensors`` file, or a folder (the file is then
                ``pytorch_lora_weights.safetensors`` in it); parent folders are created.
            state_dict: raw values keyed as `lora_parameters` (e.g. gathered from FSDP shards)
                to write instead of the model's own.
            format: ``"diffusers"`` or ``"comfyui"`` (a ``.safetensors`` file name is then required).

        Returns:
            The path of the written file.

        Raises:
            ValueError: an unknown ``format``, or a ComfyUI path that is not a ``.safetensors`` file.

        Example:
            >>> import tempfile
            >>> family = Flux2Family.tiny()
            >>> _ = family.add_lora(rank=2)
            >>> family.save_lora(tempfile.mkdtemp()).name
            'pytorch_lora_weights.safetensors'
        """
        import tempfile

        from diffusers import Flux2KleinPipeline
        from safetensors import safe_open

        from ..comfyui import check_lora_format
        from ..flux.lora import scale_lora_state

        check_lora_format(format)
        peft_config = getattr(self.transformer, "peft_config", {}).get(FLUX2_ADAPTER)
        if peft_config is None:
            raise ValueError(f"Expected a LoRA adapter {FLUX2_ADAPTER!r} on the transformer (`add_lora`), but found none.")
        if format == "comfyui":
            raw = self.lora_parameters() if state_dict is None else state_dict
            raw = {k if k.startswith("transformer.") else f"transformer.{k}": v.detach().to("cpu") for k, v in raw.items()}
            return self.write_comfyui_lora(scale_lora_state(self.transformer, raw, FLUX2_ADAPTER), path)
        path = Path(path)
        file = path if path.suffix == ".safetensors" else path / FLUX2_LORA_FILE
        file.parent.mkdir(parents=True, exist_ok=True)
        if state_dict is None:
            state = self.lora_state_dict()
        else:
            prefix = "transformer."
            state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state_dict.items()}
        state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
        with tempfile.TemporaryDirectory(dir=file.parent, prefix=".tmp-lora-") as scratch:
            # diffusers lays out the keys and its adapter metadata; the file is then rewritten with
            # mosaic_kit's digest added (`read_lora_file` and `load_lora` verify it)
            Flux2KleinPipeline.save_lora_weights(scratch, transformer_lora_layers=state, weight_name=file.name,
                                                 transformer_lora_adapter_metadata=peft_config.to_dict())
            with safe_open(Path(scratch) / file.name, framework="pt") as written:
                tensors = {key: written.get_tensor(key) for key in written.keys()}
                metadata = written.metadata() or {}
        write_lora_file(tensors, file, metadata=metadata)
        return file

    def load_lora(self, path_or_state_dict: str | os.PathLike | dict[str, torch.Tensor], partial: bool = False) -> None:
        """Loads a FLUX.2 LoRA (a file or folder diffusers can read, or its state dict).

        A local ``.safetensors`` file is first read with `mosaic_kit.models.read_lora_file`: the
        digest mosaic_kit records in its files (`LORA_DIGEST_KEY`) is verified and every tensor
        must be finite (files without a digest, e.g. written by diffusers, load as they are).
        Every LoRA key must then name a linear module of this transformer with matching shapes: a
        LoRA made for FLUX.1 (or another FLUX.2 size) is refused naming the file, the model it was
        made for and this one, before peft sees it.

        With no LoRA on the transformer, the weights go in through the pipeline's stock loader
        (``load_lora_into_transformer``, with the file's adapter metadata) as adapter ``"mosaic"``
        (`FLUX2_ADAPTER`) (rank and alpha from the file). With one, the values replace those of
        adapter ``"mosaic"`` (`FLUX2_ADAPTER`) (resuming training); every LoRA weight must be in the
        file unless ``partial``.

        Args:
            path_or_state_dict: a ``.safetensors`` file, a folder holding
                ``pytorch_lora_weights.safetensors`` (or a single ``.safetensors`` file), a hub id,
                or a state dict in diffusers' layout.
            partial: allow a file that holds only some of the current LoRA's weights.

        Raises:
            ValueError: naming the file: damaged (digest mismatch), unreadable or non-finite
                tensors, made for another model (keys or shapes that do not fit this transformer),
                or a weight missing (unless ``partial``) or unexpected for the current adapter.

        Example:
            >>> import tempfile
            >>> family = Flux2Family.tiny()
            >>> _ = family.add_lora(rank=2, init=False)
            >>> file = family.save_lora(tempfile.mkdtemp())
            >>> other = Flux2Family.tiny()
            >>> other.load_lora(file)
            >>> other.transformer.active_adapters()
            ['mosaic']
        """
        from diffusers import Flux2KleinPipeline

        from .._lora_origin import check_lora_fits
        from ..flux.lora import read_lora_file

        source, kwargs, file = _lora_source(path_or_state_dict)
        label = f"LoRA file {str(file or source)!r}" if file is not None or not isinstance(source, dict) \
            else "LoRA state dict"
        if file is not None and file.suffix == ".safetensors":
            read_lora_file(file)  # the recorded digest (damaged or changed tensors) and finite tensors
        state, metadata = Flux2KleinPipeline.lora_state_dict(source, return_lora_metadata=True, **kwargs)
        stray = sorted(k for k in state if "lora" not in k and "lokr" not in k)  # stock load_lora_weights' check
        if stray:
            raise ValueError(f"{label}: expected LoRA (or LoKr) keys only, but got {stray[:3]}.")
        check_lora_fits(state, self.transformer, label, "FLUX.2")
        if getattr(self.transformer, "peft_config", {}).get(FLUX2_ADAPTER) is None:
            type(self.pipe).load_lora_into_transformer(state, transformer=self.transformer, adapter_name=FLUX2_ADAPTER,
                                                      metadata=metadata, _pipeline=self.pipe)
            return
        prefix = "transformer."
        state = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
        current = self.lora_state_dict()
        unexpected = sorted(set(state) - set(current))
        missing = [] if partial else sorted(set(current) - set(state))
        wrong = sorted(k for k in set(state) & set(current) if state[k].shape != current[k].shape)
        if unexpected or missing or wrong:
            raise ValueError(
                f"Expected the LoRA weights of adapter {FLUX2_ADAPTER!r} ({len(current)} tensors), but got "
                f"{len(unexpected)} unexpected (e.g. {unexpected[:2]}), {len(missing)} missing (e.g. {missing[:2]}) "
                f"and {len(wrong)} of another shape (e.g. {wrong[:2]}) in {label}."
            )
        params = dict(self.transformer.named_parameters())
        with torch.no_grad():
            for key, value in state.items():
                name = key.replace(".lora_A.weight", f".lora_A.{FLUX2_ADAPTER}.weight").replace(
                    ".lora_B.weight", f".lora_B.{FLUX2_ADAPTER}.weight")
                params[name].copy_(value.to(params[name]))

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


def _lora_source(path_or_state_dict: Any) -> tuple[Any, dict[str, Any], Path | None]:
    """What diffusers' LoRA loader gets (a folder or hub id and its ``weight_name``, or a state
    dict) and the local file it will read (None for a state dict, a hub id, or a folder whose file
    diffusers picks by itself)."""
    if isinstance(path_or_state_dict, dict):
        return dict(path_or_state_dict), {}, None  # a copy: the loaders may change it in place
    path = Path(path_or_state_dict)
    if path.is_file():
        return str(path.parent), {"weight_name": path.name}, path
    if path.is_dir():
        file = path / FLUX2_LORA_FILE
        candidates = [file] if file.is_file() else sorted(path.glob("*.safetensors"))
        if len(candidates) == 1:
            return str(path), {"weight_name": candidates[0].name}, candidates[0]
    return str(path), {}, None
