"""The contract suite of the model boundary, parametrised over every registered family
(`mosaic_kit.pipelines.registry`): bad inputs refused the same way (the checks live once, in
`ModelFamily`), encoding equal bit for bit to the stock pipeline's own steps, the training forward
equal to the stock transformer with the LoRA loaded through the stock ``load_lora_weights`` (for
families whose LoRA is a stock one), the LoRA round trip through the family's one writer, and an
exact resume of the trainer. A new family registers itself and adds its stock-encoding oracle
here; every other test runs for it unchanged."""

from __future__ import annotations

import inspect
import json

import pytest
import torch

pytest.importorskip("diffusers")

from mosaic_kit.data import SyntheticWorld, SyntheticWorldConfig, collate_samples  # noqa: E402
from mosaic_kit.pipelines import build_family, family_names, get_family  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (tests/conftest.py)

FAMILIES = family_names()
SEED = 3


def _batch(family, k: int = 2, b: int = 1, seed: int = 0):
    world = SyntheticWorld(SyntheticWorldConfig(image_size=32, ref_size=32, min_refs=k, max_refs=k, seed=seed))
    return collate_samples([world.sample(i) for i in range(b)], 32, 32, vae_scale_factor=family.vae_scale_factor)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return build_family(request.param, seed=SEED)


@pytest.fixture(scope="module")
def encoded(family):
    inputs = family.encode_batch(_batch(family))
    noisy = torch.randn(inputs.target.shape, generator=torch.Generator().manual_seed(1))
    return inputs, noisy


# -- bad inputs, refused the same way by every family -------------------------------------------------
class _Batch:
    def __init__(self, targets, references, captions):
        self.targets, self.references, self.captions = targets, references, captions


def _bad_batches(family):
    good = _batch(family)
    t, r, c = good.targets, good.references, list(good.captions)
    return {
        "a dict": ({"targets": t, "references": r, "captions": c}, r"Expected `batch` with `targets`"),
        "targets above 1": (_Batch(t * 2 + 0.5, r, c), r"`batch.targets` with values in \[0, 1\]"),
        "targets below 0": (_Batch(t - 1, r, c), r"`batch.targets` with values in \[0, 1\]"),
        "references above 1": (_Batch(t, r + 2, c), r"`batch.references` with values in \[0, 1\]"),
        "integer targets": (_Batch((t * 255).to(torch.uint8), r, c), r"`batch.targets` with a floating dtype"),
        "targets not a multiple": (_Batch(t[..., :24, :], r, c), r"`batch.targets` with H and W multiples of 16"),
        "references not a multiple": (_Batch(t, r[..., :24], c), r"`batch.references` with h and w multiples of 16"),
        "two captions for one target": (_Batch(t, r, c * 2), r"`batch.captions` to be 1 strings"),
        "references of another batch": (_Batch(t, r.expand(2, -1, -1, -1, -1), c), r"`batch.references` of shape \(1, K"),
        "references without channels": (_Batch(t, r[:, :, :1], c), r"`batch.references` of shape \(1, K, 3"),
    }


@pytest.mark.parametrize("case", [
    "a dict", "targets above 1", "targets below 0", "references above 1", "integer targets", "targets not a multiple",
    "references not a multiple", "two captions for one target", "references of another batch",
    "references without channels"])
def test_encode_batch_refuses_bad_batches(family, case):
    batch, message = _bad_batches(family)[case]
    with pytest.raises(ValueError, match=message):
        family.encode_batch(batch)


def _bad_forwards(inputs, noisy):
    return {
        "timestep of 500": ((inputs, noisy, torch.tensor([500.0])), r"`timestep` with values in \[0, 1\]"),
        "a (2,) timestep for a batch of one": ((inputs, noisy, torch.tensor([0.5, 0.5])), r"`timestep` of shape \(1,\)"),
        "a scalar timestep": ((inputs, noisy, torch.tensor(0.5)), r"`timestep` of shape \(1,\)"),
        "a NaN timestep": ((inputs, noisy, torch.tensor([float("nan")])), r"`timestep` with values in \[0, 1\]"),
        "an integer timestep": ((inputs, noisy, torch.tensor([0])), r"`timestep` with a floating dtype"),
        "noisy of two samples": ((inputs, noisy.expand(2, -1, -1), torch.tensor([0.5, 0.5])), r"`noisy` of shape \(1, "),
        "noisy of other tokens": ((inputs, noisy[:, :1], torch.tensor([0.5])), r"`noisy` of shape \(1, "),
        "integer noisy": ((inputs, noisy.to(torch.int32), torch.tensor([0.5])), r"`noisy` with a floating dtype"),
        "not ModelInputs": (({}, noisy, torch.tensor([0.5])), r"`inputs` to be ModelInputs"),
    }


