"""The model boundary (`ModelFamily`) and its FLUX.1 implementation (`MosaicFluxFamily`).

Each encoding, forward, noising and decoding path is compared with a twin written out with
diffusers' own calls (the code the trainer, the pipeline and the evaluation held before the
boundary): the numbers are equal, bit for bit.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")

from diffusers import FluxPipeline  # noqa: E402
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps  # noqa: E402

from mosaic_kit.correspondence import TokenGrid  # noqa: E402
from mosaic_kit.data import SyntheticWorld, SyntheticWorldConfig, collate_samples  # noqa: E402
from mosaic_kit.models import (  # noqa: E402
    TRAINABLE,
    ModelFamily,
    ModelInputs,
    MosaicFluxFamily,
    MosaicFluxTransformer,
    TokenLayout,
    logit_normal_sigmas,
    reference_lora_state_dict,
)
from mosaic_kit.pipelines import MosaicFluxPipeline, fit_on_white, tiny_mosaic_pipeline  # noqa: E402
from mosaic_kit.pipelines.tiny import tiny_flux_components  # noqa: E402


@pytest.fixture(scope="module")
def pipe():
    return tiny_mosaic_pipeline(seed=3)


@pytest.fixture(scope="module")
def family(pipe):
    return MosaicFluxFamily(pipe, capture_blocks="all", max_sequence_length=16)


@pytest.fixture(scope="module")
def batch():
    world = SyntheticWorld(SyntheticWorldConfig(image_size=32, ref_size=32, min_refs=1, max_refs=3, seed=5))
    return collate_samples([world.sample(i) for i in range(2)], 32, 32, max_refs=3, vae_scale_factor=8)


@torch.no_grad()
def _latents_twin(pipe, images):
    """The trainer's former encode: pixels in [-1, 1], latent mode, FLUX shift and scale; one VAE
    call per image (an image encodes the same alone or in any batch: cached conditioning)."""
    vae = pipe.vae
    latents = torch.cat([vae.encode(images[i : i + 1].to(vae.dtype) * 2 - 1).latent_dist.mode()
                         for i in range(images.shape[0])])
    return (latents - vae.config.shift_factor) * vae.config.scaling_factor


@torch.no_grad()  # as the former encoders (and T5 picks other kernels with gradients)
def test_encode_batch_equals_the_diffusers_twin(family, pipe, batch):
    inputs = family.encode_batch(batch)
    text, pooled, text_ids = pipe.encode_prompt(prompt=batch.captions, prompt_2=None, max_sequence_length=16)
    target = _latents_twin(pipe, batch.targets)
    b, k = batch.references.shape[:2]
    refs = _latents_twin(pipe, batch.references.flatten(0, 1))
    c = target.shape[1]
    packed_target = FluxPipeline._pack_latents(target, b, c, *target.shape[-2:])
    packed_refs = FluxPipeline._pack_latents(refs, b * k, c, *refs.shape[-2:]).reshape(b, -1, 4 * c)
    assert torch.equal(inputs.target, packed_target.float())
    cond = inputs.conditioning
    assert torch.equal(cond["text_embeddings"], text) and torch.equal(cond["pooled_embeddings"], pooled)
    assert torch.equal(cond["text_ids"], text_ids)
    assert torch.equal(cond["reference_tokens"], packed_refs)
    ids = FluxPipeline._prepare_latent_image_ids(b, target.shape[2] // 2, target.shape[3] // 2, "cpu", torch.float32)
    assert torch.equal(cond["target_ids"], ids)
    # released reference ids: each reference's grid shifted left by (its width in tokens)·(k + 1)
    grid = FluxPipeline._prepare_latent_image_ids(1, refs.shape[2] // 2, refs.shape[3] // 2, "cpu", torch.float32)
    expected = torch.cat([grid + torch.tensor([0.0, 0.0, -(refs.shape[3] // 2) * (j + 1)]) for j in range(k)])
    assert torch.equal(cond["reference_ids"], expected)
    # the layout is the batch's own token grids
    assert inputs.layout.target_grid == batch.target_grid
    assert inputs.layout.reference_grids == (batch.ref_grid,) * k
    assert cond["reference_token_counts"] == inputs.layout.reference_token_counts == (batch.ref_grid.num_tokens,) * k


def test_forward_equals_the_transformer_called_directly(family, batch):
    inputs = family.encode_batch(batch)
    g = torch.Generator().manual_seed(0)
    sigmas = family.sample_sigmas(2, g, inputs.layout)
    noise = torch.randn(inputs.target.shape, generator=g)
    noisy = family.noise(inputs.target, noise, sigmas)
    assert torch.equal(noisy, (1 - sigmas[:, None, None]) * inputs.target + sigmas[:, None, None] * noise)
    with torch.no_grad():
        got = family.forward(inputs, noisy, sigmas, guidance=3.5)
        twin = MosaicFluxTransformer(family.transformer, capture_blocks="all")(
            **inputs.conditioning, target_tokens=noisy, timestep=sigmas, guidance=torch.full((2,), 3.5))
    assert torch.equal(got, twin)
    kwargs = family.model_kwargs(inputs, noisy, sigmas, guidance=torch.full((2,), 3.5))
    assert set(kwargs) >= {"target_tokens", "timestep", "guidance", "reference_tokens", "text_embeddings"}


def test_capture_through_the_family_sees_every_block(family, batch):
    from mosaic_kit.attention import RefTargetCapture

    inputs = family.encode_batch(batch)
    capture = RefTargetCapture(batch.corr)
    with torch.no_grad():
        family.forward(inputs, inputs.target, torch.full((2,), 0.5), capture=capture, guidance=1.0)
    config = family.transformer.config
    assert capture.num_blocks == config.num_layers + config.num_single_layers  # capture_blocks="all"


@pytest.mark.parametrize(("mean", "std", "tokens"), [(0.0, 1.0, None), (0.0, 1.0, 4), (0.0, 1.0, 1024)])
def test_sigmas_equal_the_former_sampler(family, mean, std, tokens):
    """The former trainer sampler: sigmoid(randn·std + mean), FLUX's linear μ, exponential shift."""
    g = torch.Generator().manual_seed(7)
    u = torch.sigmoid(torch.randn(64, generator=g) * std + mean)
    if tokens is not None:
        slope = (1.15 - 0.5) / (4096 - 256)
        mu = tokens * slope + (0.5 - slope * 256)
        u = math.exp(mu) / (math.exp(mu) + (1 / u - 1))
    side = 16 * int(math.isqrt(tokens)) if tokens else 16
    layout = None if tokens is None else family.token_layout((side, side), ())
    got = family.sample_sigmas(64, torch.Generator().manual_seed(7), layout, mean, std)
    assert torch.equal(got, u)


