"""The synthetic-world runner (mosaic_kit.eval.synthetic.runner) sees the model only through the
model boundary: its teacher-forced scores against a by-hand twin built from the family's methods,
and per-sample scores that do not depend on the batch."""

from __future__ import annotations

import pytest
import torch

from mosaic_kit.attention import PointAttentionRows
from mosaic_kit.data import collate_samples
from mosaic_kit.eval import (
    SyntheticEvalConfig,
    attention_log_probability,
    evaluate_denoising,
    evaluate_synthetic,
    held_out_world,
)
from mosaic_kit.pipelines import MosaicFluxPipeline
from mosaic_kit.pipelines.tiny import tiny_flux_components


@pytest.fixture(scope="module")
def family():
    torch.manual_seed(0)
    pipe = MosaicFluxPipeline(**tiny_flux_components(pixel_space=2))
    pipe.family.add_lora(rank=2)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a LoRA that changes the output, so the references matter
        for name, param in pipe.transformer.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.05)
    return pipe.family


def _batch(count: int, k: int = 2):
    world = held_out_world(SyntheticEvalConfig(num_refs=(k,)))
    return collate_samples([world.sample(i, num_refs=k) for i in range(count)], 64, 32, vae_scale_factor=2)


def test_scores_match_a_by_hand_twin(family):
    batch, sigma = _batch(2), 0.4
    noise = torch.randn(2, 256, 48, generator=torch.Generator().manual_seed(3))
    scores = evaluate_denoising(family, batch, sigma, noise)
    # the twin: encode, x_σ = (1 - σ)x + σε, one forward with the capture, x̂0 = x_σ - σ v̂, decode
    with torch.no_grad():
        inputs = family.encode_batch(batch)
        noisy = (1 - sigma) * inputs.target + sigma * noise
        rows = PointAttentionRows(batch.corr)
        kwargs = family.model_kwargs(inputs, noisy, torch.full((2,), sigma), guidance=1.0)
        velocity = family.model(**kwargs, capture=[rows]).float()
        estimate = family.decode(noisy - sigma * velocity, 64, 64)
    attention = rows.result()
    torch.testing.assert_close(scores["estimate"], estimate, atol=1e-6, rtol=1e-5)
    logp = attention_log_probability(attention, batch.corr, reduction="none")
    points = batch.corr.point_mask.float()
    torch.testing.assert_close(scores["log_prob"], (logp * points).sum((1, 2)) / points.sum((1, 2)))
    assert torch.isfinite(scores["ref_gain"]).all()


def test_per_sample_scores_do_not_depend_on_the_batch(family):
    batch = _batch(2)
    noise = torch.randn(2, 256, 48, generator=torch.Generator().manual_seed(4))
    together = evaluate_denoising(family, batch, 0.6, noise)
    for b in range(2):
        alone = evaluate_denoising(family, collate_samples([held_out_world(SyntheticEvalConfig(num_refs=(2,))).sample(
            b, num_refs=2)], 64, 32, vae_scale_factor=2), 0.6, noise[b : b + 1])
        for name in ("hit_rate", "log_prob", "overlap", "own_mass", "other_mass", "denoise_mse"):
            torch.testing.assert_close(alone[name][0], together[name][b], atol=1e-4, rtol=1e-4, msg=name)
        torch.testing.assert_close(alone["maps"][0], together["maps"][b], atol=1e-5, rtol=1e-4)
        assert torch.isnan(alone["ref_gain"]).all()  # no other sample to swap references with


def test_evaluate_synthetic_takes_a_family_and_restores_its_mode(family):
    family.model.train()
    config = SyntheticEvalConfig(num_refs=(1, 2), attention_samples=1, sigmas=(0.5,), generation_samples=0)
    result = evaluate_synthetic(family, config, figure_sample=(2, 0))
    assert family.model.training
    assert [(r["kind"], r["num_refs"], r["index"]) for r in result.records] == [("denoise", 1, 0), ("denoise", 2, 0)]
    assert result.figure["maps"].shape == (2, 16, 16) and not result.images
    with pytest.raises(ValueError, match="Expected `figure_sample`"):
        evaluate_synthetic(family, config, figure_sample=(3, 0))


# ----------------------------------------------------------------------------- generation through the family
def _quantised(sample):
    """The sample with references rounded to 8 bits, as the pipeline sees them through PIL."""
    from dataclasses import replace as replace_sample

    return replace_sample(sample, references=[(r * 255).round() / 255 for r in sample.references])


def test_family_sampler_matches_the_flux1_pipeline_on_the_same_noise(family):
    from mosaic_kit.eval import generate_with_family
    from mosaic_kit.utils.images import tensor_to_pil

    config = SyntheticEvalConfig(num_refs=(2,), target_size=32, ref_size=16)
    sample = _quantised(held_out_world(config).sample(0, num_refs=2))
    batch = collate_samples([sample], 32, 16, vae_scale_factor=2)
    noise = torch.randn(1, 64, 48, generator=torch.Generator().manual_seed(5))
    ours = generate_with_family(family, batch, 3, noise)
    pipe = family.pipe
    theirs = pipe(sample.caption, [tensor_to_pil(r) for r in sample.references], height=32, width=32, ref_size=16,
                  num_inference_steps=3, guidance_scale=1.0, output_type="pt", latents=noise,
                  max_sequence_length=family.max_sequence_length, progress=False, fit_references=False).images
    assert ours.shape == (1, 3, 32, 32)
    torch.testing.assert_close(ours, theirs.float().clamp(0, 1), atol=2e-3, rtol=0)


def test_evaluate_synthetic_generates_flux2_samples_from_16_pixel_references():
    """FLUX.2's stock pipeline refuses references under 64 px; the family sampler does not."""
    from mosaic_kit.pipelines import build_family

    flux2 = build_family("flux2", base=None, pixel_space=2)
    world = {"identity_range": [0, 8], "subject_style": "two_tone", "background": "plain"}
    config = SyntheticEvalConfig(num_refs=(2,), attention_samples=1, sigmas=(0.5,), generation_samples=2,
                                 inference_steps=2, target_size=32, ref_size=16, world=world)
    result = evaluate_synthetic(flux2, config, figure_sample=None)
    generated = [r for r in result.records if r["kind"] == "generation"]
    assert [(r["num_refs"], r["index"]) for r in generated] == [(2, 0), (2, 1)]
    assert all(0.0 <= r["sample_presence"] <= 1.0 and len(r["subject_colours"]) == r["num_refs"] for r in generated)
    assert result.images[2].shape == (2, 3, 32, 32)
    again = evaluate_synthetic(flux2, config, figure_sample=None)  # seeded: the same images
    torch.testing.assert_close(again.images[2], result.images[2])
    with pytest.raises(ValueError, match="sampler"):
        SyntheticEvalConfig(sampler="stock")
    with pytest.raises(ValueError, match="`world`"):
        SyntheticEvalConfig(world={"image_size": 64})


def test_evaluated_world_takes_the_world_settings():
    config = SyntheticEvalConfig(num_refs=(3,), target_size=32, ref_size=16,
                                 world={"identity_range": [0, 8], "subject_style": "plain", "background": "plain"})
    sample = held_out_world(config).sample(0, num_refs=3)
    assert all(0 <= i < 8 for i in sample.meta["identities"]) and "plain background" in sample.caption
    assert held_out_world(SyntheticEvalConfig()).config.identity_range[0] >= 1_000_000  # default: held-out
