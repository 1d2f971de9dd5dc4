"""FLUX.2 family (`mosaic_kit.models.flux2`): stock equality, pipeline-exact encoding, LoRA round
trip through stock diffusers, gradients, and SCAL falling on the synthetic world. Tiny random
components built in code, one CPU thread."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("diffusers")
from diffusers import Flux2KleinPipeline, Flux2Pipeline  # noqa: E402
from PIL import Image  # noqa: E402

from mosaic_kit.attention import PointAttentionRows, RefTargetCapture  # noqa: E402
from mosaic_kit.correspondence import Correspondences  # noqa: E402
from mosaic_kit.data import collate_samples  # noqa: E402
from mosaic_kit.data.synthetic_world import SyntheticDataset, SyntheticWorld, SyntheticWorldConfig  # noqa: E402
from mosaic_kit.losses import MosaicObjective, scal  # noqa: E402
from mosaic_kit.models.flux2 import (  # noqa: E402
    FLUX2_LORA_TARGETS,
    Flux2Family,
    flux2_lora_target_modules,
)
from mosaic_kit.pipelines.tiny_flux2 import TINY_FLUX2_TEXT_OUT_LAYERS, tiny_flux2_components  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (tests/conftest.py)


def _images(generator: torch.Generator, *shape: int) -> torch.Tensor:
    """Images exactly representable as 8-bit (so PIL and tensor inputs are the same pixels)."""
    return torch.randint(0, 256, shape, generator=generator).float() / 255


def _to_pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray((image * 255).round().byte().permute(1, 2, 0).numpy())


def _inputs(family: Flux2Family, k: int = 2, b: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    inputs = family.encode(_images(g, b, 3, 32, 32), ["a red cat", "a dog"][:b] + ["x"] * (b - 2),
                           _images(g, b, k, 3, 32, 16))
    noisy = torch.randn(inputs.target.shape, generator=g)
    sigmas = torch.rand(b, generator=g)
    return inputs, noisy, sigmas


def _corr(inputs, b: int = 2, seed: int = 0) -> Correspondences:
    g = torch.Generator().manual_seed(seed)
    n_tgt, counts = inputs.layout.target_grid.num_tokens, inputs.layout.reference_token_counts
    pairs = [[{int(r): int(t) for r, t in zip(torch.randperm(n, generator=g)[:2], torch.randperm(n_tgt, generator=g)[:2])}
              for n in counts] for _ in range(b)]
    return Correspondences.from_dicts(pairs, ref_tokens=list(counts), tgt_tokens=n_tgt)


_STOCK_KEYS = ("hidden_states", "img_ids", "encoder_hidden_states", "txt_ids", "timestep", "guidance")


def _stock(family, inputs, noisy, sigmas) -> torch.Tensor:
    """The stock transformer's full output for the family's inputs (target and reference tokens)."""
    kwargs = family.model_kwargs(inputs, noisy, sigmas)
    return family.transformer(**{k: kwargs[k] for k in _STOCK_KEYS}, return_dict=False)[0]


# -- the forward ------------------------------------------------------------------------------------
def test_forward_equals_stock_with_processors_idle_and_active():
    family = Flux2Family.tiny(seed=1)
    inputs, noisy, sigmas = _inputs(family)
    n_tgt = inputs.layout.target_grid.num_tokens
    with torch.no_grad():
        stock = _stock(family, inputs, noisy, sigmas)[:, :n_tgt]
        family.capture_handle()  # processors installed, idle
        idle = family.forward(inputs, noisy, sigmas)
        capture = RefTargetCapture(_corr(inputs))
        active = family.forward(inputs, noisy, sigmas, capture)
    assert torch.equal(idle, stock)
    assert torch.equal(active, stock)
    assert capture.result().num_blocks == 3  # one double + two single blocks
    family.capture_handle().remove()
    with torch.no_grad():
        assert torch.equal(family.forward(inputs, noisy, sigmas), stock)


def test_forward_takes_the_target_part_of_the_stock_output():
    family = Flux2Family.tiny(seed=2)
    inputs, noisy, sigmas = _inputs(family, k=1, b=1)
    n_tgt = inputs.layout.target_grid.num_tokens
    with torch.no_grad():
        full = _stock(family, inputs, noisy, sigmas)
        out = family.forward(inputs, noisy, sigmas)
    assert full.shape[1] == n_tgt + inputs.layout.num_reference_tokens
    assert torch.equal(out, full[:, :n_tgt])


def test_a_list_of_captures_feeds_each_as_alone():
    """The trainer passes the training capture and diagnostics (PointAttentionRows) together."""
    family = Flux2Family.tiny(seed=11)
    inputs, noisy, sigmas = _inputs(family)
    corr = _corr(inputs)
    alone, rows_alone = RefTargetCapture(corr, aggregate="points"), PointAttentionRows(corr)
    together, rows_together = RefTargetCapture(corr, aggregate="points"), PointAttentionRows(corr)
    with torch.no_grad():
        family.forward(inputs, noisy, sigmas, alone)
        family.forward(inputs, noisy, sigmas, [rows_alone])
        family.forward(inputs, noisy, sigmas, [together, rows_together])
    a, t = alone.result(), together.result()
    assert torch.equal(a.pair_log_probs, t.pair_log_probs) and a.num_blocks == t.num_blocks == 3
    assert torch.equal(rows_alone.result(), rows_together.result())


# -- encoding equals the stock pipeline -------------------------------------------------------------
def _pipeline_transformer_inputs(pipe, prompts, refs_pil, latents, height, width, max_sequence_length):
    seen = {}

    def hook(module, args, kwargs):
        seen.setdefault("kwargs", {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})

    handle = pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        pipe(image=refs_pil, prompt=prompts, height=height, width=width, num_inference_steps=1, latents=latents,
             output_type="latent", max_sequence_length=max_sequence_length,
             text_encoder_out_layers=TINY_FLUX2_TEXT_OUT_LAYERS)
    finally:
        handle.remove()
    return seen["kwargs"]


@pytest.mark.parametrize("k", [1, 3])
def test_encoding_equals_what_flux2_klein_pipeline_builds(k):
    family = Flux2Family.tiny(seed=3, max_sequence_length=24)
    pipe = family.pipe
    g = torch.Generator().manual_seed(k)
    refs = _images(g, k, 3, 64, 96)  # non-square (the pipeline takes >= 64 px) references: rows and columns must not be swapped
    targets = _images(g, 2, 3, 48, 32)
    prompts = ["a red cat", "a dog on grass"]
    inputs = family.encode(targets, prompts, refs[None].expand(2, -1, -1, -1, -1))
    start = torch.randn(2, 16, 3, 2, generator=g)  # (B, 4·C, H/16, W/16) as prepare_latents takes it
    seen = _pipeline_transformer_inputs(pipe, prompts, [_to_pil(r) for r in refs], start, 48, 32, 24)
    n_tgt, cond = inputs.layout.target_grid.num_tokens, inputs.conditioning
    assert seen["hidden_states"].shape[1] == n_tgt + inputs.layout.num_reference_tokens
    # the first timestep has sigma 1: the pipeline's target tokens are the packed start noise
    assert torch.equal(seen["hidden_states"][:, :n_tgt], start.flatten(2).transpose(1, 2))
    assert torch.equal(seen["hidden_states"][:, n_tgt:], cond["reference_tokens"])
    assert torch.equal(seen["img_ids"][:, :n_tgt], cond["latent_ids"])
    assert torch.equal(seen["img_ids"][:, n_tgt:], cond["reference_ids"])
    assert torch.equal(seen["encoder_hidden_states"], cond["encoder_hidden_states"])
    assert torch.equal(seen["txt_ids"], cond["txt_ids"])
    kwargs = family.model_kwargs(inputs, start.flatten(2).transpose(1, 2), seen["timestep"])
    for name in ("hidden_states", "img_ids", "encoder_hidden_states", "txt_ids", "timestep"):
        assert torch.equal(kwargs[name], seen[name]), name
    # the same images through the pipeline at inference (no target) give the same ids and tokens
    bare = family.encode(None, prompts, refs[None].expand(2, -1, -1, -1, -1), target_size=(48, 32))
    assert bare.target is None
    for name in ("latent_ids", "reference_ids", "reference_tokens", "encoder_hidden_states"):
        assert torch.equal(bare.conditioning[name], cond[name]), name
    assert kwargs["guidance"] is None and seen["guidance"] is None


def test_encoded_target_is_the_pipelines_latent_space():
    """Decoding the encoded target equals the pipeline's own de-normalise + unpatchify + VAE decode."""
    family = Flux2Family.tiny(seed=4)
    pipe = family.pipe
    g = torch.Generator().manual_seed(0)
    inputs = family.encode(_images(g, 1, 3, 32, 48), ["a"])
    rows, cols = inputs.layout.target_grid.rows, inputs.layout.target_grid.cols
    unpacked = pipe._unpack_latents_with_ids(inputs.target, inputs.conditioning["latent_ids"], rows, cols)
    vae = pipe.vae
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    with torch.no_grad():
        expected = vae.decode(pipe._unpatchify_latents(unpacked * std + mean), return_dict=False)[0]
    assert torch.equal(family.decode(inputs.target, 32, 48), (expected / 2 + 0.5).clamp(0, 1))
    assert not torch.allclose(vae.bn.running_mean, torch.zeros_like(vae.bn.running_mean))  # normalisation exercised


