"""MosaicObjective.combine: eq. 15 around a diffusion loss the caller computed (any parameterisation)."""

import pytest
import torch
import torch.nn.functional as F
from helpers import random_corr, random_qk

from mosaic_kit import finite_checks
from mosaic_kit.attention import RefTargetCapture
from mosaic_kit.losses import MosaicObjective, flow_matching_loss
from mosaic_kit.losses.functional import mdl, scal


def _captured(corr, queries, keys, aggregate):
    capture = RefTargetCapture(corr, aggregate=aggregate)
    for q, k in zip(queries, keys):
        capture.add(q, k)
    return capture.result()


@pytest.mark.parametrize("preset, step", [("paper", 0), ("released", 10_500)])
def test_forward_is_combine_after_flow_matching(preset, step):
    corr = random_corr(3, 2, 3)
    queries, keys = random_qk(corr, 2, 2, 4, seed=3)
    objective = MosaicObjective.from_preset(preset)
    pred = torch.randn(2, 6, 4, dtype=torch.float64, requires_grad=True)
    noise, latents = torch.randn(2, 6, 4, dtype=torch.float64), torch.randn(2, 6, 4, dtype=torch.float64)
    attention = _captured(corr, queries, keys, objective.mdl_aggregate)
    via_forward = objective(pred, noise, latents, attention, corr, step=step)
    via_combine = objective.combine(flow_matching_loss(pred, noise, latents), attention, corr, step=step)
    for name in ("loss", "flow_matching", "scal", "mdl"):
        torch.testing.assert_close(getattr(via_forward, name), getattr(via_combine, name), rtol=0, atol=0)
    assert (via_forward.scal_weight, via_forward.mdl_weight) == (via_combine.scal_weight, via_combine.mdl_weight)
    inputs = [pred] + queries + keys
    for a, b in zip(torch.autograd.grad(via_forward.loss, inputs, retain_graph=True), torch.autograd.grad(via_combine.loss, inputs)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_epsilon_prediction_loss_combines_with_the_attention_terms():
    # A toy epsilon-prediction model: a linear layer predicting the added noise from x_t.
    corr = random_corr(5, 2, 2)
    queries, keys = random_qk(corr, 3, 2, 4, seed=5)
    model = torch.nn.Linear(4, 4).double()
    x0, noise = torch.randn(2, 6, 4, dtype=torch.float64), torch.randn(2, 6, 4, dtype=torch.float64)
    alpha_bar = torch.tensor([0.3, 0.8], dtype=torch.float64)[:, None, None]
    x_t = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise
    eps_loss = F.mse_loss(model(x_t), noise)
    attention = _captured(corr, queries, keys, "points")
    out = MosaicObjective(scal_weight=0.4, mdl_weight=0.6).combine(eps_loss, attention, corr, step=7)

    expected_scal = scal(attention, corr, reduction="per_ref", eps=0.0)
    expected_mdl = mdl(attention, corr, divergence="sym_kl", aggregate="points")
    torch.testing.assert_close(out.diffusion, eps_loss)
    assert out.diffusion is out.flow_matching
    torch.testing.assert_close(out.scal, expected_scal)
    torch.testing.assert_close(out.mdl, expected_mdl)
    torch.testing.assert_close(out.loss, eps_loss + 0.4 * expected_scal + 0.6 * expected_mdl)
    out.loss.backward()
    # Both the diffusion loss and the attention terms train something.
    assert model.weight.grad is not None and model.weight.grad.abs().sum() > 0
    assert all(q.grad is not None and q.grad.abs().sum() > 0 for q in queries)


def test_combine_loss_dtype_and_weights_zero():
    objective = MosaicObjective(scal_weight=0.0, mdl_weight=0.0)
    half = torch.tensor(0.25, dtype=torch.bfloat16)
    out = objective.combine(half, None, None)
    assert out.loss.dtype == torch.float32 and out.loss.item() == 0.25
    assert out.scal.item() == 0.0 and out.mdl.item() == 0.0
    with pytest.raises(ValueError, match="`attention` and `corr`"):
        MosaicObjective().combine(half, None, None)


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.ones(2), r"scalar \(0-dim\).*\(2,\)"),
        (torch.tensor(1), r"floating tensor.*torch.int64"),
        (1.0, r"floating tensor.*but got float"),
    ],
)
def test_combine_rejects_non_scalar_losses(bad, match):
    with pytest.raises(ValueError, match=r"`diffusion_loss`") as info:
        MosaicObjective(scal_weight=0.0, mdl_weight=0.0).combine(bad, None, None)
    assert info.match(match)


def test_combine_rejects_non_finite_loss_while_checks_are_on():
    objective = MosaicObjective(scal_weight=0.0, mdl_weight=0.0)
    with pytest.raises(ValueError, match="`diffusion_loss` to hold only finite values"):
        objective.combine(torch.tensor(float("nan")), None, None)
    with finite_checks(False):  # off: no sync in the hot path, the value passes through
        assert torch.isnan(objective.combine(torch.tensor(float("nan")), None, None).loss)
