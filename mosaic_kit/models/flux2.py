"""FLUX.2 with K reference images: MOSAIC on the stock `Flux2Transformer2DModel`.

FLUX.2 ([klein] and [dev]) takes references natively: diffusers' `Flux2KleinPipeline` and
`Flux2Pipeline` encode each reference with the FLUX.2 autoencoder (distribution mode, patchified
2×2, normalised by the autoencoder's latent batch-norm statistics), append its tokens after the
target's, ``[target | ref 1 | … | ref K]``, and tell them apart by the time axis of the 4-axis
position ids (reference ``k``, 0-based, at ``T = 10·(k + 1)``, the target at ``T = 0``).
`Flux2Family` builds exactly those inputs for a training batch, by calling the pipeline's own
encoding steps, so what is trained is what the stock pipeline runs.

MOSAIC's capture comes from the in-sequence capture processors
(`mosaic_kit.models.install_capture_processors`), which the family installs on the chosen blocks.
Reference and target tokens share every weight in FLUX.2, so the LoRA is one ordinary peft
adapter on the attention and feed-forward projections (no per-stream routing), saved in diffusers'
LoRA layout with its adapter metadata: ``Flux2KleinPipeline.load_lora_weights(folder)`` (or
``Flux2Pipeline``'s) loads the file unchanged, without mosaic_kit.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..attention import RefTargetCapture
from .insequence import CaptureProcessors, SequenceLayout, install_capture_processors

__all__ = [
    "FLUX2_LORA_FILE",
    "FLUX2_LORA_TARGETS",
    "FLUX2_REFERENCE_TIME_SCALE",
    "Flux2Family",
    "Flux2Inputs",
    "flux2_lora_target_modules",
]

FLUX2_LORA_TARGETS: tuple[str, ...] = (
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out",
    "to_qkv_mlp_proj", "attn.to_out",
)
"""Default LoRA targets, as name suffixes of `torch.nn.Linear` modules: the double-stream
blocks' attention (image and text projections; ``to_out.0`` because ``to_out`` is a
``ModuleList`` there) and feed-forward layers, and the parallel single-stream blocks' fused
``to_qkv_mlp_proj`` and ``attn.to_out`` (a plain linear there)."""

FLUX2_REFERENCE_TIME_SCALE = 10
"""Time-axis offset between references in FLUX.2's position ids (the pipelines' ``scale``)."""

FLUX2_LORA_FILE = "pytorch_lora_weights.safetensors"
"""The file name `Flux2Family.save_lora` writes (diffusers' default weight name)."""


def flux2_lora_target_modules(transformer: torch.nn.Module, targets: Sequence[str] = FLUX2_LORA_TARGETS) -> list[str]:
    """The full names of the `torch.nn.Linear` modules whose name ends with one of ``targets``.

    Expanding the suffixes to full names lets one list hold ``attn.to_out`` (a linear in the
    single-stream blocks) without peft also matching the double-stream blocks' ``to_out``
    ``ModuleList`` (which peft refuses).

    Args:
        transformer: a `Flux2Transformer2DModel` (or any module).
        targets: module-name suffixes (matched at a ``.`` boundary or as the whole name).

    Returns:
        The matching module names, in module order.

    Raises:
        ValueError: if ``targets`` is empty, not strings, or matches no linear module.

    Example:
        >>> from diffusers import Flux2Transformer2DModel
        >>> from mosaic_kit.pipelines.tiny_flux2 import TINY_FLUX2_TRANSFORMER_CONFIG
        >>> model = Flux2Transformer2DModel(**TINY_FLUX2_TRANSFORMER_CONFIG)
        >>> flux2_lora_target_modules(model, ["to_out.0", "attn.to_out"])
        ['transformer_blocks.0.attn.to_out.0', 'single_transformer_blocks.0.attn.to_out', 'single_transformer_blocks.1.attn.to_out']
    """
    if isinstance(targets, str) or not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"Expected `targets` to be a non-empty list of module-name suffixes, but got {targets!r}.")
    names = [
        name for name, module in transformer.named_modules()
        if isinstance(module, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets)
    ]
    if not names:
        raise ValueError(f"Expected `targets` {list(targets)} to match linear modules of the transformer, but none matched.")
    return names