def _naive_reference_ids(sizes):
    rows = []
    for k, (h, w) in enumerate(sizes):
        for i in range(h):
            for j in range(w):
                rows.append([10 * (k + 1), i, j, 0])
    return torch.tensor(rows)


@settings(max_examples=6, deadline=None)
@given(k=st.integers(1, 4), h=st.integers(1, 3), w=st.integers(1, 3))
def test_reference_ids_are_t_offsets_and_row_major_grids(k, h, w):
    family = _TINY_FOR_IDS
    inputs = family.encode(torch.zeros(1, 3, 16, 16), [""], torch.zeros(1, k, 3, 16 * h, 16 * w))
    assert torch.equal(inputs.conditioning["reference_ids"][0], _naive_reference_ids([(h, w)] * k))
    assert inputs.layout.reference_token_counts == (h * w,) * k
    layout = family.sequence_layout(inputs.layout)
    assert layout.ref_index.tolist() == [list(range(1, 1 + k * h * w))]


_TINY_FOR_IDS = Flux2Family.tiny(seed=5, max_sequence_length=4)


def test_batch_grids_match_the_token_grid_of_the_encoding():
    family = Flux2Family.tiny(seed=6)
    world = SyntheticWorld(SyntheticWorldConfig(image_size=64, ref_size=32, max_refs=3))
    samples = [SyntheticDataset(world, length=4)[i] for i in range(2)]
    batch = collate_samples(samples, target_size=64, ref_size=32, vae_scale_factor=family.vae_scale_factor)
    inputs = family.encode_batch(batch)
    assert inputs.layout.target_grid == batch.target_grid
    assert all(grid == batch.ref_grid for grid in inputs.layout.reference_grids)
    assert inputs.layout.target_grid.num_tokens == batch.corr.tgt_tokens
    assert list(inputs.layout.reference_token_counts) == list(batch.corr.ref_tokens)


