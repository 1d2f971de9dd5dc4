"""`MosaicFluxTransformer`: FLUX.1 with K reference images, the MOSAIC multi-reference forward
(eq. 4-7); its public API and input checks (the block forwards are in ``_diffusers.py``).

The model is a stock diffusers `FluxTransformer2DModel`; nothing of it is forked or patched.
`MosaicFluxTransformer` holds it, installs `MosaicFluxAttnProcessor` through diffusers'
``set_attn_processor`` and runs the block stack with three token streams:

- **text** (``N_txt`` tokens): ``context_embedder``, the context projections of the double
  blocks, timestep embedding ``(t, guidance, pooled)``;
- **target** (``N_tgt`` tokens, the noisy latent): the base image weights, the same embedding;
- **references** (the K reference latents concatenated, ``N_ref = Σ N^(k)`` tokens): the base
  image weights **plus the reference LoRA** (peft, adapter ``"mosaic"``), their own embedding
  ``(t_ref = 0, guidance_ref, pooled)`` and their own modulation.

Attention (eq. 7): text and target queries attend to every key; the queries of reference k attend
to text, target and reference k only (``reference_attention="isolated"``, as released) or to
everything (``"full"``). This takes two attention calls per block whatever K is: one for text +
target queries and one batched call for all references (references of equal size are folded into
the batch; references of different sizes share one masked call).

The reference LoRA acts on reference tokens only: every adapted linear layer is called through its
``base_layer`` for text and target tokens and through the peft layer for reference tokens, so no
adapter state is toggled during the forward.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ...attention import RefTargetCapture
from ...utils.checks import check_option
from ...utils.finite import check_finite
from ._diffusers import FluxTransformer2DModel, MosaicFluxAttnProcessor, _FluxInternals
from .lora import DEFAULT_ADAPTER, _base
from .processor import ReferenceKVCache

REFERENCE_ATTENTION = ("isolated", "full")
"""Allowed values of ``reference_attention``."""

CAPTURE_BLOCKS = ("double", "all")
"""Allowed values of ``capture_blocks``: the double-stream blocks (released) or every block."""


class MosaicFluxTransformer(_FluxInternals, nn.Module):
    """A stock `FluxTransformer2DModel` run with K reference images (eq. 4-7).

    Holding the transformer as ``self.transformer`` keeps its weights, adapters, gradient
    checkpointing and attention backend under diffusers' and peft's own APIs; this module only
    adds the multi-reference forward. With no references its output equals the stock forward.

    Args:
        transformer: a diffusers `FluxTransformer2DModel` (e.g. ``from_pretrained(...,
            subfolder="transformer")``), with or without the reference LoRA.
        reference_attention: ``"isolated"`` (released: a reference attends to text, target and
            itself) or ``"full"`` (references also attend to each other).
        reference_timestep: the timestep of reference tokens (released: 0, clean).
        capture_blocks: which blocks feed a `RefTargetCapture`: ``"double"`` (released) or
            ``"all"``.
        reference_adapter: the peft adapter name of the reference LoRA, the one adapter that
            acts on reference tokens only. Any other active adapter (a style LoRA loaded with
            ``load_lora_weights`` or ``add_adapter``) acts on every token, as in stock diffusers.

    Example:
        >>> from mosaic_kit.models.testing import tiny_flux_transformer, random_packed_inputs
        >>> model = MosaicFluxTransformer(tiny_flux_transformer())
        >>> inputs = random_packed_inputs(model.transformer, batch=2, target_size=(32, 32),
        ...                               reference_sizes=[(32, 32), (16, 32)])
        >>> model(**inputs).shape  # (B, N_tgt, C): one prediction per target token
        torch.Size([2, 4, 64])
    """

    def __init__(
        self,
        transformer: FluxTransformer2DModel,
        reference_attention: str = "isolated",
        reference_timestep: float = 0.0,
        capture_blocks: str = "double",
        reference_adapter: str = DEFAULT_ADAPTER,
    ) -> None:
        super().__init__()
        if not isinstance(reference_adapter, str) or not reference_adapter:
            raise ValueError(f"Expected `reference_adapter` to be a non-empty string, but got {reference_adapter!r}.")
        if not isinstance(transformer, FluxTransformer2DModel):
            raise ValueError(f"Expected `transformer` to be a FluxTransformer2DModel, but got {type(transformer).__name__}.")
        check_option("reference_attention", reference_attention, REFERENCE_ATTENTION)
        check_option("capture_blocks", capture_blocks, CAPTURE_BLOCKS)
        if not isinstance(reference_timestep, (int, float)) or not 0 <= reference_timestep <= 1:
            raise ValueError(f"Expected `reference_timestep` in [0, 1], but got {reference_timestep!r}.")
        self.transformer = transformer
        self.reference_attention = reference_attention
        self.reference_timestep = float(reference_timestep)
        self.capture_blocks = capture_blocks
        self.reference_adapter = reference_adapter
        processor = MosaicFluxAttnProcessor()
        previous = next(iter(transformer.attn_processors.values()), None)
        for name in ("_attention_backend", "_parallel_config"):  # keep a backend chosen before wrapping
            setattr(processor, name, getattr(previous, name, None))
        transformer.set_attn_processor(processor)


    # -- public --------------------------------------------------------------------------------------
    def forward(
        self,
        target_tokens: torch.Tensor,
        text_embeddings: torch.Tensor,
        pooled_embeddings: torch.Tensor,
        timestep: torch.Tensor,
        target_ids: torch.Tensor,
        text_ids: torch.Tensor,
        reference_tokens: torch.Tensor | None = None,
        reference_ids: torch.Tensor | None = None,
        reference_token_counts: Sequence[int] | None = None,
        guidance: torch.Tensor | None = None,
        reference_guidance: float | torch.Tensor | None = None,
        capture: RefTargetCapture | list | None = None,
        reference_cache: ReferenceKVCache | None = None,
    ) -> torch.Tensor:
        """The multi-reference forward on packed inputs: the one path shared by training,
        inference and outside checks.

        Args:
            target_tokens: ``(B, N_tgt, C_in)`` packed noisy target latents (`pack_latents`).
            text_embeddings: ``(B, N_txt, D_joint)`` T5 embeddings.
            pooled_embeddings: ``(B, D_pooled)`` CLIP pooled embedding.
            timestep: ``(B,)`` flow-matching time in ``[0, 1]`` (the stock forward's convention;
                it is multiplied by 1000 inside).
            target_ids: ``(N_tgt, 3)`` target position ids (`latent_image_ids`).
            text_ids: ``(N_txt, 3)`` text position ids (zeros in FLUX).
            reference_tokens: ``(B, N_ref, C_in)`` the K packed clean reference latents
                concatenated in slot order, or None.
            reference_ids: ``(N_ref, 3)`` their position ids (`reference_position_ids`).
            reference_token_counts: tokens of each reference (``N^(k)``); default: one reference.
            guidance: ``(B,)`` guidance scale for text and target (guidance-distilled models).
            reference_guidance: guidance for the reference stream; default: ``guidance``
                (released inference uses 1.0).
            capture: a `RefTargetCapture` (or anything with its ``add(query, key)``, or a list of
                them) fed with post-RoPE reference queries and target keys of the blocks chosen by
                ``capture_blocks``. It is fed inside each block's function, so with gradient
                checkpointing the queries and keys are freed with the block and recomputed in
                backward; the recomputation calls ``add`` again during the backward pass
                (`RefTargetCapture` and `PointAttentionRows` recognise it and count each block once;
                a capture of your own must do the same, see ``RefTargetCapture.add``).
            reference_cache: reference keys/values from `build_reference_cache` (then
                ``reference_tokens`` must be None; references attend only to themselves).

        Returns:
            ``(B, N_tgt, C_out)`` the velocity prediction for the target tokens.
        """
        t = self.transformer
        _check_tokens("target_tokens", target_tokens, t.config.in_channels)
        batch = target_tokens.shape[0]
        _check_tokens("text_embeddings", text_embeddings, t.config.joint_attention_dim, batch, "D_joint", min_tokens=0)
        _check_ids("target_ids", target_ids, target_tokens.shape[1])
        _check_ids("text_ids", text_ids, text_embeddings.shape[1])
        self._check_conditioning(batch, pooled_embeddings, timestep, guidance, reference_guidance)
        first = self._input_modules()
        _check_dtype("target_tokens", target_tokens, first["tokens"])
        _check_dtype("text_embeddings", text_embeddings, first["text"])
        for name, tensor in (("target_tokens", target_tokens), ("text_embeddings", text_embeddings),
                             ("target_ids", target_ids), ("text_ids", text_ids)):
            check_finite(name, tensor)  # behind the `finite_checks` switch: a sync per tensor
        counts = self._check_references(reference_tokens, reference_ids, reference_token_counts, batch)
        if reference_cache is not None:
            if not isinstance(reference_cache, ReferenceKVCache):
                raise ValueError(
                    "Expected `reference_cache` to be a ReferenceKVCache (from `build_reference_cache`), but got "
                    f"{type(reference_cache).__name__}."
                )
            if reference_tokens is not None:
                raise ValueError("Expected `reference_tokens=None` with a `reference_cache` (its keys replace them).")
            if capture is not None:
                raise ValueError("Expected no `capture` with a `reference_cache`: reference queries are not computed.")
            if reference_cache.batch_size not in (1, batch):
                raise ValueError(f"Expected a reference cache of batch 1 or {batch}, but got {reference_cache.batch_size}.")
            counts = reference_cache.reference_token_counts
            blocks = self._num_blocks()
            if len(reference_cache.keys) != blocks or len(reference_cache.values) != blocks:
                raise ValueError(
                    f"Expected a reference cache with one entry per block ({blocks}), but got {len(reference_cache.keys)}."
                )
        if capture is not None and reference_tokens is None:
            raise ValueError("Expected `reference_tokens` with a `capture`.")
        captures = [] if capture is None else list(capture) if isinstance(capture, (list, tuple)) else [capture]
        for k, each in enumerate(captures):
            if not callable(getattr(each, "add", None)):
                raise ValueError(
                    f"Expected `capture` to be a RefTargetCapture (anything with `add(query, key)`) or a list of them, "
                    f"but {'got' if len(captures) == 1 else f'item {k} is'} {type(each).__name__}."
                )
        return self._run_stack(target_tokens, text_embeddings, pooled_embeddings, timestep, target_ids, text_ids,
                               reference_tokens, reference_ids, counts, guidance, reference_guidance, capture,
                               captures, reference_cache)

    @torch.no_grad()
    def build_reference_cache(
        self,
        reference_tokens: torch.Tensor,
        reference_ids: torch.Tensor,
        pooled_embeddings: torch.Tensor,
        reference_token_counts: Sequence[int] | None = None,
        guidance: torch.Tensor | None = None,
        reference_guidance: float | torch.Tensor | None = None,
    ) -> ReferenceKVCache:
        """Runs the reference stream alone once (references attend only to themselves) and keeps
        every block's reference keys and values for `forward(reference_cache=...)`.

        A speed/quality trade-off for inference: the reference stream no longer sees the text or
        the current target, so its cost leaves the sampling loop (it does not depend on the step),
        but its features differ from the ones the LoRA was trained with.

        Args:
            reference_tokens: ``(B, N_ref, C_in)`` packed clean reference latents.
            reference_ids: ``(N_ref, 3)`` their position ids.
            pooled_embeddings: ``(B, D_pooled)`` (enters the reference embedding).
            reference_token_counts: tokens per reference.
            guidance: ``(B,)`` used when ``reference_guidance`` is None.
            reference_guidance: the reference stream's guidance (released inference: 1.0).

        Returns:
            The cache.
        """
        t = self.transformer
        _check_tokens("reference_tokens", reference_tokens, t.config.in_channels)
        batch = reference_tokens.shape[0]
        self._check_conditioning(batch, pooled_embeddings, None, guidance, reference_guidance)
        counts = self._check_references(reference_tokens, reference_ids, reference_token_counts, batch)
        return self._run_reference_stack(reference_tokens, reference_ids, pooled_embeddings, counts, guidance,
                                         reference_guidance)

    def _check_references(self, reference_tokens, reference_ids, counts, batch) -> tuple[int, ...]:
        if reference_tokens is None:
            if reference_ids is not None or counts:
                raise ValueError("Expected `reference_ids` and `reference_token_counts` only with `reference_tokens`.")
            return ()
        _check_tokens("reference_tokens", reference_tokens, self.transformer.config.in_channels, batch)
        _check_dtype("reference_tokens", reference_tokens, self._input_modules()["tokens"])
        check_finite("reference_tokens", reference_tokens)
        total = reference_tokens.shape[1]
        if counts is not None and not isinstance(counts, (tuple, list)):
            raise ValueError(f"Expected `reference_token_counts` to be a tuple of ints, but got {type(counts).__name__}.")
        counts = (total,) if counts is None else tuple(counts)
        if not counts or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in counts) or sum(counts) != total:
            raise ValueError(
                f"Expected `reference_token_counts` of positive ints summing to N_ref = {total}, but got {counts!r}."
            )
        if reference_ids is None:
            raise ValueError("Expected `reference_ids` (N_ref, 3) with `reference_tokens`.")
        _check_ids("reference_ids", reference_ids, total)
        check_finite("reference_ids", reference_ids)
        return counts

    def _check_conditioning(self, batch, pooled, timestep, guidance, reference_guidance) -> None:
        """Shapes of the pooled embedding, timestep and guidance for the batch; the timestep in
        [0, 1] and the guidance finite, in one device sync per forward (not per block)."""
        config = self.transformer.config
        _check_tensor("pooled_embeddings", pooled, (batch, config.pooled_projection_dim), "(B, D_pooled)")
        _check_dtype("pooled_embeddings", pooled, self._input_modules()["pooled"])
        check_finite("pooled_embeddings", pooled)
        if timestep is not None:
            _check_tensor("timestep", timestep, (batch,), "(B,)")
        if config.guidance_embeds:
            if guidance is None:
                raise ValueError("Expected `guidance` for a guidance-distilled transformer (guidance_embeds=True).")
            _check_tensor("guidance", guidance, (batch,), "(B,)")
        elif guidance is not None:
            raise ValueError(
                "Expected `guidance=None`: this transformer has no guidance embedding (guidance_embeds=False), "
                f"but got a {type(guidance).__name__}."
            )
        if reference_guidance is not None:
            if isinstance(reference_guidance, torch.Tensor):
                if reference_guidance.shape not in ((), (batch,)) or not reference_guidance.is_floating_point():
                    raise ValueError(
                        f"Expected `reference_guidance` as a float, a 0-d or a ({batch},) float tensor, but got "
                        f"shape {tuple(reference_guidance.shape)} {reference_guidance.dtype}."
                    )
            elif isinstance(reference_guidance, bool) or not isinstance(reference_guidance, (int, float)):
                raise ValueError(f"Expected `reference_guidance` to be a number or a tensor, but got {reference_guidance!r}.")
            elif not math.isfinite(reference_guidance):
                raise ValueError(f"Expected a finite `reference_guidance`, but got {reference_guidance!r}.")
        values = []
        if timestep is not None:
            values.append(((timestep >= 0) & (timestep <= 1)).all())
        if config.guidance_embeds:
            values.append(torch.isfinite(guidance).all())
        if isinstance(reference_guidance, torch.Tensor):
            values.append(torch.isfinite(reference_guidance).all().to(values[0].device) if values else
                          torch.isfinite(reference_guidance).all())
        if values and _has_values(values[0]) and not bool(torch.stack([v.to(values[0].device) for v in values]).all()):  # the one sync
            if timestep is not None and not bool(((timestep >= 0) & (timestep <= 1)).all()):
                raise ValueError(
                    "Expected `timestep` in [0, 1] (the flow-matching time; the forward multiplies it by 1000 "
                    f"itself, so do not pass 0-1000), but got values in [{timestep.min().item():g}, "
                    f"{timestep.max().item():g}]{' and NaN' if bool(timestep.isnan().any()) else ''}."
                )
            for name, tensor in (("guidance", guidance), ("reference_guidance", reference_guidance)):
                if isinstance(tensor, torch.Tensor):
                    check_finite(name, tensor, force=True)


def _has_values(tensor: torch.Tensor) -> bool:
    """False for a tensor without data: on the ``meta`` device, or a fake tensor
    (``torch._subclasses.fake_tensor``, as ``benchmarks/bench_memory.py`` uses to measure memory at
    real scale). Checks that read values back are skipped for those; shapes are still checked."""
    if tensor.device.type == "meta":
        return False
    from torch._subclasses.fake_tensor import is_fake

    return not is_fake(tensor)


def _check_tokens(
    name: str, tokens: torch.Tensor, channels: int, batch: int | None = None, what: str = "C_in", min_tokens: int = 1
) -> None:
    ok = isinstance(tokens, torch.Tensor) and tokens.ndim == 3 and tokens.shape[2] == channels
    ok = ok and tokens.shape[0] >= 1 and tokens.shape[1] >= min_tokens and (batch is None or tokens.shape[0] == batch)
    if not ok:
        got = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        b = "B ≥ 1" if batch is None else batch
        n = "N" if min_tokens == 0 else f"N ≥ {min_tokens}"
        raise ValueError(f"Expected `{name}` of shape ({b}, {n}, {what} = {channels}), but got {got}.")
    if not tokens.is_floating_point():
        raise ValueError(f"Expected `{name}` to be a floating-point tensor, but got {tokens.dtype}.")


def _check_tensor(name: str, value: torch.Tensor, shape: tuple[int, ...], layout: str) -> None:
    if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape:
        got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"Expected `{name}` of shape {layout} = {shape}, but got {got}.")
    if not value.is_floating_point():
        raise ValueError(f"Expected `{name}` to be a floating-point tensor, but got {value.dtype}.")


def _check_dtype(name: str, tensor: torch.Tensor, module: nn.Module) -> None:
    """The input's dtype must be the weights' (outside autocast, which casts both itself)."""
    weight = _base(module).weight
    if tensor.dtype != weight.dtype and not torch.is_autocast_enabled(tensor.device.type):
        raise ValueError(
            f"Expected `{name}` in the model's dtype {weight.dtype} (or a torch.autocast region), but got "
            f"{tensor.dtype}; cast it with `.to({weight.dtype})`."
        )


def _check_ids(name: str, ids: torch.Tensor, tokens: int) -> None:
    if not isinstance(ids, torch.Tensor) or tuple(ids.shape) != (tokens, 3):
        got = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"Expected `{name}` of shape ({tokens}, 3), but got {got}.")

