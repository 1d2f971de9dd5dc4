"""The capture processors: each subclasses a stock diffusers attention processor and, with a
capture active, hands the post-norm, post-RoPE query and key to it just before the softmax. This
is the one file of the package that touches diffusers' attention internals."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import JointAttnProcessor2_0
from diffusers.models.transformers import transformer_flux as _flux
from diffusers.models.transformers import transformer_flux2 as _flux2
from diffusers.models.transformers import transformer_qwenimage as _qwen

from ...attention import RefTargetCapture
from .layout import SequenceLayout

__all__ = [
    "Flux2CaptureProcessor",
    "Flux2ParallelCaptureProcessor",
    "FluxCaptureProcessor",
    "QwenCaptureProcessor",
    "SD3CaptureProcessor",
]


def _in_backward_pass() -> bool:
    """True while autograd's engine runs a backward pass on this thread (a non-reentrant
    checkpoint recomputing a block, torch's signal as in `torch.utils.module_tracker`). Never
    called while dynamo traces: a compiled region is recomputed by its own backward graph, not by
    running the processor again, and dynamo cannot trace this call."""
    return torch._C._current_graph_task_id() != -1


class _State:
    """What the processors of one installation share: the active capture and layout, the blocks
    that fed it, and the last ones cleared (a checkpoint's recomputation during the backward
    feeds them again)."""

    def __init__(self) -> None:
        self.capture: RefTargetCapture | None = None
        self.layout: SequenceLayout | None = None
        self.replay: tuple[RefTargetCapture, SequenceLayout] | None = None
        self.fed: set[str] = set()

    def target(self) -> tuple[RefTargetCapture, SequenceLayout] | None:
        """The capture to feed now: the active one, or during a backward pass (a non-reentrant
        checkpoint recomputing a block) the last one cleared; None: run the stock processor. A
        forward outside any backward that builds a graph starts another step: the last capture is
        forgotten then.

        Idle, this reads only Python attributes and the grad mode (what dynamo traces without a
        graph break): a forward under ``no_grad`` (validation, sampling) never asks autograd's
        engine anything, since a checkpoint's recomputation always runs with grad enabled; nor
        does a compiled forward (dynamo does not trace that query, and a compiled region's
        backward never calls the processor again).
        """
        if self.capture is not None:
            return self.capture, self.layout
        if self.replay is not None and torch.is_grad_enabled() and not torch.compiler.is_compiling():
            if _in_backward_pass():
                return self.replay
            self.replay = None
        return None


class _CaptureMixin:
    """The feeding half of every capture processor (the attention half is the stock class)."""

    def __init__(self, state: _State | None = None, block: str | None = None) -> None:
        super().__init__()
        if (state is None) != (block is None):
            raise TypeError(
                f"Expected both `state` and `block` (as install_capture_processors passes them) or neither (a "
                f"processor that is the stock one, as diffusers builds with `type(processor)()`), but got "
                f"state={type(state).__name__} and block={block!r}."
            )
        if state is not None and not isinstance(state, _State):
            raise TypeError(f"Expected `state` to be the installation's shared state, but got {type(state).__name__}.")
        if block is not None and not isinstance(block, str):
            raise TypeError(f"Expected `block` to be a block name (str), but got {type(block).__name__}.")
        # detached (built with no arguments): a state of its own that nothing ever activates
        self._state = _State() if state is None else state
        self.block = block

    @property
    def detached(self) -> bool:
        """True for a processor built with no arguments: it belongs to no installation and is the
        stock processor (diffusers rebuilds processors with ``type(processor)()`` when it loads or
        unloads an IP-adapter)."""
        return self.block is None

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
        if not torch.compiler.is_compiling() and not _in_backward_pass():  # a checkpoint's recomputation feeds again
            if self.block in self._state.fed:
                raise ValueError(
                    f"Expected one forward per capture, but block {self.block!r} fed the active capture a second "
                    "time: run one forward inside `handle.capture(...)` and build a new capture (or `reset()` it) "
                    "for the next one."
                )
            self._state.fed.add(self.block)
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
        state: the installation's shared state; omitted (with ``block``), the processor is detached
            and always the stock one (what diffusers' ``type(processor)()`` builds).
        block: the block's name, e.g. ``"single_transformer_blocks.0"``; omitted with ``state``.

    Example:
        >>> from mosaic_kit.models.insequence import install_capture_processors
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
        state: the installation's shared state; omitted (with ``block``), the processor is detached
            and always the stock one (what diffusers' ``type(processor)()`` builds).
        block: the block's name, e.g. ``"transformer_blocks.0"``; omitted with ``state``.

    Example:
        >>> from mosaic_kit.models.insequence import install_capture_processors
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
        state: the installation's shared state; omitted (with ``block``), the processor is detached
            and always the stock one (what diffusers' ``type(processor)()`` builds).
        block: the block's name, e.g. ``"single_transformer_blocks.0"``; omitted with ``state``.
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
        state: the installation's shared state; omitted (with ``block``), the processor is detached
            and always the stock one (what diffusers' ``type(processor)()`` builds).
        block: the block's name, e.g. ``"transformer_blocks.0"``; omitted with ``state``.

    Example:
        >>> from mosaic_kit.models.insequence import install_capture_processors
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
    query and key as views of the joint query and key (which the attention keeps for its
    backward, so the capture keeps no tensor of its own alive). Idle, it is the stock processor. Built by `install_capture_processors`.

    Args:
        state: the installation's shared state; omitted (with ``block``), the processor is detached
            and always the stock one (what diffusers' ``type(processor)()`` builds).
        block: the block's name, e.g. ``"transformer_blocks.0"``; omitted with ``state``.

    Example:
        >>> from mosaic_kit.models.insequence import install_capture_processors
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
        joint_query = torch.cat([txt_query, img_query], dim=1)
        joint_key = torch.cat([txt_key, img_key], dim=1)
        joint_value = torch.cat([txt_value, img_value], dim=1)
        # MOSAIC: the image stream of the joint [text | image] query and key, (B, S, H, D), which the
        # attention saves for its backward anyway (fed before the concatenation, the capture's views
        # kept the image stream's own query and key alive until the block's backward)
        self._feed(target, joint_query, joint_key, seq_txt, 1, hidden_states.shape[1])
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
