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