def test_logit_normal_sigmas_shift_matches_diffusers_calculate_shift():
    mu = calculate_shift(1024, 256, 4096, 0.5, 1.15)
    a = logit_normal_sigmas(32, torch.Generator().manual_seed(1), mu)
    u = logit_normal_sigmas(32, torch.Generator().manual_seed(1))
    assert torch.allclose(a, math.exp(mu) / (math.exp(mu) + (1 / u - 1)), rtol=0, atol=0)
    assert bool((a > u).all())  # μ > 0 shifts towards noise


@torch.no_grad()
def test_decode_equals_the_pipeline_twin(family, pipe, batch):
    inputs = family.encode_batch(batch)
    got = family.decode(inputs.target, 32, 32)
    latents = FluxPipeline._unpack_latents(inputs.target, 32, 32, pipe.vae_scale_factor)
    latents = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
    decoded = pipe.vae.decode(latents, return_dict=False)[0]
    assert torch.equal(got, ((decoded.float() + 1) / 2).clamp(0, 1))
    assert torch.equal(got, pipe.image_processor.postprocess(decoded, output_type="pt"))


def test_trainable_parameters_and_lora_round_trip(tmp_path):
    family = MosaicFluxFamily(tiny_mosaic_pipeline(seed=1, lora_rank=2))
    lora = family.trainable_parameters("lora")
    everything = family.trainable_parameters("all")
    assert 0 < len(lora) < len(everything) and {id(p) for p in lora} <= {id(p) for p in everything}
    chosen = family.set_trainable("all")
    assert all(p.requires_grad for p in chosen)
    family.set_trainable("lora")
    assert {id(p) for p in family.model.parameters() if p.requires_grad} == {id(p) for p in lora}
    with pytest.raises(ValueError, match="`trainable` to be one of"):
        family.trainable_parameters("bias")
    for p in lora:
        torch.nn.init.normal_(p)
    path = family.save_lora(tmp_path / "lora.safetensors")
    other = MosaicFluxFamily(tiny_mosaic_pipeline(seed=1, lora_rank=2))
    other.load_lora(path)
    a, b = reference_lora_state_dict(family.transformer, scaled=True), reference_lora_state_dict(other.transformer)
    assert sorted(a) == sorted(b) and all(torch.equal(a[key], b[key]) for key in a)
    bare = MosaicFluxFamily(FluxPipeline(**tiny_flux_components(seed=1)))
    with pytest.raises(ValueError, match="reference LoRA 'mosaic'"):
        bare.trainable_parameters("lora")
    bare.add_lora(rank=2)
    assert len(bare.trainable_parameters("lora")) == len(lora)
    assert TRAINABLE == ("lora", "all")