@pytest.mark.parametrize("case", ["timestep of 500", "a (2,) timestep for a batch of one", "a scalar timestep",
                                  "a NaN timestep", "an integer timestep", "noisy of two samples",
                                  "noisy of other tokens", "integer noisy", "not ModelInputs"])
def test_forward_refuses_bad_inputs(family, encoded, case):
    args, message = _bad_forwards(*encoded)[case]
    with pytest.raises(ValueError, match=message):
        family.forward(*args)
    with pytest.raises(ValueError, match=message):
        family.model_kwargs(*args)


@pytest.mark.parametrize("guidance", [float("nan"), "3.5", torch.ones(2), True])
def test_forward_refuses_bad_guidance(family, encoded, guidance):
    inputs, noisy = encoded
    with pytest.raises(ValueError, match="guidance"):
        family.forward(inputs, noisy, torch.tensor([0.5]), guidance=guidance)


def test_decode_refuses_bad_sizes_and_latents(family, encoded):
    inputs, _ = encoded
    with pytest.raises(ValueError, match="multiples of 16"):
        family.decode(inputs.target, 24, 32)
    with pytest.raises(ValueError, match=r"`latents` of shape \(B, 4, "):
        family.decode(inputs.target[:, :2], 32, 32)
    assert family.decode(inputs.target, 32, 32).shape == (1, 3, 32, 32)


def test_good_inputs_pass_the_contract(family, encoded):
    inputs, noisy = encoded
    assert inputs.batch_size == 1 and inputs.target.dtype == torch.float32
    with torch.no_grad():
        for t in (0.0, 1.0):  # the ends of [0, 1] are flow-matching times too
            prediction = family.forward(inputs, noisy, torch.tensor([t]), guidance=1.0)
            assert prediction.shape == noisy.shape and torch.isfinite(prediction).all()


# -- encoding: bit for bit the stock pipeline's own steps -----------------------------------------------
def _flux1_stock_encoding(family, batch):
    from diffusers import FluxPipeline

    pipe, vae = family.pipe, family.pipe.vae
    text, pooled, _ = FluxPipeline.encode_prompt(pipe, prompt=list(batch.captions), prompt_2=None,
                                                 max_sequence_length=family.max_sequence_length)

    def latent(image):  # one image per VAE call: an image encodes the same alone or in any batch (cached conditioning)
        grid = vae.encode(image * 2 - 1).latent_dist.mode()
        grid = (grid - vae.config.shift_factor) * vae.config.scaling_factor
        return FluxPipeline._pack_latents(grid, grid.shape[0], grid.shape[1], grid.shape[2], grid.shape[3])

    def latents(images):
        return torch.cat([latent(images[i : i + 1]) for i in range(len(images))])

    b, k = batch.references.shape[:2]
    references = latents(batch.references.flatten(0, 1)).reshape(b, -1, family.token_channels)
    return {"target": latents(batch.targets), "text_embeddings": text, "pooled_embeddings": pooled,
            "reference_tokens": references}


def _flux2_stock_encoding(family, batch):
    pipe = family.pipe

    def latents(images):  # one image per autoencoder call, channels-last, as the pipelines encode references
        pixels = (images * 2 - 1).contiguous(memory_format=torch.channels_last)
        return torch.cat([pipe._encode_vae_image(image=pixels[i : i + 1], generator=None) for i in range(len(pixels))])

    text, _ = pipe.encode_prompt(list(batch.captions), max_sequence_length=family.max_sequence_length,
                                 text_encoder_out_layers=family.text_encoder_out_layers)
    b, k = batch.references.shape[:2]
    per_slot = latents(batch.references.flatten(0, 1)).unflatten(0, (b, k))
    return {"target": pipe._pack_latents(latents(batch.targets)), "encoder_hidden_states": text,
            "reference_tokens": torch.cat([pipe._pack_latents(per_slot[:, j]) for j in range(k)], dim=1)}


