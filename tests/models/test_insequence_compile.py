"""The capture processors under ``torch.compile(..., fullgraph=True)``.

Idle (also after a capture step, whose cleared capture the handle keeps for a checkpoint's
recomputation), a compiled forward traces in one graph and equals the stock forward. The backend
is ``"eager"`` (dynamo's tracing, which is what fails on an untraceable call, without inductor's
C++ build), so a test takes a few seconds.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import FluxTransformer2DModel  # noqa: E402

from mosaic_kit.attention import RefTargetCapture  # noqa: E402
from mosaic_kit.correspondence import Correspondences  # noqa: E402
from mosaic_kit.models import SequenceLayout, install_capture_processors  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (tests/conftest.py)

TEXT, TGT, REF = 3, 16, 4


def _flux(checkpointing=False):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=1, num_single_layers=1,
                                       attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                       pooled_projection_dim=16, axes_dims_rope=(2, 2, 4))
    if checkpointing:
        model.enable_gradient_checkpointing()
    return model


def _inputs():
    gen = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(1, TGT + 2 * REF, 8, generator=gen),
                encoder_hidden_states=torch.randn(1, TEXT, 16, generator=gen),
                pooled_projections=torch.randn(1, 16, generator=gen), timestep=torch.tensor([0.5]),
                img_ids=torch.randn(TGT + 2 * REF, 3, generator=gen), txt_ids=torch.zeros(TEXT, 3))


def _corr():
    return Correspondences.from_dicts([[{0: 1, 3: 9}, {1: 2}]], ref_tokens=[REF, REF], tgt_tokens=TGT)


def _training_step(model, handle):
    """One MOSAIC step: a capture fed by the forward, a backward after the ``with``."""
    with handle.capture(RefTargetCapture(_corr(), aggregate="all"), SequenceLayout.concatenated(TGT, [REF, REF])) as capture:
        out = model(**_inputs(), return_dict=False)[0]
    result = capture.result()
    (out.square().mean() - result.pair_log_probs.sum() + result.ref_rows.square().sum()).backward()


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_idle_processors_compile_fullgraph_after_a_capture_step(checkpointing):
    model = _flux(checkpointing)
    with torch.no_grad():
        stock = model(**_inputs(), return_dict=False)[0]
    handle = install_capture_processors(model)
    _training_step(model, handle)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():  # validation or sampling after a training step
        assert torch.equal(compiled(**_inputs(), return_dict=False)[0], stock)
    # a compiled step without MOSAIC (grad on): stock values, and its backward runs
    out = compiled(**_inputs(), return_dict=False)[0]
    assert torch.equal(out.detach(), stock)
    out.square().mean().backward()
    torch._dynamo.reset()


def _step(model, handle, corr, aggregate):
    """Forward with a capture, a loss from the output, SCAL's pairs and MDL's rows, and its backward."""
    with handle.capture(RefTargetCapture(corr, aggregate=aggregate, max_chunk_elements=64),
                        SequenceLayout.concatenated(TGT, [REF, REF])) as capture:
        out = model(**_inputs(), return_dict=False)[0]
    result = capture.result()
    loss = out.square().mean() - result.pair_log_probs.sum()
    if result.ref_rows is not None:
        loss = loss + result.ref_rows.square().sum()
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    return result.pair_log_probs.detach(), None if result.ref_rows is None else result.ref_rows.detach(), grads, capture.num_blocks


_STEPS = [  # correspondences that change from step to step (pair counts included), several chunks per block
    [[{0: 1, 3: 9}, {1: 2}]],
    [[{0: 4, 1: 5, 2: 6}, {3: 7, 0: 0}]],
]


def _compiled_training_equals_eager(aggregate, backend, checkpointing=False):
    eager, compiled = _flux(checkpointing), _flux(checkpointing)
    eager_handle, handle = install_capture_processors(eager), install_capture_processors(compiled)
    compiled.compile_repeated_blocks(fullgraph=True, backend=backend)
    for dicts in _STEPS:
        corr = Correspondences.from_dicts(dicts, ref_tokens=[REF, REF], tgt_tokens=TGT)
        want = _step(eager, eager_handle, corr, aggregate)
        got = _step(compiled, handle, corr, aggregate)
        assert got[3] == want[3] == 2
        torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)
        if aggregate is not None:
            torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=1e-6)
        assert len(got[2]) == len(want[2])
        for g, w in zip(got[2], want[2]):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


def test_compile_repeated_blocks_fullgraph_trains_with_a_capture():
    """diffusers' regional compilation, fullgraph, with a capture active: the values and the
    gradients (every parameter) equal the eager run's, over steps whose correspondences change."""
    _compiled_training_equals_eager("points", "eager")


@pytest.mark.slow
@pytest.mark.parametrize("aggregate", ["points", "all", None])
def test_compile_repeated_blocks_fullgraph_aot_autograd(aggregate):
    """As above through AOTAutograd (the backward traced too), SCAL-only included."""
    _compiled_training_equals_eager(aggregate, "aot_eager")


@pytest.mark.slow
def test_compile_repeated_blocks_fullgraph_with_gradient_checkpointing():
    """Regional compilation inside diffusers' (non-reentrant) gradient checkpointing: the
    recomputation in backward runs the block with dynamo off, and replays the capture."""
    _compiled_training_equals_eager("all", "eager", checkpointing=True)