@torch.no_grad()
def _old_pipeline_call(pipe, prompt, images, height, width, ref_size, steps, seed, use_cache=False):
    """`MosaicFluxPipeline.__call__` as it was before the boundary (encode and decode inline)."""
    refs = [fit_on_white(image, ref_size) for image in images]
    device = pipe._execution_device
    model = MosaicFluxTransformer(pipe.transformer)
    text, pooled, text_ids = pipe.encode_prompt(prompt=prompt, prompt_2=None, device=device, max_sequence_length=8)
    pixels = pipe.image_processor.preprocess(refs, height=ref_size, width=ref_size)
    latents = pipe.vae.encode(pixels).latent_dist.mode()
    latents = (latents - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
    c = latents.shape[1]
    tokens = FluxPipeline._pack_latents(latents, len(refs), c, *latents.shape[-2:]).reshape(1, -1, 4 * c)
    counts = (tokens.shape[1] // len(refs),) * len(refs)
    grid = FluxPipeline._prepare_latent_image_ids(1, ref_size // 16, ref_size // 16, device, torch.float32)
    ref_ids = torch.cat([grid + torch.tensor([0.0, 0.0, -(ref_size // 16) * (j + 1)]) for j in range(len(refs))])
    target, target_ids = pipe.prepare_latents(1, pipe.transformer.config.in_channels // 4, height, width, text.dtype,
                                              device, torch.Generator().manual_seed(seed))
    sigmas = np.linspace(1.0, 1 / steps, steps)
    config = pipe.scheduler.config
    mu = calculate_shift(target.shape[1], config["base_image_seq_len"], config["max_image_seq_len"],
                         config["base_shift"], config["max_shift"])
    timesteps, _ = retrieve_timesteps(pipe.scheduler, steps, device, sigmas=sigmas, mu=mu)
    guidance = torch.full((1,), 3.5)
    refs_kwargs = {"reference_tokens": tokens, "reference_ids": ref_ids, "reference_token_counts": counts}
    if use_cache:
        refs_kwargs = {"reference_cache": model.build_reference_cache(tokens, ref_ids, pooled, counts, guidance=guidance,
                                                                      reference_guidance=1.0)}
    pipe.scheduler.set_begin_index(0)
    for t in timesteps:
        velocity = model(target_tokens=target, text_embeddings=text, pooled_embeddings=pooled,
                         timestep=t.expand(1).to(target.dtype) / 1000, target_ids=target_ids, text_ids=text_ids,
                         guidance=guidance, reference_guidance=1.0, **refs_kwargs)
        target = pipe.scheduler.step(velocity, t, target, return_dict=False)[0]
    unpacked = pipe._unpack_latents(target, height, width, pipe.vae_scale_factor)
    unpacked = unpacked / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
    decoded = pipe.vae.decode(unpacked, return_dict=False)[0]
    return target, pipe.image_processor.postprocess(decoded, output_type="np")


@pytest.mark.parametrize("use_cache", [False, True])
def test_pipeline_through_the_family_equals_the_former_pipeline(pipe, use_cache):
    images = [Image.new("RGB", (40, 30), "red"), Image.new("RGB", (30, 40), "blue")]
    fast = {"height": 32, "width": 48, "ref_size": 32, "num_inference_steps": 2, "max_sequence_length": 8,
            "progress": False, "use_reference_cache": use_cache}
    latent = pipe("a thing", images, generator=torch.Generator().manual_seed(4), output_type="latent", **fast).images
    array = pipe("a thing", images, generator=torch.Generator().manual_seed(4), output_type="np", **fast).images
    old_latent, old_array = _old_pipeline_call(pipe, "a thing", images, 32, 48, 32, 2, 4, use_cache)
    assert torch.equal(latent, old_latent)
    assert np.array_equal(array, old_array)


def test_pipeline_family_is_set_through_its_setter(pipe):
    assert "_mosaic_transformer" not in pipe.__dict__
    family = MosaicFluxFamily(pipe, reference_attention="full")
    pipe.family = family
    try:
        assert pipe.family is family and pipe.mosaic_transformer is family.model
        with pytest.raises(ValueError, match="built over this pipeline"):
            pipe.family = MosaicFluxFamily(MosaicFluxPipeline(**tiny_flux_components(seed=2)))
        with pytest.raises(ValueError, match="MosaicFluxFamily"):
            pipe.family = family.model
    finally:
        pipe.family = MosaicFluxFamily(pipe)
    assert pipe.mosaic_transformer.reference_attention == "isolated"


def test_bad_inputs_name_themselves(family, batch):
    with pytest.raises(ValueError, match="`target_size` to be \\(height, width\\)"):
        family.token_layout((30, 32), ())
    with pytest.raises(ValueError, match=r"`reference_sizes\[1\]`"):
        family.token_layout((32, 32), [(32, 32), (32, 8)])
    with pytest.raises(ValueError, match="`max_sequence_length`"):
        MosaicFluxFamily(family.pipe, max_sequence_length=0)
    with pytest.raises(ValueError, match="diffusers FluxPipeline"):
        MosaicFluxFamily(object())
    with pytest.raises(ValueError, match="`batch` with `targets`"):
        family.encode_batch(object())
    inputs = family.encode_batch(batch)
    with pytest.raises(ValueError, match="`guidance`"):
        family.forward(inputs, inputs.target, torch.full((2,), 0.5))
    with pytest.raises(ValueError, match="`sigmas` of shape"):
        family.noise(inputs.target, inputs.target, torch.ones(3))
    with pytest.raises(ValueError, match="TokenGrid"):
        TokenLayout(batch.target_grid, (object(),))


def test_a_family_must_implement_the_whole_boundary():
    class Partial(ModelFamily):
        name = "partial"

    with pytest.raises(TypeError, match="abstract"):
        Partial()
    inputs = ModelInputs({}, TokenLayout(TokenGrid(16, 32)))
    assert inputs.target is None and inputs.layout.reference_ranges == () and inputs.layout.num_reference_tokens == 0


def test_only_one_file_of_models_flux_reaches_into_diffusers():
    """`_diffusers.py` alone imports diffusers' model modules; packing and the stream attention
    are pure torch; no file of the package imports another package's private module."""
    import ast
    from pathlib import Path

    import mosaic_kit.models.flux as package

    folder = Path(package.__file__).parent
    found = {}
    for path in sorted(folder.glob("*.py")):
        modules = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                modules.add("." * node.level + (node.module or ""))
            elif isinstance(node, ast.Import):
                modules.update(alias.name for alias in node.names)
        found[path.name] = modules
    assert len(found) == 8, sorted(found)  # tiny.py: the tiny random components live with the family
    internals = {name for name, modules in found.items() if any(m.startswith("diffusers.models") for m in modules)}
    assert internals == {"_diffusers.py"}
    for name in ("packing.py", "processor.py"):
        assert not any(m.split(".")[0] in ("diffusers", "peft") for m in found[name]), name
    for name, modules in found.items():
        private = [m for m in modules if m.startswith("...") and any(part.startswith("_") for part in m.split("."))]
        assert not private, (name, private)