# -- LoRA -------------------------------------------------------------------------------------------
def test_lora_targets_skip_module_lists_and_cover_both_block_kinds():
    family = Flux2Family.tiny()
    names = flux2_lora_target_modules(family.transformer, FLUX2_LORA_TARGETS)
    assert "transformer_blocks.0.attn.to_out.0" in names
    assert "single_transformer_blocks.1.attn.to_qkv_mlp_proj" in names
    assert "single_transformer_blocks.1.attn.to_out" in names
    assert all(isinstance(family.transformer.get_submodule(n), torch.nn.Linear) for n in names)
    with pytest.raises(ValueError, match="targets"):
        flux2_lora_target_modules(family.transformer, ["no_such_layer"])
    with pytest.raises(ValueError, match="targets"):
        flux2_lora_target_modules(family.transformer, "to_q")


@pytest.mark.parametrize("pipeline_class", [Flux2KleinPipeline, Flux2Pipeline])
def test_lora_round_trip_through_stock_load_lora_weights_is_exact(tmp_path, pipeline_class):
    family = Flux2Family.tiny(seed=7)
    inputs, noisy, sigmas = _inputs(family)
    kwargs = {k: v for k, v in family.model_kwargs(inputs, noisy, sigmas).items() if k in _STOCK_KEYS}
    kwargs["return_dict"] = False
    with torch.no_grad():
        base = family.transformer(**kwargs)[0]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        family.add_lora(rank=4, alpha=8.0, init=False)  # random B: the LoRA changes the output
    with torch.no_grad():
        trained = family.transformer(**kwargs)[0]
    assert not torch.allclose(trained, base, atol=1e-4)
    folder = family.save_lora(tmp_path / "lora").parent

    components = tiny_flux2_components(seed=7)  # a fresh stock pipeline, same base weights
    if pipeline_class is Flux2Pipeline:  # [dev]'s text encoder (Mistral) is not needed to load a LoRA
        components.update(text_encoder=None, tokenizer=None)
    pipe = pipeline_class(**components)
    pipe.load_lora_weights(str(folder))
    with torch.no_grad():
        loaded = pipe.transformer(**kwargs)[0]
        assert torch.equal(loaded, trained)
        pipe.disable_lora()
        assert torch.equal(pipe.transformer(**kwargs)[0], base)


