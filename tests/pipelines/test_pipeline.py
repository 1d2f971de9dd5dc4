"""MosaicFluxPipeline on the tiny random pipeline: K = 1…6, options, and every bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")

from mosaic_kit.models import reference_lora_state_dict, save_reference_lora  # noqa: E402
from mosaic_kit.pipelines import MosaicFluxPipeline, fit_on_white, tiny_mosaic_pipeline  # noqa: E402

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "cyan"]
FAST = {"height": 32, "width": 32, "ref_size": 32, "num_inference_steps": 2, "max_sequence_length": 8,
        "progress": False}


@pytest.fixture(scope="module")
def pipe():
    return tiny_mosaic_pipeline()


def refs(k):
    return [Image.new("RGB", (24 + 4 * i, 32), COLOURS[i % len(COLOURS)]) for i in range(k)]


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 6])
def test_generates_with_k_references(pipe, k):
    out = pipe("a photo", refs(k), generator=torch.Generator().manual_seed(0), **FAST)
    assert len(out.images) == 1 and out.images[0].size == (32, 32)
    assert len(out.references) == k and all(r.size == (32, 32) for r in out.references)


def test_same_seed_same_image_and_references_matter(pipe):
    a = np.asarray(pipe("a photo", refs(2), generator=torch.Generator().manual_seed(1), **FAST).images[0])
    b = np.asarray(pipe("a photo", refs(2), generator=torch.Generator().manual_seed(1), **FAST).images[0])
    assert np.array_equal(a, b)
    out = pipe("a photo", refs(2), generator=torch.Generator().manual_seed(1), output_type="pt", **FAST).images
    other = pipe("a photo", refs(3)[1:], generator=torch.Generator().manual_seed(1), output_type="pt", **FAST).images
    assert not torch.equal(out, other)


def test_reference_cache_mode_and_output_types(pipe):
    out = pipe("a photo", refs(3), generator=torch.Generator().manual_seed(0), use_reference_cache=True,
               output_type="np", num_images_per_prompt=2, **FAST)
    assert out.images.shape == (2, 32, 32, 3)
    latent = pipe("a photo", refs(1), generator=torch.Generator().manual_seed(0), output_type="latent", **FAST)
    assert latent.images.shape == (1, 4, 16)


def test_inputs_of_every_kind(pipe, tmp_path):
    path = tmp_path / "ref.png"
    Image.new("RGBA", (20, 30), (255, 0, 0, 128)).save(path)
    array = np.zeros((16, 16, 3), dtype=np.uint8)
    tensor = torch.rand(3, 20, 10)
    out = pipe("a photo", [path, str(path), array, tensor, Image.new("L", (8, 8))], **FAST)
    assert len(out.references) == 5


def test_load_mosaic_weights_changes_the_output(pipe, tmp_path):
    source = tiny_mosaic_pipeline(seed=0)
    with torch.no_grad():
        for name, param in source.transformer.named_parameters():
            if ".lora_" in name:
                param.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(name)))
    save_reference_lora(source.transformer, tmp_path / "pytorch_lora_weights.safetensors")
    fresh = tiny_mosaic_pipeline(seed=0)
    before = fresh("a photo", refs(2), generator=torch.Generator().manual_seed(0), output_type="pt", **FAST).images
    fresh.load_mosaic_weights(tmp_path)  # a folder works too
    loaded = reference_lora_state_dict(fresh.transformer)
    expected = reference_lora_state_dict(source.transformer)
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    after = fresh("a photo", refs(2), generator=torch.Generator().manual_seed(0), output_type="pt", **FAST).images
    assert not torch.equal(before, after)


def test_fit_on_white_keeps_aspect_and_centres():
    out = fit_on_white(Image.new("RGB", (100, 50), "black"), 100)
    pixels = np.asarray(out)
    dark = np.argwhere(pixels.sum(-1) == 0)
    assert (dark[:, 1].min(), dark[:, 1].max()) == (5, 94)  # 90 px wide, centred
    assert (dark[:, 0].min(), dark[:, 0].max()) == (27, 71)  # 45 px tall, centred


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"reference_images": []}, "between 1 and max_references"),
        ({"reference_images": refs(9)}, "between 1 and max_references"),
        ({"reference_images": Image.new("RGB", (8, 8))}, "list of images"),
        ({"height": 40}, "height"),
        ({"width": 0}, "width"),
        ({"ref_size": 24}, "ref_size"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"guidance_scale": float("nan")}, "guidance_scale"),
        ({"prompt": None}, "prompt"),
        ({"reference_images": ["/nonexistent/ref.png"]}, r"reference_images\[0\].*does not exist"),
        ({"reference_images": [np.zeros((4, 4), dtype=np.uint8)]}, r"reference_images\[0\]"),
        ({"reference_images": [torch.full((3, 4, 4), 2.0)]}, r"\[0, 1\]"),
        ({"reference_images": [42]}, "PIL image, a path"),
    ],
)
def test_bad_inputs_raise(pipe, kwargs, match):
    call = {"prompt": "a photo", "reference_images": refs(1), **FAST}
    call.update(kwargs)
    with pytest.raises(ValueError, match=match):
        pipe(**call)


def test_unreadable_reference_file_raises(pipe, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"reference_images\[1\].*failed"):
        pipe("a photo", [refs(1)[0], bad], **FAST)


def test_builds_from_components_and_max_references_is_configurable():
    pipe = tiny_mosaic_pipeline()
    again = MosaicFluxPipeline(**pipe.components)
    again.max_references = 2
    with pytest.raises(ValueError, match="max_references = 2"):
        again("a photo", refs(3), **FAST)
    assert "mosaic" in again.transformer.peft_config


def test_from_pretrained_local_folder_then_mosaic_weights(tmp_path):
    from diffusers import FluxPipeline

    from mosaic_kit.pipelines import tiny_flux_components

    FluxPipeline(**tiny_flux_components(seed=3)).save_pretrained(tmp_path / "base")
    source = tiny_mosaic_pipeline(seed=3)
    with torch.no_grad():
        for name, param in source.transformer.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    lora = save_reference_lora(source.transformer, tmp_path / "mosaic.safetensors")

    pipe = MosaicFluxPipeline.from_pretrained(tmp_path / "base")
    assert isinstance(pipe, MosaicFluxPipeline)
    pipe.load_mosaic_weights(lora)
    pipe.set_progress_bar_config(disable=True)
    got = pipe("a photo", refs(2), generator=torch.Generator().manual_seed(0), output_type="pt", **FAST).images
    expected = source("a photo", refs(2), generator=torch.Generator().manual_seed(0), output_type="pt", **FAST).images
    torch.testing.assert_close(got, expected)


def test_timesteps_match_flux_pipeline_in_bf16():
    from diffusers import FluxPipeline

    from mosaic_kit.pipelines import tiny_flux_components

    seen = {"stock": [], "mosaic": []}
    stock = FluxPipeline(**tiny_flux_components()).to(torch.bfloat16)
    stock.set_progress_bar_config(disable=True)
    stock.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen["stock"].append(kwargs["timestep"].clone()), with_kwargs=True)
    stock("a photo", height=64, width=64, num_inference_steps=6, max_sequence_length=8,
          generator=torch.Generator().manual_seed(0), output_type="latent")
    pipe = tiny_mosaic_pipeline().to(torch.bfloat16)
    pipe.mosaic_transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen["mosaic"].append(kwargs["timestep"].clone()), with_kwargs=True)
    pipe("a photo", refs(1), **{**FAST, "height": 64, "width": 64, "num_inference_steps": 6}, output_type="latent",
         generator=torch.Generator().manual_seed(0))
    assert len(seen["stock"]) == len(seen["mosaic"]) == 6
    for a, b in zip(seen["stock"], seen["mosaic"]):
        assert torch.equal(a, b)