def _qwen_edit_plus_stock_encoding(family, batch):
    """The pipeline's steps for one sample at a time (it runs batch size 1): each reference as an
    8-bit PIL image resized by ``calculate_dimensions`` for ``encode_prompt`` ("Picture k"), each
    image through its ``image_processor.preprocess``, ``_encode_vae_image`` and ``_pack_latents``;
    the prompt embeddings padded as ``_get_qwen_prompt_embeds`` pads a list."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as module

    from mosaic_kit.utils.images import tensor_to_pil

    pipe = family.pipe

    def latents(image):  # (3, H, W) -> packed tokens (1, N, C)
        pixels = pipe.image_processor.preprocess(image[None], image.shape[-2], image.shape[-1]).unsqueeze(2)
        grid = pipe._encode_vae_image(image=pixels, generator=None)
        return pipe._pack_latents(grid, 1, grid.shape[1], grid.shape[3], grid.shape[4])

    embeds = []
    for prompt, references in zip(batch.captions, batch.references):
        images = []
        for reference in references:
            width, height = module.calculate_dimensions(family.condition_image_size, reference.shape[-1] / reference.shape[-2])
            images.append(pipe.image_processor.resize(tensor_to_pil(reference), height, width))
        embeds.append(pipe.encode_prompt(prompt, image=images)[0][0])
    length = max(len(e) for e in embeds)
    mask = torch.stack([torch.arange(length) < len(e) for e in embeds]).long()
    k = batch.references.shape[1]
    return {"target": torch.cat([latents(t) for t in batch.targets]),
            "encoder_hidden_states": torch.stack([torch.cat([e, e.new_zeros(length - len(e), e.shape[1])]) for e in embeds]),
            "encoder_hidden_states_mask": None if bool(mask.all()) else mask,
            "reference_tokens": torch.cat([torch.cat([latents(r[j]) for j in range(k)], dim=1) for r in batch.references])}



def _kontext_stock_encoding(family, batch):
    from diffusers import FluxKontextPipeline

    pipe = family.pipe
    text, pooled, _ = FluxKontextPipeline.encode_prompt(pipe, prompt=list(batch.captions), prompt_2=None,
                                                        max_sequence_length=family.max_sequence_length)

    def latent(image):  # prepare_latents: the VAE mode with FLUX's shift and scale, packed 2x2, one image per call
        grid = pipe._encode_vae_image(image=image * 2 - 1, generator=None)
        return pipe._pack_latents(grid, *grid.shape)

    def latents(images):
        return torch.cat([latent(images[i : i + 1]) for i in range(len(images))])

    b, k = batch.references.shape[:2]
    references = latents(batch.references.flatten(0, 1)).reshape(b, -1, family.token_channels)
    return {"target": latents(batch.targets), "encoder_hidden_states": text, "pooled_projections": pooled,
            "reference_tokens": references}


STOCK_ENCODING = {"flux1": _flux1_stock_encoding, "flux2": _flux2_stock_encoding,
                  "qwen_edit_plus": _qwen_edit_plus_stock_encoding, "kontext": _kontext_stock_encoding}
"""Per family: the stock pipeline's own encoding steps, what `encode_batch` must equal bit for bit."""


def test_every_family_has_a_stock_encoding_oracle():
    assert set(FAMILIES) <= set(STOCK_ENCODING), "a new family adds its stock-encoding oracle here"


@pytest.mark.parametrize("k", [1, 3])
def test_encoding_equals_the_stock_pipelines_steps_bit_for_bit(family, k):
    batch = _batch(family, k=k, b=2, seed=k)
    inputs = family.encode_batch(batch)
    with torch.no_grad():
        stock = STOCK_ENCODING[family.name](family, batch)
    assert torch.equal(inputs.target, stock.pop("target").float())
    for key, value in stock.items():
        got = inputs.conditioning[key]
        assert (got is None and value is None) or torch.equal(got, value), key
    assert inputs.layout.reference_token_counts == (4,) * k and inputs.batch_size == 2


