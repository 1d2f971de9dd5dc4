"""Capture processors for diffusers DiTs that put the reference tokens in the target's sequence.

FLUX.1-Kontext, FLUX.2, Qwen-Image-Edit-Plus, OmniGen2, UNO and in-context LoRAs on SD3 run the
target and the K references through the same attention: the references are extra image tokens
of one joint sequence. MOSAIC then needs, per chosen block, the post-RoPE queries of the
reference tokens and the post-RoPE keys of the target tokens, exactly as the model's softmax
sees them. The only place where they exist is the attention processor, so this module offers:

- `SequenceLayout`: where the target and each reference sit in the image part of the joint
  sequence (per sample when they differ), and the gather that turns the joint queries and keys
  into the ``(B, H, N_ref_total, D)`` / ``(B, H, N_tgt, D)`` that `RefTargetCapture.add` takes.
- `install_capture_processors`: installs, through diffusers' ``set_attn_processor``, one capture
  processor per chosen block, picked by the attention's stock processor class, and returns a
  `CaptureProcessors` handle (``with handle.capture(capture, layout): ...``; ``handle.remove()``).
- The processors: `FluxCaptureProcessor` (`FluxTransformer2DModel`, double and single blocks),
  `Flux2CaptureProcessor` and `Flux2ParallelCaptureProcessor` (`Flux2Transformer2DModel`),
  `SD3CaptureProcessor` (`SD3Transformer2DModel`, joint attention) and `QwenCaptureProcessor`
  (`QwenImageTransformer2DModel`). Each subclasses the stock processor: with no capture active it
  *is* the stock call (bit-identical output); with one active it runs a copy of the stock body
  that hands the post-norm, post-RoPE query and key to the capture just before the softmax.

All five stock processors call the softmax with its default scale, ``1/sqrt(D)`` (none of them
reads ``attn.scale``), which is also `RefTargetCapture`'s default; a capture built with another
``scale`` is refused. SD3.5-style blocks have a second, image-only attention ``attn2``: it keeps
its stock processor and never feeds, so every chosen block feeds exactly once per forward.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import JointAttnProcessor2_0
from diffusers.models.transformers import transformer_flux as _flux
from diffusers.models.transformers import transformer_flux2 as _flux2
from diffusers.models.transformers import transformer_qwenimage as _qwen

from ..attention import RefTargetCapture
from ..correspondence import Correspondences
from ..utils.checks import check_int

__all__ = [
    "CaptureProcessors",
    "Flux2CaptureProcessor",
    "Flux2ParallelCaptureProcessor",
    "FluxCaptureProcessor",
    "QwenCaptureProcessor",
    "SD3CaptureProcessor",
    "SequenceLayout",
    "install_capture_processors",
]


def _check_index(name: str, index: object) -> torch.Tensor:
    if not isinstance(index, torch.Tensor) or index.dtype != torch.long or index.dim() != 2:
        got = f"{index.dtype} tensor of shape {tuple(index.shape)}" if isinstance(index, torch.Tensor) else type(index).__name__
        raise ValueError(f"Expected `{name}` to be a (B or 1, N) torch.long tensor, but got {got}.")
    return index


def _box_indices(canvas_cols: int, box: Sequence[int], name: str, canvas_rows: int) -> torch.Tensor:
    if len(box) != 4:
        raise ValueError(f"Expected `{name}` as (top, left, rows, cols) in tokens, but got {tuple(box)!r}.")
    top, left, rows, cols = (check_int(name, v, minimum=0) for v in box)
    if rows < 1 or cols < 1 or top + rows > canvas_rows or left + cols > canvas_cols:
        raise ValueError(
            f"Expected `{name}` = (top, left, rows, cols) with rows, cols >= 1 inside the "
            f"{canvas_rows}x{canvas_cols} token canvas, but got {tuple(box)!r}."
        )
    r = torch.arange(top, top + rows)[:, None]
    c = torch.arange(left, left + cols)[None, :]
    return (r * canvas_cols + c).flatten()


@dataclass(frozen=True, eq=False)
class SequenceLayout:
    """Where the target and each reference sit in the image part of a joint token sequence.

    Positions count image tokens only, in the order the model's image stream holds them (the
    ``hidden_states`` the transformer gets, after patchification); the processors add the text
    offset of their own joint sequence (FLUX, FLUX.2 and Qwen-Image put text first inside
    attention, SD3 puts it last). Token ``i`` of the target (or of reference ``k``) is the
    ``i``-th entry of its index list, so the lists must follow the row-major order that
    `mosaic_kit.correspondence.TokenGrid` and the `Correspondences` use.

    A layout shared by the whole batch has index tensors with a leading dimension of 1; a batch
    whose samples differ (references at other positions, a padded placeholder reference) stacks
    one row per sample (`stack`). The token counts per slot are shared, as in `Correspondences`:
    an absent reference still occupies its slot (a placeholder image) and is marked absent there.

    Args:
        target_index: ``(1 or B, N_tgt)`` long, image-stream positions of the target tokens.
        ref_index: ``(1 or B, N_ref_total)`` long, image-stream positions of the reference tokens,
            the K references concatenated in slot order.
        ref_tokens: ``N^(k)``, the token count of each reference slot (sums to ``N_ref_total``).
        image_tokens: length of the image stream (every position is below it).

    Example:
        >>> layout = SequenceLayout.concatenated(tgt_tokens=4, ref_tokens=[2, 3])  # [target | ref1 | ref2]
        >>> layout.ref_index, layout.image_tokens
        (tensor([[4, 5, 6, 7, 8]]), 9)
        >>> query = torch.arange(9.0).view(1, 9, 1, 1)  # (B, S, H, D), S = the image stream
        >>> ref_query, tgt_key = layout.split(query, query, image_offset=0, seq_dim=1)
        >>> ref_query.flatten().tolist(), tgt_key.flatten().tolist()
        ([4.0, 5.0, 6.0, 7.0, 8.0], [0.0, 1.0, 2.0, 3.0])
    """

    target_index: torch.Tensor
    ref_index: torch.Tensor
    ref_tokens: tuple[int, ...]
    image_tokens: int

    def __post_init__(self) -> None:
        target = _check_index("target_index", self.target_index).cpu()
        refs = _check_index("ref_index", self.ref_index).cpu()
        object.__setattr__(self, "target_index", target)
        object.__setattr__(self, "ref_index", refs)
        ref_tokens = tuple(check_int("ref_tokens[k]", n, minimum=1) for n in self.ref_tokens)
        if not ref_tokens:
            raise ValueError("Expected `ref_tokens` with at least one reference, but got none.")
        object.__setattr__(self, "ref_tokens", ref_tokens)
        object.__setattr__(self, "image_tokens", check_int("image_tokens", self.image_tokens, minimum=1))
        if target.shape[0] != refs.shape[0]:
            raise ValueError(
                f"Expected `target_index` and `ref_index` with one leading size (1 or B), but got "
                f"{target.shape[0]} and {refs.shape[0]}."
            )
        if refs.shape[1] != sum(ref_tokens):
            raise ValueError(
                f"Expected `ref_index` with sum(ref_tokens) = {sum(ref_tokens)} columns, but got {refs.shape[1]}."
            )
        if target.shape[1] < 1:
            raise ValueError("Expected `target_index` with at least one target token, but got none.")
        both = torch.cat([target, refs], dim=1)
        if bool((both < 0).any() | (both >= self.image_tokens).any()):
            raise ValueError(
                f"Expected every position in [0, image_tokens) = [0, {self.image_tokens}), but got values in "
                f"[{int(both.min())}, {int(both.max())}]."
            )
        if bool((both.sort(dim=1).values.diff(dim=1) == 0).any()):
            raise ValueError("Expected every image position used once per sample (target and references disjoint), but got repeats.")
        object.__setattr__(self, "_runs", {})

    # -- constructors -------------------------------------------------------------------------------
    @classmethod
    def concatenated(
        cls, tgt_tokens: int, ref_tokens: Sequence[int], image_tokens: int | None = None
    ) -> SequenceLayout:
        """The Kontext / FLUX.2 / Qwen-Image-Edit layout: ``[target | ref 1 | ... | ref K]``.

        Args:
            tgt_tokens: N_tgt.
            ref_tokens: N^(k) per reference, in slot order.
            image_tokens: image-stream length; default ``N_tgt + sum(ref_tokens)`` (give more when
                further image tokens follow, e.g. a control image).

        Returns:
            A layout shared by the batch.

        Example:
            >>> SequenceLayout.concatenated(16, [4, 4]).target_index.shape
            torch.Size([1, 16])
        """
        tgt_tokens = check_int("tgt_tokens", tgt_tokens, minimum=1)
        total = tgt_tokens + sum(check_int("ref_tokens[k]", n, minimum=1) for n in ref_tokens)
        return cls(
            target_index=torch.arange(tgt_tokens)[None],
            ref_index=torch.arange(tgt_tokens, total)[None],
            ref_tokens=tuple(ref_tokens),
            image_tokens=total if image_tokens is None else image_tokens,
        )

    @classmethod
    def from_canvas(
        cls, canvas: tuple[int, int], target: Sequence[int], references: Sequence[Sequence[int]]
    ) -> SequenceLayout:
        """The in-context (canvas) layout: target and references tiled in one image, e.g. side by side.

        This is how a model whose forward takes one latent image (SD3, most UNet-free DiTs
        without a reference input) sees references with no change to its forward: concatenate
        the latents along the width (or height) and patchify as usual.

        Args:
            canvas: ``(rows, cols)`` of the token grid of the whole canvas.
            target: ``(top, left, rows, cols)`` of the target's box, in tokens.
            references: one ``(top, left, rows, cols)`` box per reference, in slot order.

        Returns:
            A layout shared by the batch; ``image_tokens = rows * cols``.

        Example:
            >>> layout = SequenceLayout.from_canvas((2, 6), target=(0, 0, 2, 2), references=[(0, 2, 2, 2), (0, 4, 2, 2)])
            >>> layout.target_index, layout.ref_index
            (tensor([[0, 1, 6, 7]]), tensor([[ 2,  3,  8,  9,  4,  5, 10, 11]]))
        """
        if len(canvas) != 2:
            raise ValueError(f"Expected `canvas` as (rows, cols) in tokens, but got {tuple(canvas)!r}.")
        rows, cols = (check_int("canvas", v, minimum=1) for v in canvas)
        target_index = _box_indices(cols, target, "target", rows)
        ref_boxes = [_box_indices(cols, box, f"references[{k}]", rows) for k, box in enumerate(references)]
        if not ref_boxes:
            raise ValueError("Expected `references` with at least one box, but got none.")
        return cls(
            target_index=target_index[None],
            ref_index=torch.cat(ref_boxes)[None],
            ref_tokens=tuple(len(b) for b in ref_boxes),
            image_tokens=rows * cols,
        )

    @classmethod
    def stack(cls, layouts: Sequence[SequenceLayout]) -> SequenceLayout:
        """One layout per sample, for a batch whose samples place their tokens differently.

        Args:
            layouts: B shared layouts with equal ``ref_tokens``, N_tgt and ``image_tokens``.

        Returns:
            A per-sample layout (index tensors with leading size B).

        Example:
            >>> a = SequenceLayout.concatenated(2, [1, 1])            # [t t r1 r2]
            >>> b = SequenceLayout(torch.tensor([[2, 3]]), torch.tensor([[0, 1]]), (1, 1), 4)  # [r1 r2 t t]
            >>> SequenceLayout.stack([a, b]).ref_index
            tensor([[2, 3],
                    [0, 1]])
        """
        if not layouts or not all(isinstance(x, SequenceLayout) for x in layouts):
            raise ValueError("Expected `layouts` to be a non-empty sequence of SequenceLayout.")
        first = layouts[0]
        for i, x in enumerate(layouts):
            if x.target_index.shape[0] != 1:
                raise ValueError(f"Expected shared layouts (leading size 1), but layouts[{i}] has {x.target_index.shape[0]}.")
            if (x.ref_tokens, x.tgt_tokens, x.image_tokens) != (first.ref_tokens, first.tgt_tokens, first.image_tokens):
                raise ValueError(
                    f"Expected every layout with (ref_tokens, N_tgt, image_tokens) = "
                    f"{(first.ref_tokens, first.tgt_tokens, first.image_tokens)}, but layouts[{i}] has "
                    f"{(x.ref_tokens, x.tgt_tokens, x.image_tokens)}."
                )
        return cls(
            target_index=torch.cat([x.target_index for x in layouts]),
            ref_index=torch.cat([x.ref_index for x in layouts]),
            ref_tokens=first.ref_tokens,
            image_tokens=first.image_tokens,
        )

    # -- properties -----------------------------------------------------------------------------------
    @property
    def tgt_tokens(self) -> int:
        """N_tgt, the number of target tokens."""
        return self.target_index.shape[1]

    @property
    def shared(self) -> bool:
        """True when one layout serves every sample of the batch."""
        return self.target_index.shape[0] == 1

    def check(self, corr: Correspondences) -> None:
        """Raises `ValueError` unless the layout has the token counts (and batch) of ``corr``.

        Example:
            >>> corr = Correspondences.from_dicts([[{0: 1}, {0: 2}]], ref_tokens=[2, 3], tgt_tokens=4)
            >>> SequenceLayout.concatenated(4, [2, 3]).check(corr)  # passes silently
        """
        if (self.ref_tokens, self.tgt_tokens) != (corr.ref_tokens, corr.tgt_tokens):
            raise ValueError(
                f"Expected a layout with the correspondences' (ref_tokens, tgt_tokens) = "
                f"{(corr.ref_tokens, corr.tgt_tokens)}, but got {(self.ref_tokens, self.tgt_tokens)}."
            )
        if not self.shared and self.target_index.shape[0] != corr.batch_size:
            raise ValueError(
                f"Expected a per-sample layout with B = {corr.batch_size} rows, but got {self.target_index.shape[0]}."
            )

    # -- the gather ---------------------------------------------------------------------------------
    def _take(self, x: torch.Tensor, index: torch.Tensor, offset: int, seq_dim: int) -> torch.Tensor:
        """``x``'s tokens at ``index + offset`` on ``seq_dim``: a view for a shared contiguous run,
        ``index_select`` for a shared layout, ``gather`` per sample otherwise (indices cached per
        device, so a training step moves nothing to the device after the first)."""
        count = index.shape[1]
        key = (id(index), offset, x.device)
        if key not in self._runs:
            positions = index + offset
            start = int(positions[0, 0])
            contiguous = self.shared and torch.equal(positions[0], torch.arange(start, start + count))
            self._runs[key] = start if contiguous else positions.to(x.device)
        run = self._runs[key]
        if isinstance(run, int):
            return x.narrow(seq_dim, run, count)
        if self.shared:
            return x.index_select(seq_dim, run[0])
        if x.shape[0] != run.shape[0]:
            raise ValueError(f"Expected a batch of {run.shape[0]} samples (the layout's B), but got {x.shape[0]}.")
        view = [run.shape[0], 1, 1, 1]
        view[seq_dim] = count
        expanded = list(x.shape)
        expanded[seq_dim] = count
        return x.gather(seq_dim, run.view(view).expand(expanded))

    def split(
        self, query: torch.Tensor, key: torch.Tensor, image_offset: int, seq_dim: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference queries and target keys of one block, as `RefTargetCapture.add` takes them.

        Args:
            query: ``(B, S, H, D)`` (``seq_dim=1``) or ``(B, H, S, D)`` (``seq_dim=2``) post-RoPE
                queries of a joint sequence whose image stream starts at ``image_offset``.
            key: the keys, shaped as ``query``.
            image_offset: position of the first image token in the joint sequence.
            seq_dim: 1 or 2, the sequence dimension of ``query`` and ``key``.

        Returns:
            ``(B, H, N_ref_total, D)`` reference queries and ``(B, H, N_tgt, D)`` target keys.
        """
        if seq_dim not in (1, 2):
            raise ValueError(f"Expected `seq_dim` to be 1 or 2, but got {seq_dim!r}.")
        for name, x in (("query", query), ("key", key)):
            if x.dim() != 4 or x.shape[seq_dim] < image_offset + self.image_tokens:
                raise ValueError(
                    f"Expected `{name}` 4-D with at least image_offset + image_tokens = "
                    f"{image_offset + self.image_tokens} tokens on dim {seq_dim}, but got shape {tuple(x.shape)}."
                )
        ref_query = self._take(query, self.ref_index, image_offset, seq_dim)
        tgt_key = self._take(key, self.target_index, image_offset, seq_dim)
        if seq_dim == 1:
            ref_query, tgt_key = ref_query.transpose(1, 2), tgt_key.transpose(1, 2)
        return ref_query, tgt_key


