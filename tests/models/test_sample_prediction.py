"""Sample prediction (x-prediction) of tiny models: the velocity conversion, the clean-target loss,
where it is refused, and a training run through the trainer."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mosaic_kit.losses import flow_matching_loss
from mosaic_kit.models import MIN_SAMPLE_SIGMA
from mosaic_kit.pipelines import build_family
from mosaic_kit.training import config_from_dict


@pytest.fixture(scope="module")
def family():
    return build_family("flux1", base=None, pixel_space=2, prediction="sample")


@settings(max_examples=30, deadline=None)
@given(sigmas=st.lists(st.floats(MIN_SAMPLE_SIGMA, 1.0), min_size=1, max_size=3), seed=st.integers(0, 2**16))
def test_velocity_and_weighted_loss_are_the_clean_target_twins(family, sigmas, seed):
    g = torch.Generator().manual_seed(seed)
    b = len(sigmas)
    x0, eps, x_hat = (torch.randn(b, 5, 12, generator=g, dtype=torch.float64) for _ in range(3))
    sigma = torch.tensor(sigmas, dtype=torch.float64)
    noisy = family.noise(x0, eps, sigma)
    # the exact clean target gives the exact velocity
    torch.testing.assert_close(family.velocity(x0, noisy, sigma).double(), eps - x0, rtol=1e-5, atol=1e-5)
    # the weighted velocity loss of any output is the clean-target loss (the "x-loss"), values and gradients
    x_hat.requires_grad_(True)
    weighted = flow_matching_loss(family.velocity(x_hat, noisy, sigma), eps.float(), x0.float(), family.loss_weights(sigma))
    naive = (x_hat.float() - x0.float()).square().mean()
    torch.testing.assert_close(weighted, naive, rtol=1e-4, atol=1e-6)
    (grad,) = torch.autograd.grad(weighted, x_hat)
    torch.testing.assert_close(grad.float(), 2 * (x_hat.detach().float() - x0.float()) / x0.numel(), rtol=1e-3, atol=1e-7)


def test_velocity_prediction_is_unchanged_and_below_the_floor_sigma_is_clamped(family):
    plain = build_family("flux1", base=None, pixel_space=2)
    out, noisy = torch.randn(2, 4, 12), torch.randn(2, 4, 12)
    sigma = torch.tensor([0.0, 0.5])
    assert plain.prediction == "velocity" and plain.velocity(out, noisy, sigma) is out
    assert plain.loss_weights(sigma) is None
    v = family.velocity(out, noisy, sigma)
    torch.testing.assert_close(v[0], (noisy[0] - out[0]) / MIN_SAMPLE_SIGMA)  # finite at σ = 0
    torch.testing.assert_close(family.loss_weights(sigma), torch.tensor([MIN_SAMPLE_SIGMA**2, 0.25]))


def test_forward_returns_the_velocity_of_the_raw_output(family):
    from mosaic_kit.data import collate_samples
    from mosaic_kit.eval.synthetic.runner import held_out_world
    from mosaic_kit.eval.synthetic import SyntheticEvalConfig

    world = held_out_world(SyntheticEvalConfig(num_refs=(2,), target_size=32, ref_size=16))
    batch = collate_samples([world.sample(0, num_refs=2)], 32, 16, vae_scale_factor=family.vae_scale_factor)
    inputs = family.encode_batch(batch)
    noisy, sigma = torch.randn(inputs.target.shape), torch.tensor([0.3])
    raw = family.model(**family.model_kwargs(inputs, noisy, sigma, 3.5), capture=None)
    torch.testing.assert_close(family.forward(inputs, noisy, sigma, guidance=3.5), (noisy - raw) / 0.3)


def test_sample_prediction_is_refused_where_it_cannot_work():
    with pytest.raises(ValueError, match="`prediction` to be one of"):
        build_family("flux1", base=None, prediction="noise")
    with pytest.raises(ValueError, match="`prediction` other than 'velocity' only without a `base`"):
        build_family("flux1", base="/nonexistent", prediction="sample")
    with pytest.raises(ValueError, match="model.prediction"):
        config_from_dict({"model": {"prediction": "epsilon"}})
    with pytest.raises(ValueError, match="only with `model.base: null`"):
        config_from_dict({"model": {"base": "black-forest-labs/FLUX.1-dev", "prediction": "sample"}})
    # the in-sequence families sample validation sheets through their stock pipelines (velocity only)
    with pytest.raises(ValueError, match="stock pipeline, which expects a velocity"):
        config_from_dict({"model": {"family": "flux2", "prediction": "sample"}, "validation_samples": 1,
                          "data": {"ref_size": 64}})
    config_from_dict({"model": {"family": "flux2", "prediction": "sample"}, "validation_samples": 0})
    config_from_dict({"model": {"prediction": "sample"}, "validation_samples": 2})  # FLUX.1 samples through forward


def test_training_with_sample_prediction_learns_the_clean_target(tmp_path):
    from mosaic_kit.training import MosaicTrainer

    config = config_from_dict({
        "output_dir": str(tmp_path), "max_steps": 3, "log_every": 1, "validate_every": 3, "validation_samples": 1,
        "validation_steps": 2, "checkpoint_every": 100, "tracker": None, "mixed_precision": "no",
        "model": {"pixel_space": 2, "prediction": "sample", "lora_rank": 4, "gradient_checkpointing": False},
        "data": {"target_size": 32, "ref_size": 16, "batch_size": 2, "synthetic_refs": [1, 2]},
    })
    trainer = MosaicTrainer(config)
    trainer.train()
    assert trainer.family.prediction == "sample"
    assert (tmp_path / "metrics.jsonl").exists()
