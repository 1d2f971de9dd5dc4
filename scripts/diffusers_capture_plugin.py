"""A pytest plugin that runs diffusers' own transformer tests with MOSAIC's capture processors.

Not part of CI and not a mosaic_kit module: a harness for `scripts/run_diffusers_suites.py`
(which see for how to run it). Loaded with ``-p diffusers_capture_plugin`` (``scripts/`` on
``PYTHONPATH``), it reads ``MOSAIC_CAPTURE``:

- ``stock``: nothing is changed (the baseline);
- ``idle``: every `FluxTransformer2DModel`, `Flux2Transformer2DModel`, `SD3Transformer2DModel` and
  `QwenImageTransformer2DModel` built in the session gets ``install_capture_processors(model)`` at
  the end of its ``__init__`` (diffusers' ``from_pretrained`` and ``from_config`` build through it);
- ``active``: as ``idle``, and every forward of such a model runs inside
  ``handle.capture(RefTargetCapture(corr), layout)``: the image stream is split into a target
  (the first tokens) and one reference (the last quarter, at least one token), with one
  correspondence per sample. After the forward, the capture's ``result()`` is taken when every
  chosen block fed it. A forward whose model no longer holds the handle's processors (a test
  that installs its own, or an IP-adapter) runs without a capture, since the handle refuses
  one then.

Nothing is patched but the four classes' ``__init__`` (wrapped for the session); the capture goes
in through forward hooks registered on each model. At the end, the plugin prints how many models
it installed on, how many forwards it fed and how many it could not (and why).
"""

from __future__ import annotations

import collections
import functools
import os
import weakref

import pytest
import torch

MODE = os.environ.get("MOSAIC_CAPTURE", "stock")
if MODE not in ("stock", "idle", "active"):
    raise ValueError(f"Expected MOSAIC_CAPTURE to be 'stock', 'idle' or 'active', but got {MODE!r}.")

_counts: collections.Counter = collections.Counter()
_handles: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_active: dict[int, object] = {}


def _image_tokens(model: torch.nn.Module, hidden_states: torch.Tensor) -> int:
    if hidden_states.dim() == 4:  # SD3: (B, C, H, W), patchified inside the model
        patch = model.config.patch_size
        return (hidden_states.shape[-2] // patch) * (hidden_states.shape[-1] // patch)
    return hidden_states.shape[1]


def _pre_forward(model, args, kwargs):
    from mosaic_kit.attention import RefTargetCapture
    from mosaic_kit.correspondence import Correspondences
    from mosaic_kit.models import SequenceLayout

    handle = _handles.get(model)
    hidden_states = kwargs.get("hidden_states", args[0] if args else None)
    if handle is None or not isinstance(hidden_states, torch.Tensor):
        _counts["forwards without a capture: no hidden_states tensor"] += 1
        return None
    if not handle.installed:
        _counts["forwards without a capture: the handle's processors were replaced"] += 1
        return None
    if handle.active:  # a forward inside a forward of the same model: feeds nothing more
        _counts["forwards without a capture: nested"] += 1
        return None
    tokens = _image_tokens(model, hidden_states)
    if tokens < 2:
        _counts["forwards without a capture: fewer than 2 image tokens"] += 1
        return None
    ref = max(1, tokens // 4)
    batch = hidden_states.shape[0]
    corr = Correspondences.from_dicts([[{0: 0}]] * batch, ref_tokens=[ref], tgt_tokens=tokens - ref)
    capture = RefTargetCapture(corr.to(hidden_states.device))
    context = handle.capture(capture, SequenceLayout.concatenated(tokens - ref, [ref]))
    context.__enter__()
    _active[id(model)] = (context, capture, handle)
    return None


def _post_forward(model, args, kwargs, output):
    entry = _active.pop(id(model), None)
    if entry is None:
        return None
    context, capture, handle = entry
    context.__exit__(None, None, None)
    if capture.num_blocks == len(handle.block_names):
        capture.result()
        _counts["forwards that fed every chosen block"] += 1
    else:
        _counts[f"forwards that fed {capture.num_blocks} of {len(handle.block_names)} blocks"] += 1
    return None


def _attach(model: torch.nn.Module) -> None:
    from mosaic_kit.models import install_capture_processors

    _handles[model] = install_capture_processors(model)
    _counts[f"models installed on: {type(model).__name__}"] += 1
    if MODE == "active":
        model.register_forward_pre_hook(_pre_forward, with_kwargs=True)
        model.register_forward_hook(_post_forward, with_kwargs=True, always_call=True)


def _wrap(cls) -> None:
    original = cls.__init__

    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        if type(self) is cls:
            _attach(self)

    cls.__init__ = __init__


def pytest_configure(config):
    if MODE == "stock":
        return
    from diffusers import (
        Flux2Transformer2DModel,
        FluxTransformer2DModel,
        QwenImageTransformer2DModel,
        SD3Transformer2DModel,
    )

    for cls in (FluxTransformer2DModel, Flux2Transformer2DModel, SD3Transformer2DModel, QwenImageTransformer2DModel):
        _wrap(cls)


def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_sep("=", f"MOSAIC capture processors: {MODE}")
    for key, value in sorted(_counts.items()):
        terminalreporter.write_line(f"{key}: {value}")


@pytest.hookimpl(tryfirst=True)
def pytest_report_header(config):
    return f"MOSAIC capture processors: {MODE}"