class _State:
    """What the processors of one installation share: the active capture and layout, and the last
    ones cleared (a checkpoint's recomputation during the backward feeds them again)."""

    def __init__(self) -> None:
        self.capture: RefTargetCapture | None = None
        self.layout: SequenceLayout | None = None
        self.replay: tuple[RefTargetCapture, SequenceLayout] | None = None

    def target(self) -> tuple[RefTargetCapture, SequenceLayout] | None:
        """The capture to feed now: the active one, or during a backward pass (a non-reentrant
        checkpoint recomputing a block, torch's signal as in `torch.utils.module_tracker`) the
        last one cleared; None: run the stock processor. A forward outside any backward that
        builds a graph starts another step: the last capture is forgotten then."""
        if self.capture is not None:
            return self.capture, self.layout
        if self.replay is not None:
            if torch._C._current_graph_task_id() != -1:
                return self.replay
            if torch.is_grad_enabled():
                self.replay = None
        return None


class _CaptureMixin:
    """The feeding half of every capture processor (the attention half is the stock class)."""

    def __init__(self, state: _State, block: str) -> None:
        super().__init__()
        self._state = state
        self.block = block

    @property
    def active(self) -> bool:
        """True while a capture is set on the installation this processor belongs to."""
        return self._state.capture is not None

    def _feed(
        self,
        target: tuple[RefTargetCapture, SequenceLayout],
        query: torch.Tensor,
        key: torch.Tensor,
        image_offset: int,
        seq_dim: int,
        image_tokens: int | None,
    ) -> None:
        capture, layout = target
        if image_tokens is not None and image_tokens != layout.image_tokens:
            raise ValueError(
                f"Expected an image stream of layout.image_tokens = {layout.image_tokens} tokens in block "
                f"{self.block!r}, but the model passed {image_tokens}."
            )
        head_dim = query.shape[-1]
        if capture.scale is not None and not math.isclose(capture.scale, head_dim**-0.5, rel_tol=1e-6):
            raise ValueError(
                f"Expected the capture's `scale` to be None or the model's softmax scale 1/sqrt({head_dim}), "
                f"but got {capture.scale!r}."
            )
        capture.add(*layout.split(query, key, image_offset, seq_dim))


