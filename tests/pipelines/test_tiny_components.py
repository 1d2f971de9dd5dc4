"""mosaic_kit.pipelines.tiny: a tiny random FLUX.1 pipeline built in code."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from diffusers import FluxPipeline  # noqa: E402
from PIL import Image  # noqa: E402

from mosaic_kit.pipelines import tiny_flux_components  # noqa: E402
from mosaic_kit.pipelines.tiny import (  # noqa: E402
    TINY_TRANSFORMER_CONFIG,
    tiny_clip_tokenizer,
    tiny_t5_tokenizer,
)

FLUX_KEYS = {"scheduler", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "transformer"}


@pytest.fixture(scope="module")
def components():
    return tiny_flux_components(seed=0)


def test_keys_match_flux_pipeline_init(components):
    import inspect

    params = inspect.signature(FluxPipeline.__init__).parameters
    required = {name for name, p in params.items() if name != "self" and p.default is inspect.Parameter.empty}
    assert set(components) == FLUX_KEYS == required


def test_flux_pipeline_runs_and_returns_image(components):
    pipe = FluxPipeline(**components)
    assert pipe.vae_scale_factor == 8
    output = pipe(
        prompt="a dog",
        height=32,
        width=48,
        num_inference_steps=2,
        output_type="pil",
        generator=torch.Generator().manual_seed(0),
    )
    assert len(output.images) == 1
    image = output.images[0]
    assert isinstance(image, Image.Image)
    assert image.size == (48, 32)


def test_smallest_image_and_short_t5_sequence(components):
    pipe = FluxPipeline(**components)
    output = pipe(
        prompt=["a cat", "a photo of a red backpack on a wooden table"],
        height=16,
        width=16,
        num_inference_steps=1,
        max_sequence_length=32,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    )
    assert output.images.shape == (2, 16, 16, 3)


def test_encode_prompt_shapes(components):
    pipe = FluxPipeline(**components)
    prompt_embeds, pooled, text_ids = pipe.encode_prompt(
        prompt="a dog", prompt_2=None, max_sequence_length=512
    )
    assert prompt_embeds.shape == (1, 512, TINY_TRANSFORMER_CONFIG["joint_attention_dim"])
    assert pooled.shape == (1, TINY_TRANSFORMER_CONFIG["pooled_projection_dim"])
    assert text_ids.shape == (512, 3)
    assert torch.isfinite(prompt_embeds).all() and torch.isfinite(pooled).all()


def test_same_seed_same_components_and_rng_untouched():
    state = torch.random.get_rng_state()
    first = tiny_flux_components(seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    second = tiny_flux_components(seed=3)
    other = tiny_flux_components(seed=4)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        a, b, c = (parts[name].state_dict() for parts in (first, second, other))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[key], b[key]) for key in a), name
        assert not all(torch.equal(a[key], c[key]) for key in a), name
    prompt = "A photo of sks dog, 3 times! Ünïcode ok?"
    for name in ("tokenizer", "tokenizer_2"):
        assert first[name](prompt).input_ids == second[name](prompt).input_ids


def test_clip_tokenizer_padding_as_encode_prompt_needs():
    tokenizer = tiny_clip_tokenizer()
    assert tokenizer.model_max_length == 77
    long_prompt = "a very long prompt " * 20
    batch = tokenizer(
        ["a dog", long_prompt],
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_overflowing_tokens=False,
        return_length=False,
        return_tensors="pt",
    )
    assert batch.input_ids.shape == (2, 77)
    ids = batch.input_ids[0].tolist()
    assert ids[0] == tokenizer.bos_token_id
    assert ids[-1] == tokenizer.pad_token_id == tokenizer.eos_token_id
    # every byte is in the vocabulary: nothing is unknown, decoding gives the (lowercased) text back
    assert tokenizer.batch_decode(tokenizer(["Ünïcode, ok?"]).input_ids, skip_special_tokens=True) == ["ünïcode , ok ?"]
    assert batch.input_ids[1, -1] == tokenizer.eos_token_id  # truncated sequences still end with eos
    assert tokenizer.eos_token_id == len(tokenizer) - 1  # CLIP pools at the highest id / first eos


def test_t5_tokenizer_padding_as_encode_prompt_needs():
    tokenizer = tiny_t5_tokenizer()
    assert tokenizer.model_max_length == 512
    assert (tokenizer.pad_token, tokenizer.eos_token, tokenizer.unk_token) == ("<pad>", "</s>", "<unk>")
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    batch = tokenizer(["a dog", "x" * 600], padding="max_length", max_length=512, truncation=True, return_tensors="pt")
    assert batch.input_ids.shape == (2, 512)
    ids = batch.input_ids[0].tolist()
    assert ids[:5] == tokenizer("a dog").input_ids and ids[4] == 1 and set(ids[5:]) == {0}
    assert batch.input_ids[1, -1] == tokenizer.eos_token_id
    assert tokenizer("naïve").input_ids.count(tokenizer.unk_token_id) == 1
    longest = tokenizer(["a", "a dog"], padding="longest", return_tensors="pt").input_ids
    assert longest.shape == (2, 5)


@pytest.mark.parametrize("bad", [-1, 1.5, "0", True])
def test_bad_seed_raises(bad):
    with pytest.raises(ValueError, match="seed"):
        tiny_flux_components(seed=bad)


def test_bad_max_length_raises():
    with pytest.raises(ValueError, match="model_max_length"):
        tiny_clip_tokenizer(model_max_length=1)
    with pytest.raises(ValueError, match="model_max_length"):
        tiny_t5_tokenizer(model_max_length="512")