# -- the LoRA: the family's one writer, stock loading, round trip -----------------------------------------
def _with_random_lora(family_name):
    family = build_family(family_name, seed=SEED)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        family.add_lora(rank=4, alpha=2.0)
        with torch.no_grad():  # a trained-looking LoRA: every B non-zero
            for key, param in family.lora_parameters().items():
                param.normal_(0, 0.3)
    return family


def test_lora_round_trip_through_the_familys_writer_is_exact(family, tmp_path):
    trained = _with_random_lora(family.name)
    inputs = trained.encode_batch(_batch(trained))
    noisy = torch.randn(inputs.target.shape, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.7])
    with torch.no_grad():
        base = build_family(family.name, seed=SEED).forward(inputs, noisy, t, guidance=1.0)
        expected = trained.forward(inputs, noisy, t, guidance=1.0)
    assert not torch.allclose(expected, base, atol=1e-5)  # the LoRA changes the output
    path = trained.save_lora(tmp_path / "pytorch_lora_weights.safetensors")
    loaded = build_family(family.name, seed=SEED)
    loaded.load_lora(path)
    with torch.no_grad():
        assert torch.equal(loaded.forward(inputs, noisy, t, guidance=1.0), expected)
    assert get_family(family.name).lora_format  # declared in the registry


STOCK_LORA_FAMILIES = [name for name in FAMILIES if get_family(name).stock_lora]


@pytest.mark.parametrize("name", STOCK_LORA_FAMILIES)
def test_training_forward_equals_the_stock_transformer_with_the_lora_from_load_lora_weights(name, tmp_path):
    """For families whose LoRA is a plain adapter (FLUX.1's released multi-branch design has its own
    parity tests): the family's training forward equals the stock transformer of a fresh stock
    pipeline that loaded the family's file with ``load_lora_weights``."""
    trained = _with_random_lora(name)
    inputs = trained.encode_batch(_batch(trained, k=2))
    noisy = torch.randn(inputs.target.shape, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.4])
    with torch.no_grad():
        prediction = trained.forward(inputs, noisy, t)
    folder = trained.save_lora(tmp_path).parent
    stock = build_family(name, seed=SEED).pipe  # a fresh stock pipeline, same base weights
    stock.load_lora_weights(str(folder))
    kwargs = trained.model_kwargs(inputs, noisy, t)
    signature = set(inspect.signature(type(stock.transformer).forward).parameters)
    with torch.no_grad():
        output = stock.transformer(**{k: v for k, v in kwargs.items() if k in signature}, return_dict=False)[0]
    assert torch.equal(prediction, output[:, : noisy.shape[1]])


# -- the trainer: exact resume for every family -----------------------------------------------------------
def _config(name, output_dir, max_steps):
    from mosaic_kit.training import config_from_dict

    return config_from_dict({
        "output_dir": str(output_dir), "seed": 0, "max_steps": max_steps, "checkpoint_every": 2, "keep_checkpoints": 2,
        "log_every": 1, "validate_every": 0, "validation_samples": 0, "tracker": None, "ema_decay": 0.9,
        "cpu_threads": 1, "model": {"family": name, "base": None, "lora_rank": 4, "gradient_checkpointing": False},
        "data": {"kind": "synthetic", "target_size": 32, "ref_size": 64, "batch_size": 1, "synthetic_refs": [1, 2],
                 "synthetic_length": 16},
        "optim": {"lr": 1e-3, "schedule": "constant"},
    })


@pytest.mark.slow  # about 10 s per family on one CPU thread
@pytest.mark.parametrize("name", FAMILIES)
def test_resume_is_exact(name, tmp_path):
    from safetensors.torch import load_file

    from mosaic_kit.training import MosaicTrainer

    whole = MosaicTrainer(_config(name, tmp_path / "whole", 4))
    whole.train()
    half = MosaicTrainer(_config(name, tmp_path / "half", 2))
    half.train()
    resumed = MosaicTrainer(_config(name, tmp_path / "half", 4))
    resumed.resume = "latest"
    resumed.train()
    lines = [(tmp_path / run / "metrics.jsonl").read_text().splitlines() for run in ("whole", "half")]
    assert [json.loads(x) for x in lines[0]] == [json.loads(x) for x in lines[1]] and len(lines[0]) == 4
    for file in ("pytorch_lora_weights.safetensors", "ema_lora_weights.safetensors"):
        a, b = (load_file(str(tmp_path / run / file)) for run in ("whole", "half"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), file