def _joint_attention(module, processor, attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb):
    """The stock body shared by diffusers 0.42's `FluxAttnProcessor` and `Flux2AttnProcessor` up to
    the attention call, with one added call (marked): the joint ``[text | image]`` query and key,
    after the q/k norms and RoPE, go to the capture. ``module`` is the diffusers module whose
    helpers the stock processor uses. Returns the attention output ``(B, S, H·D)``."""
    target = processor._state.target()
    query, key, value, encoder_query, encoder_key, encoder_value = module._get_qkv_projections(
        attn, hidden_states, encoder_hidden_states
    )
    query = query.unflatten(-1, (-1, attn.head_dim))
    key = key.unflatten(-1, (-1, attn.head_dim))
    value = value.unflatten(-1, (-1, attn.head_dim))
    query = attn.norm_q(query)
    key = attn.norm_k(key)
    if attn.added_kv_proj_dim is not None:
        encoder_query = encoder_query.unflatten(-1, (-1, attn.head_dim))
        encoder_key = encoder_key.unflatten(-1, (-1, attn.head_dim))
        encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
        encoder_query = attn.norm_added_q(encoder_query)
        encoder_key = attn.norm_added_k(encoder_key)
        query = torch.cat([encoder_query, query], dim=1)
        key = torch.cat([encoder_key, key], dim=1)
        value = torch.cat([encoder_value, value], dim=1)
    if image_rotary_emb is not None:
        query = module.apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
        key = module.apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
    # MOSAIC: the joint sequence is [text | image]
    image_tokens = hidden_states.shape[1] if encoder_hidden_states is not None else None
    offset = query.shape[1] - (image_tokens or target[1].image_tokens)
    processor._feed(target, query, key, offset, 1, image_tokens)
    hidden_states = module.dispatch_attention_fn(
        query, key, value, attn_mask=attention_mask, backend=processor._attention_backend,
        parallel_config=processor._parallel_config,
    )
    return hidden_states.flatten(2, 3).to(query.dtype)


