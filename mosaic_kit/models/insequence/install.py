"""Installing the capture processors on a transformer (`install_capture_processors`) and the
handle that sets the capture for a forward and removes them again (`CaptureProcessors`)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch

from ...attention import RefTargetCapture
from .layout import SequenceLayout
from .processors import _CAPTURE_PROCESSORS, _CaptureMixin, _State

__all__ = ["CaptureProcessors", "install_capture_processors"]


_ATTENTION_NAMES = (".attn.processor",)  # the block's main attention; ".attn2" (SD3.5) never feeds


class CaptureProcessors:
    """The capture processors installed on one transformer (returned by `install_capture_processors`).

    Life cycle per training step: build a `RefTargetCapture` for the batch's correspondences, run
    one forward inside ``with handle.capture(capture, layout):``, then read ``capture.result()``
    (the capture stays fed after the ``with``; build a new one, or ``capture.reset()``, per step).
    One capture is active at a time and serves one forward: a nested ``handle.capture(...)``, a
    capture already fed, or a second forward inside the ``with`` raise `ValueError`.

    If something else replaces the processors after the installation (diffusers' IP-adapter
    loading rebuilds them with ``type(processor)()``, which gives detached, stock processors),
    ``installed`` turns False and `set_capture` refuses, naming the blocks: nothing is fed by
    half the blocks silently.

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
        self._attentions = {block: transformer.get_submodule(block).attn for block in processors}
        self._state = state
        self._removed = False

    @property
    def active(self) -> bool:
        """True while a capture is set."""
        return self._state.capture is not None

    @property
    def installed(self) -> bool:
        """True while every processor of this handle is on its block (False after `remove`, or
        when something replaced one, e.g. an IP-adapter loaded after the installation)."""
        return not self._removed and not self._replaced()

    def _replaced(self) -> list[str]:
        return [block for block, attn in self._attentions.items() if attn.processor is not self.processors[block]]

    def set_capture(self, capture: RefTargetCapture, layout: SequenceLayout) -> None:
        """Makes every chosen block feed ``capture`` with the tokens that ``layout`` names.

        Args:
            capture: the capture to feed (one per forward, not fed yet; its correspondences fix K,
                N^(k), N_tgt).
            layout: where those tokens sit in the image stream; checked against ``capture.corr``.

        Raises:
            ValueError: a capture is already active (nested ``handle.capture``; call `clear`
                first), ``capture`` was already fed (``reset()`` it), a processor of this handle
                was replaced or removed, or ``layout`` does not fit ``capture.corr``.
        """
        if self._removed:
            raise ValueError("Expected installed processors, but `remove()` was called on this handle.")
        replaced = self._replaced()
        if replaced:
            found = sorted({type(self._attentions[b].processor).__name__ for b in replaced})
            raise ValueError(
                f"Expected this handle's capture processors on every chosen block, but blocks {replaced} now hold "
                f"{found} (replaced after the installation, e.g. by loading an IP-adapter): call `remove()` and "
                "`install_capture_processors` again."
            )
        if not isinstance(capture, RefTargetCapture):
            raise ValueError(f"Expected `capture` to be a RefTargetCapture, but got {type(capture).__name__}.")
        if not isinstance(layout, SequenceLayout):
            raise ValueError(f"Expected `layout` to be a SequenceLayout, but got {type(layout).__name__}.")
        if self._state.capture is not None:
            raise ValueError(
                "Expected no active capture, but one is set: nested `handle.capture(...)` (or `set_capture` twice) is "
                "not supported, since one capture serves one forward; leave the outer `with` (or call `clear()`) first."
            )
        fed = getattr(capture, "num_blocks", 0)
        if fed:
            raise ValueError(
                f"Expected a fresh capture, but `capture` was already fed by {fed} block(s): one capture serves one "
                "forward; call `capture.reset()` (or build a new one) before the next."
            )
        layout.check(capture.corr)
        if "_prepared" in vars(capture):  # a RefTargetCapture (not a fan-out or diagnostic): build its indices
            self._prepare(capture)  # now, so that an `add` inside a compiled block has nothing to build
        state = self._state
        state.capture, state.layout, state.replay, state.fed = capture, layout, None, set()

    def _prepare(self, capture: RefTargetCapture) -> None:
        """``capture.prepare`` for the device, dtype and head count of the first chosen attention
        (re-prepared by the first `add` if the model runs elsewhere, e.g. with CPU offloading)."""
        attn = self._attentions[self.block_names[0]]
        weight = next(attn.parameters(), None)
        if weight is not None and weight.device.type != "meta" and weight.is_floating_point():
            capture.prepare(weight.device, weight.dtype, attn.heads)

    def clear(self) -> None:
        """Stops feeding: every forward runs the stock processors again (bit-identical outputs).

        One exception keeps gradient checkpointing exact: a backward pass that recomputes
        checkpointed blocks feeds the last cleared capture again (the capture recognises the
        recomputation and counts each block once), so the backward may come after the ``with``.
        Call it before the next forward that builds a graph (forwards under ``no_grad``, e.g.
        validation or sampling, may come between; they run the stock processors, compiled or
        not); that forward, `set_capture` and `remove` forget the cleared capture.
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
        """Restores the processors the model had before the installation (the same objects) on the
        blocks that still hold this handle's processors, or detached ones that diffusers rebuilt
        from them; a processor installed since by something else (an IP-adapter's) stays."""
        if self._removed:
            return
        self.clear()
        self._state.replay = None
        current = dict(self.transformer.attn_processors)
        for block, attn in self._attentions.items():
            processor = attn.processor
            if processor is self.processors[block] or (isinstance(processor, _CaptureMixin) and processor.detached):
                current[f"{block}.attn.processor"] = self._originals[f"{block}.attn.processor"]
        self.transformer.set_attn_processor(current)
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
            blocks (fused or IP-adapter processors, or those of another installation, are refused;
            detached capture processors, which are the stock ones, are accepted).
        blocks: ``"all"``, a list of block names (see ``handle.block_names`` after installing with
            ``"all"``, e.g. ``"transformer_blocks.3"``, ``"single_transformer_blocks.0"``), or a
            predicate on the block name.

    Returns:
        A `CaptureProcessors` handle; the processors are idle until ``handle.capture(...)``.

    Example:
        >>> from diffusers import SD3Transformer2DModel
        >>> from mosaic_kit.attention import RefTargetCapture
        >>> from mosaic_kit.correspondence import Correspondences
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
        if isinstance(stock, _CaptureMixin) and stock.detached:  # diffusers' `type(processor)()`: the stock one
            capture_class = type(stock)
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