def test_lora_file_loads_with_the_state_dict_api_and_holds_only_lora(tmp_path):
    family = Flux2Family.tiny()
    family.add_lora(rank=2)
    path = family.save_lora(tmp_path)
    state, metadata = Flux2KleinPipeline.lora_state_dict(str(path.parent), return_lora_metadata=True)
    assert state and all(k.startswith("transformer.") and ".lora_" in k for k in state)
    assert metadata["transformer.r"] == 2 and metadata["transformer.lora_alpha"] == 2


def test_save_lora_without_adapter_raises():
    with pytest.raises(ValueError, match="LoRA adapter"):
        Flux2Family.tiny().save_lora("/nonexistent-never-written")


def test_load_lora_resumes_training_state(tmp_path):
    family = Flux2Family.tiny(seed=8)
    family.add_lora(rank=3, alpha=6.0, init=False)
    file = family.save_lora(tmp_path)
    assert not list(tmp_path.glob(".tmp-*"))  # the atomic write leaves no scratch folder
    inputs, noisy, sigmas = _inputs(family, k=1, b=1)
    with torch.no_grad():
        expected = family.forward(inputs, noisy, sigmas)
    fresh = Flux2Family.tiny(seed=8)  # no LoRA yet: the stock loader adds adapter "mosaic"
    fresh.load_lora(file)
    resumed = Flux2Family.tiny(seed=8)  # a LoRA of the same shape: its values are replaced
    with torch.random.fork_rng():
        torch.manual_seed(123)
        resumed.add_lora(rank=3, alpha=6.0, init=False)
    with torch.no_grad():
        assert not torch.equal(resumed.forward(inputs, noisy, sigmas), expected)
        resumed.load_lora(tmp_path)
        for other in (fresh, resumed):
            assert other.transformer.active_adapters() == ["mosaic"]
            assert torch.equal(other.forward(inputs, noisy, sigmas), expected)
    state = family.lora_state_dict()
    state.pop(sorted(state)[0])
    with pytest.raises(ValueError, match="1 missing"):
        resumed.load_lora(state)
    resumed.load_lora(state, partial=True)
    small = Flux2Family.tiny(seed=8)
    small.add_lora(rank=2)
    with pytest.raises(ValueError, match="of another shape"):
        small.load_lora(file)