class FluxCaptureProcessor(_CaptureMixin, _flux.FluxAttnProcessor):
    """`FluxAttnProcessor` that feeds a `RefTargetCapture` (FLUX.1 double and single blocks).

    Idle, it is the stock processor. Active, it runs the stock body and feeds the post-RoPE query
    and key of the joint ``[text | image]`` sequence (double blocks: text length from
    ``encoder_hidden_states``; single blocks: the image stream is the last
    ``layout.image_tokens`` tokens). Built by `install_capture_processors`.

    Args:
        state: the installation's shared state.
        block: the block's name, e.g. ``"single_transformer_blocks.0"``.

    Example:
        >>> from diffusers import FluxTransformer2DModel
        >>> model = FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1,
        ...     attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16,
        ...     axes_dims_rope=(2, 2, 4))
        >>> handle = install_capture_processors(model)
        >>> sorted({type(p).__name__ for p in handle.processors.values()})
        ['FluxCaptureProcessor']
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        target = self._state.target()
        if target is None:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        # the stock body (diffusers 0.42 FluxAttnProcessor) with the capture call, shared with the other FLUX processor
        hidden_states = _joint_attention(_flux, self, attn, hidden_states, encoder_hidden_states, attention_mask,
                                         image_rotary_emb)
        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1
            )
            hidden_states = attn.to_out[0](hidden_states.contiguous())
            hidden_states = attn.to_out[1](hidden_states)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
            return hidden_states, encoder_hidden_states
        return hidden_states


class Flux2CaptureProcessor(_CaptureMixin, _flux2.Flux2AttnProcessor):
    """`Flux2AttnProcessor` that feeds a `RefTargetCapture` (FLUX.2 double-stream blocks).

    Idle, it is the stock processor; active, the stock body feeding the post-RoPE query and key of
    the joint ``[text | image]`` sequence. Built by `install_capture_processors`.

    Args:
        state: the installation's shared state.
        block: the block's name, e.g. ``"transformer_blocks.0"``.

    Example:
        >>> from diffusers import Flux2Transformer2DModel
        >>> model = Flux2Transformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1,
        ...     attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
        ...     timestep_guidance_channels=16, axes_dims_rope=(2, 2, 2, 2), guidance_embeds=False)
        >>> handle = install_capture_processors(model)
        >>> {name: type(p).__name__ for name, p in handle.processors.items()}
        {'transformer_blocks.0': 'Flux2CaptureProcessor', 'single_transformer_blocks.0': 'Flux2ParallelCaptureProcessor'}
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        target = self._state.target()
        if target is None:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        # the stock body (diffusers 0.42 Flux2AttnProcessor) with the capture call, shared with the other FLUX processor
        hidden_states = _joint_attention(_flux2, self, attn, hidden_states, encoder_hidden_states, attention_mask,
                                         image_rotary_emb)
        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1
            )
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states