@dataclass
class Flux2Inputs:
    """A batch encoded for the FLUX.2 transformer (what `Flux2Family.encode_batch` returns).

    Attributes:
        latents: ``(B, N_tgt, C)`` float32, the clean target tokens (normalised, patchified,
            packed row-major), the flow-matching data ``x``.
        latent_ids: ``(B, N_tgt, 4)`` long, the target's (T, H, W, L) ids, ``T = 0``.
        latent_size: ``(rows, cols)`` of the target token grid (``rows · cols = N_tgt``).
        reference_tokens: ``(B, N_ref_total, C)`` in the transformer's dtype, the K references'
            tokens in slot order, or None without references.
        reference_ids: ``(B, N_ref_total, 4)`` long, reference ``k`` at ``T = 10·(k + 1)``.
        ref_token_counts: ``N^(k)`` per reference slot (empty without references).
        prompt_embeds: ``(B, L, D)``, the stacked text-encoder hidden states.
        text_ids: ``(B, L, 4)`` long, ``(0, 0, 0, l)``.
    """

    latents: torch.Tensor
    latent_ids: torch.Tensor
    latent_size: tuple[int, int]
    reference_tokens: torch.Tensor | None
    reference_ids: torch.Tensor | None
    ref_token_counts: tuple[int, ...]
    prompt_embeds: torch.Tensor
    text_ids: torch.Tensor

    @property
    def tgt_tokens(self) -> int:
        """N_tgt."""
        return int(self.latents.shape[1])