# -- gradients and training -------------------------------------------------------------------------
def test_gradients_reach_only_the_lora():
    family = Flux2Family.tiny(seed=9)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        family.add_lora(rank=2, init=False)
    params = family.set_trainable("lora")
    inputs, noisy, sigmas = _inputs(family)
    corr = _corr(inputs)
    capture = RefTargetCapture(corr, aggregate="points")
    prediction = family.forward(inputs, noisy, sigmas, capture)
    objective = MosaicObjective(scal_weight=0.4, mdl_weight=0.6, mdl_divergence="jsd")
    flow = torch.nn.functional.mse_loss(prediction.float(), noisy - inputs.target)
    objective.combine(flow, capture.result(), corr).loss.backward()
    ids = {id(p) for p in params}
    for name, param in family.transformer.named_parameters():
        if id(param) in ids:
            assert ".lora_" in name
        else:
            assert param.grad is None, name
    assert all(p.grad is not None for p in params)
    assert sum(int(p.grad.abs().sum() > 0) for p in params) == len(params)
    for module in (family.pipe.vae, family.pipe.text_encoder):
        assert all(p.grad is None and not p.requires_grad for p in module.parameters())
    assert len(family.trainable_parameters("all")) == len(list(family.transformer.parameters()))


def test_trainable_parameters_checks_its_argument():
    family = Flux2Family.tiny()
    with pytest.raises(ValueError, match="trainable"):
        family.set_trainable("some")
    with pytest.raises(ValueError, match="add a LoRA"):
        family.trainable_parameters("lora")


def test_scal_falls_over_a_short_run_on_the_synthetic_world():
    """A rank-8 LoRA trained on SCAL alone for 30 steps: held-out SCAL (fixed noise and sigma) falls
    by more than 15 % and below the uniform attention's log(N_tgt) (measured: 2.79 → 2.08, log 16 = 2.77)."""
    family = Flux2Family.tiny(seed=10, max_sequence_length=16)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        family.add_lora(rank=8)
    params = family.set_trainable("lora")
    world = SyntheticWorld(SyntheticWorldConfig(image_size=64, ref_size=32, min_refs=2, max_refs=2))
    data = SyntheticDataset(world, length=16)

    def batch_of(indices):
        batch = collate_samples([data[i] for i in indices], target_size=64, ref_size=32)
        return batch, family.encode_batch(batch)

    g = torch.Generator().manual_seed(0)
    train = [batch_of([2 * i, 2 * i + 1]) for i in range(6)]
    held_batch, held = batch_of([14, 15])
    held_noise = torch.randn(held.target.shape, generator=g)
    held_sigmas = torch.full((2,), 0.6)

    def held_out_scal() -> float:
        capture = RefTargetCapture(held_batch.corr, aggregate=None)
        with torch.no_grad():
            family.forward(held, family.noise(held.target, held_noise, held_sigmas), held_sigmas, capture)
        return float(scal(capture.result(), held_batch.corr))

    before = held_out_scal()
    optimizer = torch.optim.AdamW(params, lr=3e-2)
    for step in range(30):
        batch, inputs = train[step % len(train)]
        noise = torch.randn(inputs.target.shape, generator=g)
        sigmas = torch.rand(2, generator=g)
        capture = RefTargetCapture(batch.corr, aggregate=None)
        family.forward(inputs, family.noise(inputs.target, noise, sigmas), sigmas, capture)
        loss = scal(capture.result(), batch.corr)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = held_out_scal()
    assert np.isfinite(before) and after < 0.85 * before, (before, after)
    assert after < math.log(held.layout.target_grid.num_tokens), after


# -- input checks -----------------------------------------------------------------------------------
def test_bad_inputs_raise_value_errors_naming_the_argument():
    family = _TINY_FOR_IDS
    with pytest.raises(ValueError, match="pipe"):
        Flux2Family(object())
    with pytest.raises(ValueError, match="capture_blocks"):
        Flux2Family(family.pipe, capture_blocks="some")
    with pytest.raises(ValueError, match="capture"):
        family.model(**family.model_kwargs(family.encode(torch.zeros(1, 3, 16, 16), ["a"]), torch.zeros(1, 1, 16),
                                           torch.zeros(1)), capture=RefTargetCapture(
            Correspondences.from_dicts([[{0: 0}]], ref_tokens=[1], tgt_tokens=1)))
    with pytest.raises(ValueError, match="images"):
        family.encode_images(torch.zeros(1, 3, 20, 16))
    with pytest.raises(ValueError, match="prompts"):
        family.encode(torch.zeros(2, 3, 16, 16), ["one"])
    with pytest.raises(ValueError, match="references"):
        family.encode(torch.zeros(1, 3, 16, 16), ["a"], torch.zeros(2, 1, 3, 16, 16))
    inputs = family.encode(torch.zeros(1, 3, 16, 16), ["a"])
    with pytest.raises(ValueError, match="references"):
        family.sequence_layout(inputs.layout)
    with pytest.raises(ValueError, match="target_size"):
        family.encode(None, ["a"])
    with pytest.raises(ValueError, match="latents"):
        family.decode(torch.zeros(1, 2, 16), 16, 16)
    with pytest.raises(ValueError, match="noisy"):
        family.forward(inputs, torch.zeros(1, 2, 16), torch.zeros(1))
    with pytest.raises(ValueError, match="rank"):
        family.add_lora(rank=0)