class Flux2ParallelCaptureProcessor(_CaptureMixin, _flux2.Flux2ParallelSelfAttnProcessor):
    """`Flux2ParallelSelfAttnProcessor` that feeds a `RefTargetCapture` (FLUX.2 single-stream blocks).

    The block's input is the joint ``[text | image]`` sequence; the image stream is its last
    ``layout.image_tokens`` tokens. Idle, it is the stock processor. Built by
    `install_capture_processors` (see `Flux2CaptureProcessor` for an example).

    Args:
        state: the installation's shared state.
        block: the block's name, e.g. ``"single_transformer_blocks.0"``.
    """

    def __call__(self, attn, hidden_states, attention_mask=None, image_rotary_emb=None):
        target = self._state.target()
        if target is None:
            return super().__call__(attn, hidden_states, attention_mask, image_rotary_emb)
        # the stock body (diffusers 0.42 Flux2ParallelSelfAttnProcessor) with one added call, marked below
        hidden_states = attn.to_qkv_mlp_proj(hidden_states)
        qkv_dim = 3 * attn.inner_dim
        mlp_dim = attn.mlp_hidden_dim * attn.mlp_mult_factor
        local_qkv = hidden_states.shape[-1] * qkv_dim // (qkv_dim + mlp_dim)
        qkv, mlp_hidden_states = torch.split(hidden_states, [local_qkv, hidden_states.shape[-1] - local_qkv], dim=-1)
        query, key, value = qkv.chunk(3, dim=-1)
        query = query.unflatten(-1, (-1, attn.head_dim))
        key = key.unflatten(-1, (-1, attn.head_dim))
        value = value.unflatten(-1, (-1, attn.head_dim))
        query = attn.norm_q(query)
        key = attn.norm_k(key)
        if image_rotary_emb is not None:
            query = _flux2.apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = _flux2.apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        # MOSAIC: the joint sequence is [text | image]
        self._feed(target, query, key, query.shape[1] - target[1].image_tokens, 1, None)
        hidden_states = _flux2.dispatch_attention_fn(
            query, key, value, attn_mask=attention_mask, backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)
        mlp_hidden_states = attn.mlp_act_fn(mlp_hidden_states)
        hidden_states = torch.cat([hidden_states, mlp_hidden_states], dim=-1)
        return attn.to_out(hidden_states)