class Flux2Family:
    """The FLUX.2 model family: encoding, the multi-reference forward with MOSAIC's capture, the
    LoRA and decoding, over a stock `Flux2KleinPipeline` (or `Flux2Pipeline`).

    One owner for FLUX.2's encoding and decoding: prompts through the pipeline's
    ``encode_prompt`` (Qwen3 hidden states of ``text_encoder_out_layers``), images through the
    pipeline's ``_encode_vae_image`` (distribution mode, 2×2 patchify, batch-norm
    normalisation), ids through its ``_prepare_latent_ids`` / ``_prepare_image_ids``, so a batch is
    encoded as the stock pipeline encodes its references (tested against a pipeline call).

    Args:
        pipe: a `diffusers.Flux2KleinPipeline` or `diffusers.Flux2Pipeline`.
        capture_blocks: ``"all"`` (every block, eq. 8), ``"double"`` (the double-stream blocks),
            or a list of block names (``"transformer_blocks.0"``, ``"single_transformer_blocks.3"``).
        max_sequence_length: prompt tokens (the pipelines pad to 512).
        text_encoder_out_layers: encoder layers stacked into the prompt embedding; None: the
            pipeline's default (``(9, 18, 27)`` for [klein], ``(10, 20, 30)`` for [dev]).
        guidance: the embedded guidance when the transformer has a guidance embedding ([dev]);
            ignored otherwise ([klein]).

    Raises:
        ValueError: on a pipeline without a FLUX.2 transformer or a bad option.

    Example:
        >>> from mosaic_kit.pipelines.tiny_flux2 import TINY_FLUX2_TEXT_OUT_LAYERS, tiny_flux2_pipeline
        >>> family = Flux2Family(tiny_flux2_pipeline(), max_sequence_length=16,
        ...     text_encoder_out_layers=TINY_FLUX2_TEXT_OUT_LAYERS)
        >>> inputs = family.encode(torch.rand(2, 3, 32, 32), ["a cat", "a dog"], torch.rand(2, 2, 3, 16, 16))
        >>> tuple(inputs.latents.shape), inputs.ref_token_counts, inputs.reference_ids[0, :, 0].tolist()
        ((2, 4, 16), (1, 1), [10, 20])
        >>> prediction = family.forward(inputs, torch.randn(2, 4, 16), torch.tensor([0.5, 0.5]))
        >>> tuple(prediction.shape)
        (2, 4, 16)
    """

    name = "flux2"

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
        if isinstance(capture_blocks, str) and capture_blocks not in ("all", "double"):
            raise ValueError(f"Expected `capture_blocks` 'all', 'double' or a list of block names, but got {capture_blocks!r}.")
        if isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, int) or max_sequence_length < 1:
            raise ValueError(f"Expected `max_sequence_length` to be a positive int, but got {max_sequence_length!r}.")
        self.pipe = pipe
        self.capture_blocks = capture_blocks if isinstance(capture_blocks, str) else list(capture_blocks)
        self.max_sequence_length = max_sequence_length
        self.text_encoder_out_layers = None if text_encoder_out_layers is None else tuple(text_encoder_out_layers)
        self.guidance = float(guidance)
        self._handle: CaptureProcessors | None = None

    # -- building ----------------------------------------------------------------------------------
    @classmethod
    def tiny(cls, seed: int = 0, transformer_overrides: dict | None = None, **kwargs: Any) -> Flux2Family:
        """A family over a tiny random `Flux2KleinPipeline` (`mosaic_kit.pipelines.tiny_flux2`).

        Args:
            seed: seed of the random components.
            transformer_overrides: tiny transformer config entries to change.
            **kwargs: `Flux2Family` options; ``text_encoder_out_layers`` defaults to the tiny
                encoder's ``(1, 2, 3)`` and ``max_sequence_length`` to 32.

        Returns:
            The family.

        Example:
            >>> Flux2Family.tiny().pipe.transformer.config.num_layers
            1
        """
        from ..pipelines.tiny_flux2 import TINY_FLUX2_TEXT_OUT_LAYERS, tiny_flux2_components
        from diffusers import Flux2KleinPipeline

        pipe = Flux2KleinPipeline(**tiny_flux2_components(seed=seed, transformer_overrides=transformer_overrides))
        pipe.set_progress_bar_config(disable=True)
        kwargs.setdefault("text_encoder_out_layers", TINY_FLUX2_TEXT_OUT_LAYERS)
        kwargs.setdefault("max_sequence_length", 32)
        return cls(pipe, **kwargs)

    @classmethod
    def from_pretrained(cls, base: str | os.PathLike, torch_dtype: torch.dtype = torch.bfloat16,
                        **kwargs: Any) -> Flux2Family:
        """A family over a FLUX.2 pipeline from the hub or a local folder.

        Args:
            base: hub id (``"black-forest-labs/FLUX.2-klein-4B"``) or a local pipeline folder; its
                ``model_index.json`` picks `Flux2KleinPipeline` or `Flux2Pipeline`.
            torch_dtype: weight dtype of the frozen components.
            **kwargs: `Flux2Family` options.

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
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(base, dtype=torch_dtype)
        pipe.set_progress_bar_config(disable=True)
        return cls(pipe, **kwargs)

    @property
    def transformer(self) -> torch.nn.Module:
        """The stock `Flux2Transformer2DModel` (with the LoRA once added)."""
        return self.pipe.transformer

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell (8); a token covers ``2 · vae_scale_factor`` pixels per side."""
        return int(self.pipe.vae_scale_factor)

    @property
    def device(self) -> torch.device:
        """The transformer's device."""
        return next(self.transformer.parameters()).device

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Flux2Family:
        """Moves the pipeline's modules (and casts them to ``dtype`` when given); returns self."""
        if dtype is None:
            self.pipe.to(device)
        else:
            self.pipe.to(device, dtype)
        return self

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
        multiple = 2 * self.vae_scale_factor
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
    def encode(self, targets: torch.Tensor, prompts: Sequence[str], references: torch.Tensor | None = None) -> Flux2Inputs:
        """Encodes targets, prompts and references into the transformer's inputs.

        Args:
            targets: ``(B, 3, H, W)`` in ``[0, 1]``.
            prompts: B prompts.
            references: ``(B, K, 3, h, w)`` in ``[0, 1]`` (every sample's K slots; a placeholder
                image where a sample has fewer), or None.

        Returns:
            The `Flux2Inputs`.

        Example:
            >>> inputs = Flux2Family.tiny().encode(torch.rand(1, 3, 32, 32), ["a cat"])
            >>> inputs.reference_tokens is None, inputs.latent_size
            (True, (2, 2))
        """
        pipe = self.pipe
        if not isinstance(targets, torch.Tensor) or targets.ndim != 4:
            raise ValueError(f"Expected `targets` of shape (B, 3, H, W), but got {getattr(targets, 'shape', type(targets))}.")
        b = targets.shape[0]
        if len(prompts) != b:
            raise ValueError(f"Expected {b} prompts (one per target), but got {len(prompts)}.")
        device = self.device
        target = self.encode_images(targets)
        latent_ids = pipe._prepare_latent_ids(target).to(device)
        latents = pipe._pack_latents(target).to(device, torch.float32)
        prompt_embeds, text_ids = self.encode_prompts(prompts)
        reference_tokens = reference_ids = None
        counts: tuple[int, ...] = ()
        if references is not None:
            if not isinstance(references, torch.Tensor) or references.ndim != 5 or references.shape[0] != b:
                raise ValueError(
                    f"Expected `references` of shape ({b}, K, 3, h, w), but got {getattr(references, 'shape', type(references))}."
                )
            k = references.shape[1]
            if k:
                refs = self.encode_images(references.flatten(0, 1))  # (B·K, C, h', w')
                per_slot = refs.unflatten(0, (b, k))
                ids = pipe._prepare_image_ids([per_slot[0, j : j + 1] for j in range(k)])  # (1, N_ref, 4)
                reference_ids = ids.expand(b, -1, -1).to(device)
                reference_tokens = torch.cat([pipe._pack_latents(per_slot[:, j]) for j in range(k)], dim=1)
                reference_tokens = reference_tokens.to(device, self.transformer.dtype)
                counts = tuple(int(refs.shape[-2] * refs.shape[-1]) for _ in range(k))
        return Flux2Inputs(
            latents=latents, latent_ids=latent_ids, latent_size=(int(target.shape[-2]), int(target.shape[-1])),
            reference_tokens=reference_tokens, reference_ids=reference_ids, ref_token_counts=counts,
            prompt_embeds=prompt_embeds.to(device, self.transformer.dtype), text_ids=text_ids.to(device),
        )

    def encode_batch(self, batch: Any) -> Flux2Inputs:
        """Encodes a `mosaic_kit.data.MosaicBatch` (targets, captions, references).

        Args:
            batch: a `MosaicBatch` (``targets``, ``captions``, ``references``).

        Returns:
            The `Flux2Inputs`; the reference slots are ``batch.references``'s K slots.

        Example:
            >>> from mosaic_kit.data import MultiSubjectSample, collate_samples
            >>> image = torch.rand(3, 32, 32)
            >>> batch = collate_samples([MultiSubjectSample("a", image, [image], "a cat", [torch.zeros(0, 4)])],
            ...     target_size=32, ref_size=16)
            >>> Flux2Family.tiny().encode_batch(batch).ref_token_counts
            (1,)
        """
        return self.encode(batch.targets, list(batch.captions), batch.references)

    def token_layout(self, inputs: Flux2Inputs) -> SequenceLayout:
        """Where the target and each reference sit in the image stream: ``[target | ref 1 | …]``.

        Args:
            inputs: the encoded batch (with references).

        Returns:
            The `SequenceLayout` shared by the batch.

        Example:
            >>> family = Flux2Family.tiny()
            >>> layout = family.token_layout(family.encode(torch.rand(1, 3, 32, 32), ["a"], torch.rand(1, 2, 3, 16, 16)))
            >>> layout.ref_index.tolist(), layout.image_tokens
            ([[4, 5]], 6)
        """
        if not inputs.ref_token_counts:
            raise ValueError("Expected `inputs` with references for a token layout, but got none.")
        return SequenceLayout.concatenated(inputs.tgt_tokens, inputs.ref_token_counts)

    # -- the forward -------------------------------------------------------------------------------
    def noise(self, latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
        """Flow matching's noisy tokens ``(1 - σ)·x + σ·ε`` (the velocity target is ``ε - x``).

        Args:
            latents: ``(B, N, C)`` clean tokens ``x``.
            noise: ``(B, N, C)`` Gaussian ``ε``.
            sigmas: ``(B,)`` in ``[0, 1]``.

        Returns:
            ``(B, N, C)``.

        Example:
            >>> Flux2Family.tiny().noise(torch.ones(1, 2, 1), torch.zeros(1, 2, 1), torch.tensor([0.25])).flatten().tolist()
            [0.75, 0.75]
        """
        s = sigmas.to(latents.dtype).view(-1, 1, 1)
        return (1 - s) * latents + s * noise

    def transformer_kwargs(self, inputs: Flux2Inputs, noisy: torch.Tensor, timestep: torch.Tensor) -> dict:
        """The stock transformer's keyword arguments, as the pipelines build them.

        Args:
            inputs: the encoded batch.
            noisy: ``(B, N_tgt, C)`` noisy target tokens.
            timestep: ``(B,)`` sigmas in ``[0, 1]`` (the pipelines pass ``t / 1000``).

        Returns:
            ``hidden_states`` ``[target | refs]``, ``img_ids``, ``encoder_hidden_states``,
            ``txt_ids``, ``timestep``, ``guidance`` (None for [klein]), ``return_dict=False``.

        Example:
            >>> family = Flux2Family.tiny()
            >>> inputs = family.encode(torch.rand(1, 3, 32, 32), ["a"], torch.rand(1, 1, 3, 16, 16))
            >>> kwargs = family.transformer_kwargs(inputs, inputs.latents, torch.tensor([1.0]))
            >>> tuple(kwargs["hidden_states"].shape), tuple(kwargs["img_ids"].shape)
            ((1, 5, 16), (1, 5, 4))
        """
        dtype = self.transformer.dtype
        if noisy.shape != inputs.latents.shape:
            raise ValueError(f"Expected `noisy` of shape {tuple(inputs.latents.shape)}, but got {tuple(noisy.shape)}.")
        hidden, ids = noisy.to(dtype), inputs.latent_ids
        if inputs.reference_tokens is not None:
            hidden = torch.cat([hidden, inputs.reference_tokens.to(dtype)], dim=1)
            ids = torch.cat([ids, inputs.reference_ids], dim=1)
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((noisy.shape[0],), self.guidance, device=noisy.device, dtype=torch.float32)
        return {"hidden_states": hidden, "img_ids": ids, "encoder_hidden_states": inputs.prompt_embeds.to(dtype),
                "txt_ids": inputs.text_ids, "timestep": timestep.to(dtype), "guidance": guidance,
                "return_dict": False}

    def capture_handle(self) -> CaptureProcessors:
        """The capture processors on the chosen blocks (installed on first use).

        Example:
            >>> Flux2Family.tiny(capture_blocks="double").capture_handle().block_names
            ('transformer_blocks.0',)
        """
        if self._handle is None:
            blocks: str | list[str] | Callable[[str], bool] = self.capture_blocks
            if blocks == "double":
                blocks = lambda name: name.startswith("transformer_blocks.")  # noqa: E731
            self._handle = install_capture_processors(self.transformer, blocks=blocks)
        return self._handle

    def forward(self, inputs: Flux2Inputs, noisy: torch.Tensor, timestep: torch.Tensor,
                capture: RefTargetCapture | None = None) -> torch.Tensor:
        """The stock forward over ``[target | refs]``; returns the target's prediction.

        Args:
            inputs: the encoded batch.
            noisy: ``(B, N_tgt, C)`` noisy target tokens.
            timestep: ``(B,)`` sigmas.
            capture: a `RefTargetCapture` fed by every chosen block (needs references), or None.

        Returns:
            ``(B, N_tgt, C)`` the predicted velocity of the target tokens (the references'
            outputs are discarded, as in the pipelines).

        Example:
            >>> from mosaic_kit.correspondence import Correspondences
            >>> family = Flux2Family.tiny()
            >>> inputs = family.encode(torch.rand(1, 3, 32, 32), ["a"], torch.rand(1, 1, 3, 32, 32))
            >>> capture = RefTargetCapture(Correspondences.from_dicts([[{0: 0, 3: 3}]], ref_tokens=[4], tgt_tokens=4))
            >>> _ = family.forward(inputs, torch.randn(1, 4, 16), torch.tensor([0.5]), capture)
            >>> capture.result().num_blocks  # one double + two single blocks
            3
        """
        kwargs = self.transformer_kwargs(inputs, noisy, timestep)
        context = contextlib.nullcontext()
        if capture is not None:
            context = self.capture_handle().capture(capture, self.token_layout(inputs))
        with context:
            out = self.transformer(**kwargs)[0]
        return out[:, : inputs.tgt_tokens]

    # -- LoRA --------------------------------------------------------------------------------------
    def add_lora(self, rank: int, alpha: float | None = None, targets: Sequence[str] = FLUX2_LORA_TARGETS,
                 init: str | bool = True) -> list[str]:
        """Adds a peft LoRA (adapter ``"default"``) on the target projections of the transformer.

        Args:
            rank: LoRA rank.
            alpha: LoRA alpha (None: ``rank``, scale 1).
            targets: module-name suffixes (`FLUX2_LORA_TARGETS`).
            init: peft's ``init_lora_weights`` (True: B = 0, the output is unchanged; ``"gaussian"``
                and B = 0 likewise; pass False for random B in tests).

        Returns:
            The full names of the wrapped modules.

        Example:
            >>> family = Flux2Family.tiny()
            >>> len(family.add_lora(rank=4))  # 12 in the double block, 2 in each single block
            16
        """
        from peft import LoraConfig

        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"Expected `rank` to be a positive int, but got {rank!r}.")
        names = flux2_lora_target_modules(self.transformer, targets)
        config = LoraConfig(r=rank, lora_alpha=rank if alpha is None else alpha, target_modules=names,
                            init_lora_weights=init)
        self.transformer.add_adapter(config)
        return names

    def trainable_parameters(self, trainable: str = "lora") -> list[torch.nn.Parameter]:
        """Sets ``requires_grad`` on the transformer (LoRA only, or every weight) and returns them.

        The autoencoder and the text encoder stay frozen either way.

        Args:
            trainable: ``"lora"`` or ``"all"``.

        Returns:
            The trainable parameters, in module order.

        Example:
            >>> family = Flux2Family.tiny()
            >>> _ = family.add_lora(rank=2)
            >>> sum(p.numel() for p in family.trainable_parameters("lora")) < sum(p.numel() for p in family.transformer.parameters())
            True
        """
        if trainable not in ("lora", "all"):
            raise ValueError(f"Expected `trainable` 'lora' or 'all', but got {trainable!r}.")
        for module in (self.pipe.vae, self.pipe.text_encoder):
            if module is not None:
                module.requires_grad_(False)
        params = []
        for name, param in self.transformer.named_parameters():
            param.requires_grad_(trainable == "all" or ".lora_" in name)
            if param.requires_grad:
                params.append(param)
        if not params:
            raise ValueError("Expected trainable parameters, but found none (add a LoRA first with `add_lora`).")
        return params

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """The LoRA weights in diffusers' layout without the ``transformer.`` prefix (peft's
        ``get_peft_model_state_dict``).

        Example:
            >>> family = Flux2Family.tiny()
            >>> _ = family.add_lora(rank=2, targets=["to_q"])
            >>> sorted(family.lora_state_dict())[0]
            'transformer_blocks.0.attn.to_q.lora_A.weight'
        """
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(self.transformer)

    def save_lora(self, directory: str | os.PathLike) -> Path:
        """Writes the LoRA as ``pytorch_lora_weights.safetensors`` with its adapter metadata.

        The file is diffusers' layout (``transformer.<module>.lora_A.weight``), so
        ``Flux2KleinPipeline.load_lora_weights(directory)`` and ``Flux2Pipeline``'s load it exactly
        (the metadata carries ``lora_alpha``; without it a reload would use alpha = rank).

        Args:
            directory: the output folder (created).

        Returns:
            The path of the written file.

        Example:
            >>> import tempfile
            >>> family = Flux2Family.tiny()
            >>> _ = family.add_lora(rank=2)
            >>> family.save_lora(tempfile.mkdtemp()).name
            'pytorch_lora_weights.safetensors'
        """
        from diffusers import Flux2KleinPipeline

        peft_config = getattr(self.transformer, "peft_config", {}).get("default")
        if peft_config is None:
            raise ValueError("Expected a LoRA adapter 'default' on the transformer (`add_lora`), but found none.")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.lora_state_dict().items()}
        Flux2KleinPipeline.save_lora_weights(directory, transformer_lora_layers=state,
                                             transformer_lora_adapter_metadata=peft_config.to_dict())
        return directory / FLUX2_LORA_FILE

    def load_lora(self, path: str | os.PathLike, adapter_name: str | None = None) -> None:
        """Loads a FLUX.2 LoRA file or folder through the pipeline's stock ``load_lora_weights``.

        Args:
            path: a folder holding ``pytorch_lora_weights.safetensors``, or the file.
            adapter_name: the adapter's name (diffusers picks ``default_0`` when None).

        Example:
            >>> import tempfile
            >>> family = Flux2Family.tiny()
            >>> _ = family.add_lora(rank=2, init=False)
            >>> folder = family.save_lora(tempfile.mkdtemp()).parent
            >>> other = Flux2Family.tiny()
            >>> other.load_lora(folder)
            >>> other.transformer.active_adapters()
            ['default_0']
        """
        path = Path(path)
        if path.is_file():
            self.pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=adapter_name)
        else:
            self.pipe.load_lora_weights(str(path), adapter_name=adapter_name)

    # -- decoding ----------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, latents: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
        """Target tokens to images, as the pipelines decode (unpack, de-normalise, unpatchify, VAE).

        Args:
            latents: ``(B, N_tgt, C)`` packed tokens.
            latent_size: ``(rows, cols)`` of the token grid.

        Returns:
            ``(B, 3, 16·rows, 16·cols)`` float32 in ``[0, 1]``.

        Example:
            >>> family = Flux2Family.tiny()
            >>> inputs = family.encode(torch.rand(1, 3, 32, 48), ["a"])
            >>> tuple(family.decode(inputs.latents, inputs.latent_size).shape)
            (1, 3, 32, 48)
        """
        pipe, vae = self.pipe, self.pipe.vae
        rows, cols = latent_size
        if latents.ndim != 3 or latents.shape[1] != rows * cols:
            raise ValueError(f"Expected `latents` of shape (B, {rows * cols}, C), but got {tuple(latents.shape)}.")
        grid = latents.transpose(1, 2).reshape(latents.shape[0], latents.shape[2], rows, cols).to(vae.dtype)
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(grid)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(grid)
        grid = pipe._unpatchify_latents(grid * std + mean)
        images = vae.decode(grid, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)