def test_the_trainers_lora_files_serve_flux2(tmp_path):
    """The trainer writes FLUX.2's inference LoRA with the family's one writer (`save_lora`, what
    the stock pipeline loads exactly, alpha in its metadata) and resumes from the raw values keyed
    as `lora_parameters` (`load_lora_values`, in place)."""
    from safetensors.torch import load_file

    from mosaic_kit.models import write_lora_file

    family = Flux2Family.tiny(seed=12)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        family.add_lora(rank=4, alpha=2.0, init=False)  # alpha != rank: the scaling matters
    inputs, noisy, sigmas = _inputs(family, k=2, b=1)
    kwargs = {k: v for k, v in family.model_kwargs(inputs, noisy, sigmas).items() if k in _STOCK_KEYS}
    with torch.no_grad():
        expected = family.transformer(**kwargs, return_dict=False)[0]
    family.save_lora(tmp_path)
    pipe = Flux2KleinPipeline(**tiny_flux2_components(seed=12))
    pipe.load_lora_weights(str(tmp_path))
    with torch.no_grad():
        assert torch.equal(pipe.transformer(**kwargs, return_dict=False)[0], expected)

    write_lora_file({k: p.detach() for k, p in family.lora_parameters().items()}, tmp_path / "raw.safetensors")
    resumed = Flux2Family.tiny(seed=12)
    resumed.add_lora(rank=4, alpha=2.0)
    before = resumed.lora_parameters()
    resumed.load_lora_values(load_file(str(tmp_path / "raw.safetensors")))
    assert all(resumed.lora_parameters()[k] is before[k] for k in before)  # in place: the optimiser's tensors
    with torch.no_grad():
        assert torch.equal(resumed.transformer(**kwargs, return_dict=False)[0], expected)


def test_sample_is_the_stock_pipeline_call():
    from PIL import Image as PILImage

    family = Flux2Family.tiny(seed=13, max_sequence_length=16)
    refs = [PILImage.new("RGB", (64, 64), (200, 30, 30)), PILImage.new("RGB", (64, 96), (30, 30, 200))]
    ours = family.sample("a red thing", refs, 32, 48, num_inference_steps=2, generator=torch.Generator().manual_seed(3))
    stock = family.pipe(image=refs, prompt="a red thing", height=32, width=48, num_inference_steps=2,
                        generator=torch.Generator().manual_seed(3), max_sequence_length=16,
                        text_encoder_out_layers=TINY_FLUX2_TEXT_OUT_LAYERS).images[0]
    assert ours.size == (48, 32)
    assert np.array_equal(np.asarray(ours), np.asarray(stock))


def test_pixel_space_family_round_trips_images_and_keeps_the_pipeline_layout():
    family = Flux2Family.tiny(pixel_space=2, max_sequence_length=8)
    g = torch.Generator().manual_seed(0)
    images = _images(g, 2, 3, 64, 32)
    inputs = family.encode(images, ["a", "b"], _images(g, 2, 3, 3, 32, 32))
    assert inputs.target.shape == (2, 16 * 8, 48)  # one token = 4 × 4 pixels, 4·3·2² channels
    assert inputs.layout.reference_token_counts == (64, 64, 64)
    torch.testing.assert_close(family.decode(inputs.target, 64, 32), images, rtol=0, atol=1e-6)
    assert inputs.conditioning["reference_ids"][0, :, 0].unique().tolist() == [10, 20, 30]