class SD3CaptureProcessor(_CaptureMixin, JointAttnProcessor2_0):
    """`JointAttnProcessor2_0` that feeds a `RefTargetCapture` (SD3 / SD3.5 joint attention).

    SD3 has no RoPE: the query and key its softmax sees are the ones after its q/k norms. The
    joint sequence is ``[image | text]``; the image stream is the block's ``hidden_states``. The
    second attention of SD3.5-style blocks (``attn2``, image tokens only) keeps its stock
    processor and never feeds, so each block feeds once. Like the stock processor, it calls
    torch's ``scaled_dot_product_attention`` directly. Built by `install_capture_processors`.

    Args:
        state: the installation's shared state.
        block: the block's name, e.g. ``"transformer_blocks.0"``.

    Example:
        >>> from diffusers import SD3Transformer2DModel
        >>> model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2,
        ...     attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
        ...     pooled_projection_dim=16, out_channels=4, pos_embed_max_size=8, dual_attention_layers=(0,))
        >>> handle = install_capture_processors(model)
        >>> handle.block_names  # one entry per block: attn2 of block 0 does not feed
        ('transformer_blocks.0', 'transformer_blocks.1')
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        target = self._state.target()
        if target is None:
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        # the stock body (diffusers 0.42 JointAttnProcessor2_0) with one added call, marked below
        residual = hidden_states
        batch_size = hidden_states.shape[0]
        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)
        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        # MOSAIC: the image stream, (B, H, N_img, D), before the text is appended
        self._feed(target, query, key, 0, 2, hidden_states.shape[1])
        if encoder_hidden_states is not None:
            encoder_hidden_states_query_proj = attn.add_q_proj(encoder_hidden_states)
            encoder_hidden_states_key_proj = attn.add_k_proj(encoder_hidden_states)
            encoder_hidden_states_value_proj = attn.add_v_proj(encoder_hidden_states)
            encoder_hidden_states_query_proj = encoder_hidden_states_query_proj.view(
                batch_size, -1, attn.heads, head_dim
            ).transpose(1, 2)
            encoder_hidden_states_key_proj = encoder_hidden_states_key_proj.view(
                batch_size, -1, attn.heads, head_dim
            ).transpose(1, 2)
            encoder_hidden_states_value_proj = encoder_hidden_states_value_proj.view(
                batch_size, -1, attn.heads, head_dim
            ).transpose(1, 2)
            if attn.norm_added_q is not None:
                encoder_hidden_states_query_proj = attn.norm_added_q(encoder_hidden_states_query_proj)
            if attn.norm_added_k is not None:
                encoder_hidden_states_key_proj = attn.norm_added_k(encoder_hidden_states_key_proj)
            query = torch.cat([query, encoder_hidden_states_query_proj], dim=2)
            key = torch.cat([key, encoder_hidden_states_key_proj], dim=2)
            value = torch.cat([value, encoder_hidden_states_value_proj], dim=2)
        hidden_states = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = (
                hidden_states[:, : residual.shape[1]],
                hidden_states[:, residual.shape[1] :],
            )
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states


class QwenCaptureProcessor(_CaptureMixin, _qwen.QwenDoubleStreamAttnProcessor2_0):
    """`QwenDoubleStreamAttnProcessor2_0` that feeds a `RefTargetCapture` (Qwen-Image, -Edit, -Edit-Plus).

    The image stream (target and references, as ``img_shapes`` lists them) gets its own RoPE
    before the ``[text | image]`` concatenation; the capture gets the image stream's post-RoPE
    query and key. Idle, it is the stock processor. Built by `install_capture_processors`.

    Args:
        state: the installation's shared state.
        block: the block's name, e.g. ``"transformer_blocks.0"``.

    Example:
        >>> from diffusers import QwenImageTransformer2DModel
        >>> model = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=1,
        ...     attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6))
        >>> install_capture_processors(model).block_names
        ('transformer_blocks.0',)
    """

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
        attention_mask=None, image_rotary_emb=None,
    ):
        target = self._state.target()
        if target is None:
            return super().__call__(
                attn, hidden_states, encoder_hidden_states, encoder_hidden_states_mask, attention_mask, image_rotary_emb
            )
        # the stock body (diffusers 0.42 QwenDoubleStreamAttnProcessor2_0) with one added call, marked below
        if encoder_hidden_states is None:
            raise ValueError("QwenDoubleStreamAttnProcessor2_0 requires encoder_hidden_states (text stream)")
        if attention_mask is not None:
            raise ValueError(
                "QwenDoubleStreamAttnProcessor2_0 does not accept an external attention_mask. "
                "Pass encoder_hidden_states_mask to let the processor build the joint mask."
            )
        if encoder_hidden_states_mask is not None:
            seq_img = hidden_states.shape[1]
            image_mask = torch.ones((hidden_states.shape[0], seq_img), dtype=torch.bool, device=hidden_states.device)
            attention_mask = torch.cat([encoder_hidden_states_mask, image_mask], dim=1)
            attention_mask = attention_mask[:, None, None, :]
        seq_txt = encoder_hidden_states.shape[1]
        img_query = attn.to_q(hidden_states)
        img_key = attn.to_k(hidden_states)
        img_value = attn.to_v(hidden_states)
        txt_query = attn.add_q_proj(encoder_hidden_states)
        txt_key = attn.add_k_proj(encoder_hidden_states)
        txt_value = attn.add_v_proj(encoder_hidden_states)
        head_dim = attn.inner_dim // attn.heads
        img_query = img_query.unflatten(-1, (-1, head_dim))
        img_key = img_key.unflatten(-1, (-1, head_dim))
        img_value = img_value.unflatten(-1, (-1, head_dim))
        txt_query = txt_query.unflatten(-1, (-1, head_dim))
        txt_key = txt_key.unflatten(-1, (-1, head_dim))
        txt_value = txt_value.unflatten(-1, (-1, head_dim))
        if attn.norm_q is not None:
            img_query = attn.norm_q(img_query)
        if attn.norm_k is not None:
            img_key = attn.norm_k(img_key)
        if attn.norm_added_q is not None:
            txt_query = attn.norm_added_q(txt_query)
        if attn.norm_added_k is not None:
            txt_key = attn.norm_added_k(txt_key)
        if image_rotary_emb is not None:
            img_freqs, txt_freqs = image_rotary_emb
            img_query = _qwen.apply_rotary_emb_qwen(img_query, img_freqs, use_real=False)
            img_key = _qwen.apply_rotary_emb_qwen(img_key, img_freqs, use_real=False)
            txt_query = _qwen.apply_rotary_emb_qwen(txt_query, txt_freqs, use_real=False)
            txt_key = _qwen.apply_rotary_emb_qwen(txt_key, txt_freqs, use_real=False)
        # MOSAIC: the image stream, (B, N_img, H, D), before the text is prepended
        self._feed(target, img_query, img_key, 0, 1, hidden_states.shape[1])
        joint_query = torch.cat([txt_query, img_query], dim=1)
        joint_key = torch.cat([txt_key, img_key], dim=1)
        joint_value = torch.cat([txt_value, img_value], dim=1)
        joint_hidden_states = _qwen.dispatch_attention_fn(
            joint_query, joint_key, joint_value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
            backend=self._attention_backend, parallel_config=self._parallel_config,
        )
        joint_hidden_states = joint_hidden_states.flatten(2, 3)
        joint_hidden_states = joint_hidden_states.to(joint_query.dtype)
        txt_attn_output = joint_hidden_states[:, :seq_txt, :]
        img_attn_output = joint_hidden_states[:, seq_txt:, :]
        img_attn_output = attn.to_out[0](img_attn_output.contiguous())
        if len(attn.to_out) > 1:
            img_attn_output = attn.to_out[1](img_attn_output)
        txt_attn_output = attn.to_add_out(txt_attn_output.contiguous())
        return img_attn_output, txt_attn_output


_CAPTURE_PROCESSORS: dict[type, type] = {
    _flux.FluxAttnProcessor: FluxCaptureProcessor,
    _flux2.Flux2AttnProcessor: Flux2CaptureProcessor,
    _flux2.Flux2ParallelSelfAttnProcessor: Flux2ParallelCaptureProcessor,
    JointAttnProcessor2_0: SD3CaptureProcessor,
    _qwen.QwenDoubleStreamAttnProcessor2_0: QwenCaptureProcessor,
}
_ATTENTION_NAMES = (".attn.processor",)  # the block's main attention; ".attn2" (SD3.5) never feeds


class CaptureProcessors:
    """The capture processors installed on one transformer (returned by `install_capture_processors`).

    Life cycle per training step: build a `RefTargetCapture` for the batch's correspondences, run
    the forward inside ``with handle.capture(capture, layout):``, then read ``capture.result()``
    (the capture stays fed after the ``with``; build a new one, or ``capture.reset()``, per step).

    Attributes:
        transformer: the model.
        block_names: the blocks that feed, in the order the model runs them.
        processors: block name → capture processor.

    Example:
        see `install_capture_processors`.
    """

    def __init__(self, transformer: torch.nn.Module, originals: dict, processors: dict, state: _State) -> None:
        self.transformer = transformer
        self.processors = processors
        self.block_names = tuple(processors)
        self._originals = originals
        self._state = state
        self._removed = False

    @property
    def active(self) -> bool:
        """True while a capture is set."""
        return self._state.capture is not None

    def set_capture(self, capture: RefTargetCapture, layout: SequenceLayout) -> None:
        """Makes every chosen block feed ``capture`` with the tokens that ``layout`` names.

        Args:
            capture: the capture to feed (one per step; its correspondences fix K, N^(k), N_tgt).
            layout: where those tokens sit in the image stream; checked against ``capture.corr``.
        """
        if self._removed:
            raise ValueError("Expected installed processors, but `remove()` was called on this handle.")
        if not isinstance(capture, RefTargetCapture):
            raise ValueError(f"Expected `capture` to be a RefTargetCapture, but got {type(capture).__name__}.")
        if not isinstance(layout, SequenceLayout):
            raise ValueError(f"Expected `layout` to be a SequenceLayout, but got {type(layout).__name__}.")
        layout.check(capture.corr)
        self._state.capture, self._state.layout, self._state.replay = capture, layout, None

    def clear(self) -> None:
        """Stops feeding: every forward runs the stock processors again (bit-identical outputs).

        One exception keeps gradient checkpointing exact: a backward pass that recomputes
        checkpointed blocks feeds the last cleared capture again (the capture recognises the
        recomputation and counts each block once), so the backward may come after the ``with``.
        Call it before the next forward that builds a graph (forwards under ``no_grad``, e.g.
        validation or sampling, may come between); that forward, `set_capture` and `remove`
        forget the cleared capture.
        """
        state = self._state
        if state.capture is not None:
            state.replay = (state.capture, state.layout)
        state.capture = state.layout = None

    @contextlib.contextmanager
    def capture(self, capture: RefTargetCapture, layout: SequenceLayout) -> Iterator[RefTargetCapture]:
        """``with handle.capture(capture, layout):`` feeds ``capture`` inside the block, then clears.

        The backward may run inside or after the ``with`` (see `clear` for checkpointing).
        """
        self.set_capture(capture, layout)
        try:
            yield capture
        finally:
            self.clear()

    def remove(self) -> None:
        """Restores the processors the model had before the installation (the same objects)."""
        if not self._removed:
            self.clear()
            self._state.replay = None
            self.transformer.set_attn_processor(dict(self._originals))
            self._removed = True


def install_capture_processors(
    transformer: torch.nn.Module, blocks: str | Sequence[str] | Callable[[str], bool] = "all"
) -> CaptureProcessors:
    """Installs MOSAIC capture processors on a diffusers DiT with in-sequence references.

    Supported: `FluxTransformer2DModel` (double and single blocks), `Flux2Transformer2DModel`
    (double and parallel single blocks), `SD3Transformer2DModel` (SD3 and SD3.5; the second
    attention ``attn2`` never feeds) and `QwenImageTransformer2DModel`. The processors go in
    through the model's ``set_attn_processor`` (no ``forward`` is patched); the blocks not chosen
    keep their processors.

    Args:
        transformer: the diffusers transformer, with its stock attention processors on the chosen
            blocks (fused or IP-adapter processors are refused).
        blocks: ``"all"``, a list of block names (see ``handle.block_names`` after installing with
            ``"all"``, e.g. ``"transformer_blocks.3"``, ``"single_transformer_blocks.0"``), or a
            predicate on the block name.

    Returns:
        A `CaptureProcessors` handle; the processors are idle until ``handle.capture(...)``.

    Example:
        >>> from diffusers import SD3Transformer2DModel
        >>> from mosaic_kit.attention import RefTargetCapture
        >>> _ = torch.manual_seed(0)
        >>> model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2,
        ...     attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
        ...     pooled_projection_dim=16, out_channels=4, pos_embed_max_size=8)
        >>> handle = install_capture_processors(model)
        >>> # target and two references side by side: a 2x6 token canvas (latents 4x12, patch 2)
        >>> layout = SequenceLayout.from_canvas((2, 6), target=(0, 0, 2, 2), references=[(0, 2, 2, 2), (0, 4, 2, 2)])
        >>> corr = Correspondences.from_dicts([[{0: 0, 3: 3}, {1: 1}]], ref_tokens=[4, 4], tgt_tokens=4)
        >>> inputs = dict(hidden_states=torch.randn(1, 4, 4, 12), encoder_hidden_states=torch.randn(1, 3, 16),
        ...     pooled_projections=torch.randn(1, 16), timestep=torch.tensor([500.0]))
        >>> with handle.capture(RefTargetCapture(corr), layout) as capture:
        ...     _ = model(**inputs)
        >>> out = capture.result()
        >>> out.num_blocks, out.pair_log_probs.shape
        (2, torch.Size([1, 2, 2]))
        >>> handle.remove()
    """
    if not hasattr(transformer, "attn_processors") or not hasattr(transformer, "set_attn_processor"):
        raise ValueError(
            f"Expected a diffusers transformer with `attn_processors` and `set_attn_processor`, but got "
            f"{type(transformer).__name__}."
        )
    originals = dict(transformer.attn_processors)
    main = {
        name[: -len(".attn.processor")]: name
        for name in originals
        if name.endswith(".attn.processor")
    }
    if callable(blocks):
        chosen = [block for block in main if blocks(block)]
    elif blocks == "all":
        chosen = list(main)
    elif isinstance(blocks, (list, tuple)) and all(isinstance(b, str) for b in blocks):
        unknown = [b for b in blocks if b not in main]
        if unknown:
            raise ValueError(f"Expected `blocks` among {list(main)}, but got unknown {unknown}.")
        chosen = [block for block in main if block in set(blocks)]
    else:
        raise ValueError(f"Expected `blocks` to be 'all', a list of block names or a predicate, but got {blocks!r}.")
    if not chosen:
        raise ValueError(f"Expected `blocks` to choose at least one of {list(main)}, but it chose none.")
    state = _State()
    processors = {}
    for block in chosen:
        stock = originals[main[block]]
        capture_class = _CAPTURE_PROCESSORS.get(type(stock))
        if capture_class is None:
            raise ValueError(
                f"Expected a stock processor ({', '.join(c.__name__ for c in _CAPTURE_PROCESSORS)}) on "
                f"{block}.attn, but got {type(stock).__name__}."
            )
        processor = capture_class(state, block)
        for attr in ("_attention_backend", "_parallel_config"):  # keep a backend set on the stock processor
            if attr in vars(stock):
                setattr(processor, attr, getattr(stock, attr))
        processors[block] = processor
    replacement = dict(originals)
    for block, processor in processors.items():
        replacement[main[block]] = processor
    transformer.set_attn_processor(replacement)
    return CaptureProcessors(transformer, originals, processors, state)
