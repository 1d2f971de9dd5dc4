"""Hardening of the FLUX model, the LoRA files and the pipeline (issue 11, models part).

- other peft adapters (a user's style LoRA) act as in stock diffusers on text and target tokens
  and on every token of the reference stream; only the reference adapter is routed;
- `load_reference_lora` refuses partial, damaged and non-finite files and names the file;
- the forward and the pipeline refuse bad arguments with a ValueError naming the argument.
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from flux_naive import naive_forward  # noqa: E402
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from peft import LoraConfig  # noqa: E402

from mosaic_kit.models import (  # noqa: E402
    LORA_DIGEST_KEY,
    MosaicFluxTransformer,
    add_reference_lora,
    load_reference_lora,
    lora_state_digest,
    read_lora_file,
    reference_lora_state_dict,
    save_reference_lora,
    set_reference_lora_scale,
    write_lora_file,
)
from mosaic_kit.models.testing import random_packed_inputs, tiny_flux_transformer  # noqa: E402

# every linear layer of the FLUX transformer, by peft suffix: a style LoRA that touches everything
STYLE_TARGETS = ["x_embedder", "context_embedder", "linear_1", "linear_2", "linear", "to_q", "to_k", "to_v",
                 "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out", "proj", "net.2", "proj_mlp",
                 "proj_out"]


def randomise(transformer, adapter, seed, std=0.05):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if ".lora_" in name and f".{adapter}." in name:
                param.copy_(torch.randn(param.shape, generator=gen, dtype=param.dtype) * std)


def add_style(transformer, seed=5, rank=3, alpha=6):
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=STYLE_TARGETS), adapter_name="style")
    randomise(transformer, "style", seed)
    return transformer


def stock(transformer, inputs):
    return transformer(
        hidden_states=inputs["target_tokens"], encoder_hidden_states=inputs["text_embeddings"],
        pooled_projections=inputs["pooled_embeddings"], timestep=inputs["timestep"], img_ids=inputs["target_ids"],
        txt_ids=inputs["text_ids"], guidance=inputs["guidance"], return_dict=False,
    )[0]


def style_and_reference(dtype=torch.float64):
    """(transformer with the style LoRA only, a copy with the style and a random reference LoRA)."""
    styled = add_style(tiny_flux_transformer()).to(dtype)
    both = copy.deepcopy(styled)
    add_reference_lora(both, rank=4)
    randomise(both, "mosaic", seed=1)
    return styled, both


# -- other adapters ------------------------------------------------------------------------------------
def test_style_lora_with_zero_references_equals_stock_diffusers():
    styled, both = style_and_reference()
    assert both.active_adapters() == ["style", "mosaic"]  # adding the reference LoRA kept the style on
    inputs = random_packed_inputs(styled, batch=2, target_size=(32, 48), dtype=torch.float64)
    with torch.no_grad():
        expected = stock(styled, inputs)
        got = MosaicFluxTransformer(both)(**inputs)
        plain = stock(tiny_flux_transformer().to(torch.float64), inputs)
    assert (expected - plain).abs().max() > 1e-3  # the style LoRA matters
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_style_lora_acts_on_reference_tokens_too():
    """Decided behaviour: other adapters act on every token, references included (as stock: the
    reference tokens go through the same layers); the naive twin merges the style into every
    stream's weights and the reference LoRA into the references' only."""
    _, both = style_and_reference()
    model = MosaicFluxTransformer(both)
    inputs = random_packed_inputs(both, batch=2, reference_sizes=[(32, 32), (16, 32)], dtype=torch.float64)
    got = model(**inputs)
    torch.testing.assert_close(got, naive_forward(both, inputs), rtol=1e-9, atol=1e-9)
    # with the style switched off on the reference stream only, the result would differ
    both.set_adapters(["mosaic"])
    assert not torch.allclose(model(**inputs), got)


def test_style_lora_loaded_after_the_reference_lora_acts_everywhere(tmp_path):
    styled, both = style_and_reference()
    path = save_reference_lora(both, tmp_path / "mosaic.safetensors")
    # the reference LoRA first, then the style through diffusers' loader (as `load_lora_weights` does)
    target = tiny_flux_transformer().to(torch.float64)
    load_reference_lora(target, path)
    style_state = {f"transformer.{k}": v for k, v in
                   __import__("peft").get_peft_model_state_dict(styled, adapter_name="style").items()}
    target.load_lora_adapter(style_state, prefix="transformer", adapter_name="style")
    target.set_adapters(["mosaic", "style"], weights=[1.0, 2.0])  # alpha / rank of the style is 2
    inputs = random_packed_inputs(target, batch=1, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(MosaicFluxTransformer(target)(**inputs), stock(styled, inputs),
                                   rtol=1e-12, atol=1e-12)


def test_loading_the_reference_lora_keeps_the_style_active_and_scaled(tmp_path):
    styled, both = style_and_reference()
    path = save_reference_lora(both, tmp_path / "mosaic.safetensors")
    target = copy.deepcopy(styled)
    target.set_adapters(["style"], weights=[0.5])
    expected_scale = target.transformer_blocks[0].attn.to_q.scaling["style"]
    load_reference_lora(target, path)
    assert target.active_adapters() == ["style", "mosaic"]
    assert target.transformer_blocks[0].attn.to_q.scaling["style"] == expected_scale == 1.0
    set_reference_lora_scale(target, 0.25)
    assert target.active_adapters() == ["style", "mosaic"]
    assert target.transformer_blocks[0].attn.to_q.scaling["style"] == expected_scale
    assert target.transformer_blocks[0].attn.to_q.scaling["mosaic"] == 0.25


def test_reference_scale_zero_leaves_the_style_on_every_token():
    styled, both = style_and_reference()
    set_reference_lora_scale(both, 0.0)
    inputs = random_packed_inputs(both, batch=1, reference_sizes=[(32, 32)], dtype=torch.float64)
    # the naive twin of the transformer without any reference LoRA, style included
    torch.testing.assert_close(MosaicFluxTransformer(both)(**inputs), naive_forward(styled, inputs),
                               rtol=1e-9, atol=1e-9)


def test_disabled_adapters_give_the_base_model():
    _, both = style_and_reference()
    both.disable_adapters()
    inputs = random_packed_inputs(both, batch=1, dtype=torch.float64)
    expected = stock(tiny_flux_transformer().to(torch.float64), inputs)
    torch.testing.assert_close(MosaicFluxTransformer(both)(**inputs), expected, rtol=1e-12, atol=1e-12)


def test_merged_reference_adapter_is_refused():
    _, both = style_and_reference()
    both.fuse_lora(adapter_names=["mosaic"])
    inputs = random_packed_inputs(both, batch=1, reference_sizes=[(32, 32)], dtype=torch.float64)
    with pytest.raises(ValueError, match="unmerged"):
        MosaicFluxTransformer(both)(**inputs)


def test_gradients_of_the_reference_lora_with_a_style_active():
    _, both = style_and_reference()
    model = MosaicFluxTransformer(both)
    inputs = random_packed_inputs(both, batch=1, reference_sizes=[(32, 32)], dtype=torch.float64)
    model(**inputs).square().mean().backward()
    trainable = {n for n, p in both.named_parameters() if p.requires_grad}
    assert trainable and all(".mosaic." in n for n in trainable)
    grads = {n: p.grad for n, p in both.named_parameters() if p.grad is not None}
    # in the last block only the references' keys and values reach the target
    last = f"single_transformer_blocks.{len(both.single_transformer_blocks) - 1}."
    unused = tuple(last + m for m in ("attn.to_q.", "proj_mlp.", "proj_out."))
    assert set(grads) == {n for n in trainable if not any(u in n for u in unused)}
    assert all(g.abs().sum() > 0 for g in grads.values())


# -- LoRA files ----------------------------------------------------------------------------------------
def saved_lora(tmp_path, name="lora.safetensors", **overrides):
    transformer = tiny_flux_transformer(**overrides)
    add_reference_lora(transformer, rank=2)
    randomise(transformer, "mosaic", seed=2)
    return transformer, save_reference_lora(transformer, tmp_path / name)


def test_lora_of_a_smaller_model_is_refused_and_lists_what_is_missing(tmp_path):
    source, path = saved_lora(tmp_path, num_layers=1, num_single_layers=1)
    target = tiny_flux_transformer()
    with pytest.raises(ValueError) as error:
        load_reference_lora(target, path)
    message = str(error.value)
    assert str(path) in message and "covers 13 of 25" in message and "missing 12" in message
    assert "'transformer_blocks.1.norm1.linear'" in message and "partial=True" in message
    assert not getattr(target, "peft_config", {})  # nothing was loaded
    load_reference_lora(target, path, partial=True)  # explicit partial loading works
    loaded, expected = reference_lora_state_dict(target), reference_lora_state_dict(source)
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_lora_of_a_larger_model_is_refused_and_lists_what_is_unexpected(tmp_path):
    _, path = saved_lora(tmp_path, num_layers=3)
    for partial in (False, True):
        with pytest.raises(ValueError, match=r"naming no linear module.*transformer_blocks\.2\.") as error:
            load_reference_lora(tiny_flux_transformer(), path, partial=partial)
        assert str(path) in str(error.value)


def test_files_the_project_writes_carry_a_digest(tmp_path):
    from safetensors import safe_open

    source, path = saved_lora(tmp_path)
    with safe_open(str(path), framework="pt") as handle:
        recorded = handle.metadata()[LORA_DIGEST_KEY]
    assert recorded == lora_state_digest(read_lora_file(path))
    assert recorded == lora_state_digest(reference_lora_state_dict(source, scaled=True))


def data_start(path):
    raw = path.read_bytes()
    return 8 + int.from_bytes(raw[:8], "little"), raw


@given(offset=st.integers(0, 10**6), mask=st.integers(1, 255))
def test_any_flipped_byte_is_refused_or_harmless(tmp_path_factory, offset, mask):
    """Flip one byte anywhere in the file: the load raises a ValueError naming the file, or (a
    byte the tensors do not depend on, such as header padding) gives bit-identical tensors."""
    folder = tmp_path_factory.mktemp("flip")
    path = write_lora_file(FLIP_STATE, folder / "lora.safetensors")
    raw = bytearray(path.read_bytes())
    raw[offset % len(raw)] ^= mask
    path.write_bytes(bytes(raw))
    try:
        state = read_lora_file(path)
    except ValueError as error:
        assert str(path) in str(error)
    else:
        assert state.keys() == FLIP_STATE.keys() and all(torch.equal(state[k], FLIP_STATE[k]) for k in state)


FLIP_STATE = {"transformer.x_embedder.lora_A.weight": torch.randn(2, 64, generator=torch.Generator().manual_seed(0)),
              "transformer.x_embedder.lora_B.weight": torch.randn(32, 2, generator=torch.Generator().manual_seed(1))}


def test_flipped_tensor_bytes_are_refused_with_the_file_named(tmp_path):
    _, path = saved_lora(tmp_path)
    start, raw = data_start(path)
    damaged = bytearray(raw)
    damaged[start + 5] ^= 0x10
    path.write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match="is damaged") as error:
        load_reference_lora(tiny_flux_transformer(), path)
    assert str(path) in str(error.value)


def test_files_without_a_digest_load_as_before(tmp_path):
    from diffusers import FluxPipeline
    from safetensors.torch import save_file

    source, _ = saved_lora(tmp_path)
    state = reference_lora_state_dict(source, scaled=True)
    save_file(state, str(tmp_path / "released.safetensors"))  # like the released checkpoint: no metadata
    unprefixed = {k.removeprefix("transformer."): v for k, v in state.items()}  # diffusers adds the prefix
    FluxPipeline.save_lora_weights(tmp_path / "diffusers", transformer_lora_layers=unprefixed)
    for path in (tmp_path / "released.safetensors", tmp_path / "diffusers" / "pytorch_lora_weights.safetensors"):
        target = tiny_flux_transformer()
        load_reference_lora(target, path)
        loaded = reference_lora_state_dict(target)
        assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_lora_weights_are_refused(tmp_path, bad):
    from safetensors.torch import save_file

    source, _ = saved_lora(tmp_path)
    state = reference_lora_state_dict(source, scaled=True)
    key = "transformer.single_transformer_blocks.1.proj_mlp.lora_B.weight"
    state[key] = state[key].clone()
    state[key][3, 1] = bad
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(ValueError, match="finite") as error:
        load_reference_lora(tiny_flux_transformer(), path)
    assert str(path) in str(error.value) and key in str(error.value)
    with pytest.raises(ValueError, match="LoRA state dict.*finite"):
        load_reference_lora(tiny_flux_transformer(), state)


def test_integer_lora_tensors_are_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "int.safetensors"
    save_file({"transformer.x_embedder.lora_A.weight": torch.zeros(2, 64, dtype=torch.int32),
               "transformer.x_embedder.lora_B.weight": torch.zeros(32, 2, dtype=torch.int32)}, str(path))
    with pytest.raises(ValueError, match="floating-point") as error:
        load_reference_lora(tiny_flux_transformer(), path, partial=True)
    assert str(path) in str(error.value)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "wrong shape", "half pair", "bad key", "off route"])
def test_every_lora_load_error_names_the_file(tmp_path, damage):
    from safetensors.torch import save_file

    source, path = saved_lora(tmp_path)
    state = reference_lora_state_dict(source, scaled=True)
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:-100])
    elif damage == "garbage":
        path.write_bytes(b"\x00" * 64)
    else:
        if damage == "wrong shape":
            state["transformer.x_embedder.lora_A.weight"] = torch.zeros(2, 7)
        elif damage == "half pair":
            del state["transformer.x_embedder.lora_B.weight"]
        elif damage == "bad key":
            state["unet.down.lora_A.weight"] = torch.zeros(2, 2)
        else:
            state["transformer.context_embedder.lora_A.weight"] = torch.zeros(2, 32)
            state["transformer.context_embedder.lora_B.weight"] = torch.zeros(32, 2)
        save_file(state, str(path))
    with pytest.raises(ValueError) as error:
        load_reference_lora(tiny_flux_transformer(), path)
    assert str(path) in str(error.value)


# -- forward arguments ---------------------------------------------------------------------------------
MODEL = MosaicFluxTransformer(tiny_flux_transformer())
INPUTS = random_packed_inputs(MODEL.transformer, batch=2, reference_sizes=[(32, 32)])


def call(**change):
    with torch.no_grad():
        return MODEL(**{**INPUTS, **change})


class RefTargetCaptureLike:
    def add(self, query, key):
        pass


@given(width=st.integers(1, 80).filter(lambda w: w != 32), which=st.sampled_from(["text", "pooled"]))
def test_wrong_embedding_widths_name_the_argument(width, which):
    if which == "text":
        name, change = "text_embeddings", {"text_embeddings": torch.randn(2, 5, width)}
    else:
        name, change = "pooled_embeddings", {"pooled_embeddings": torch.randn(2, width)}
    with pytest.raises(ValueError, match=rf"`{name}` of shape .*32.*but got"):
        call(**change)


@given(shape=st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple).filter(lambda s: s != (2,)),
       which=st.sampled_from(["timestep", "guidance", "text_embeddings", "pooled_embeddings"]))
def test_batch_shapes_of_the_conditioning_name_the_argument(shape, which):
    """timestep and guidance must be (B,), text (B, N, D), pooled (B, D): any other batch shape raises."""
    trailing = {"timestep": (), "guidance": (), "text_embeddings": (5, 32), "pooled_embeddings": (32,)}[which]
    value = torch.rand(shape + trailing)
    with pytest.raises(ValueError, match=rf"`{which}` of shape"):
        call(**{which: value})


@given(values=st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), min_size=2, max_size=2))
def test_timestep_outside_zero_one_is_refused_inside_accepted(values):
    timestep = torch.tensor(values)
    inside = all(0 <= v <= 1 for v in values)  # NaN compares False
    if inside:
        assert torch.isfinite(call(timestep=timestep)).all()
    else:
        with pytest.raises(ValueError, match=r"`timestep` in \[0, 1\]"):
            call(timestep=timestep)


def test_timestep_of_zero_to_thousand_is_refused():
    with pytest.raises(ValueError, match=r"do not pass 0-1000.*\[500, 999\]"):
        call(timestep=torch.tensor([500.0, 999.0]))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["reference_tokens", "target_tokens", "text_embeddings", "pooled_embeddings"])
def test_inputs_in_another_dtype_than_the_model_are_refused(name, dtype):
    with pytest.raises(ValueError, match=rf"`{name}` in the model's dtype torch.float32.*{dtype}"):
        call(**{name: INPUTS[name].to(dtype)})


def test_autocast_accepts_inputs_of_another_dtype():
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = call(reference_tokens=INPUTS["reference_tokens"].bfloat16())
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("name", ["target_tokens", "text_embeddings", "pooled_embeddings", "reference_tokens",
                                  "target_ids", "text_ids", "reference_ids", "guidance"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_inputs_are_refused_behind_the_switch(name, bad):
    from mosaic_kit import finite_checks

    value = INPUTS[name].clone()
    value.view(-1)[1] = bad
    with pytest.raises(ValueError, match=rf"`{name}` to hold only finite values"):
        call(**{name: value})
    if name != "guidance":  # guidance is checked with the timestep, in the forward's one sync
        with finite_checks(False):
            call(**{name: value})  # switch off: no check, no sync (hot path)


def test_guidance_for_a_model_without_guidance_embedding_is_refused():
    model = MosaicFluxTransformer(tiny_flux_transformer(guidance_embeds=False))
    inputs = random_packed_inputs(model.transformer, batch=1)
    with pytest.raises(ValueError, match="guidance=None"):
        model(**{**inputs, "guidance": torch.ones(1)})


@pytest.mark.parametrize(
    "change,match",
    [
        ({"reference_guidance": float("nan")}, "finite `reference_guidance`"),
        ({"reference_guidance": torch.ones(3)}, "reference_guidance"),
        ({"reference_guidance": "1"}, "reference_guidance"),
        ({"reference_guidance": torch.tensor(float("inf"))}, "reference_guidance"),
        ({"reference_token_counts": (True, 3)}, "reference_token_counts"),
        ({"reference_token_counts": 4}, "reference_token_counts"),
        ({"target_tokens": torch.randn(2, 0, 64), "target_ids": torch.zeros(0, 3)}, "target_tokens"),
        ({"target_tokens": torch.zeros(2, 4, 64, dtype=torch.long)}, "floating-point"),
        ({"timestep": 0.5}, "timestep"),
        ({"text_embeddings": [[0.0] * 32]}, "text_embeddings"),
        ({"capture": 5}, "capture"),
        ({"capture": [RefTargetCaptureLike(), "x"]}, "item 1"),
    ],
)
def test_other_bad_forward_arguments_name_themselves(change, match):
    with pytest.raises(ValueError, match=match):
        call(**change)


def test_a_reference_cache_of_the_wrong_type_is_refused():
    main = {k: v for k, v in INPUTS.items() if not k.startswith("reference_")}
    with pytest.raises(ValueError, match="ReferenceKVCache"):
        MODEL(**main, reference_cache={})
    with pytest.raises(ValueError, match="pooled_embeddings"):
        MODEL.build_reference_cache(INPUTS["reference_tokens"], INPUTS["reference_ids"], torch.randn(2, 7),
                                    guidance=INPUTS["guidance"])


# -- pipeline arguments --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pipe():
    from mosaic_kit.pipelines import tiny_mosaic_pipeline

    return tiny_mosaic_pipeline()


FAST = {"height": 32, "width": 32, "ref_size": 32, "num_inference_steps": 1, "max_sequence_length": 8,
        "progress": False}


def red():
    from PIL import Image

    return [Image.new("RGB", (32, 32), "red")]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"num_images_per_prompt": 0}, "num_images_per_prompt"),
        ({"num_images_per_prompt": -1}, "num_images_per_prompt"),
        ({"num_images_per_prompt": 1.5}, "num_images_per_prompt"),
        ({"num_images_per_prompt": True}, "num_images_per_prompt"),
        ({"output_type": "jpg"}, r"output_type.*'pil', 'np', 'pt', 'latent'"),
        ({"output_type": None}, "output_type"),
        ({"max_sequence_length": 0}, "max_sequence_length"),
        ({"max_sequence_length": 1000}, "max_sequence_length"),
        ({"reference_guidance": float("nan")}, "reference_guidance"),
        ({"guidance_scale": True}, "guidance_scale"),
        ({"use_reference_cache": "yes"}, "use_reference_cache"),
        ({"latents": torch.randn(1, 5, 16)}, r"latents.*\(1, 4, 16\)"),
        ({"latents": torch.full((1, 4, 16), float("nan"))}, "latents"),
        ({"latents": torch.zeros(1, 4, 16, dtype=torch.long)}, "latents"),
    ],
)
def test_bad_pipeline_arguments_name_themselves(pipe, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pipe("a photo", red(), **{**FAST, **kwargs})


def test_pipeline_routes_the_adapter_it_loaded_and_warns_when_it_is_inactive(tmp_path):
    from mosaic_kit.pipelines import tiny_mosaic_pipeline

    source = tiny_mosaic_pipeline(seed=0)
    randomise(source.transformer, "mosaic", seed=4)
    path = save_reference_lora(source.transformer, tmp_path / "lora.safetensors")
    expected = source("a photo", red(), generator=torch.Generator().manual_seed(0), output_type="pt", **FAST).images
    other = tiny_mosaic_pipeline(seed=0)
    other.transformer.delete_adapters("mosaic")
    other.load_mosaic_weights(path, adapter_name="subjects")  # any adapter name is routed
    assert other.mosaic_transformer.reference_adapter == "subjects"
    got = other("a photo", red(), generator=torch.Generator().manual_seed(0), output_type="pt", **FAST).images
    torch.testing.assert_close(got, expected)
    other.transformer.add_adapter(LoraConfig(r=2, target_modules=["to_q"]), adapter_name="style")  # now the only one
    with pytest.warns(UserWarning, match="'subjects' is loaded but not active"):
        other("a photo", red(), **FAST)


@pytest.mark.parametrize("kind", ["16-bit grey", "16-bit grey file", "CMYK", "palette with transparency", "LA"])
def test_reference_images_of_every_mode_become_correct_rgb(tmp_path, kind):
    """Never clipped to white: each reference is the colour it shows (alpha composited on white)."""
    import numpy as np
    from PIL import Image

    from mosaic_kit.pipelines import load_reference_image

    if kind.startswith("16-bit"):
        image, expected = Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)), (156, 156, 156)
        if kind.endswith("file"):
            image.save(tmp_path / "grey16.png")
            image = tmp_path / "grey16.png"
    elif kind == "CMYK":
        image, expected = Image.new("CMYK", (8, 8), (0, 255, 255, 0)), (255, 0, 0)
    elif kind == "LA":
        image, expected = Image.new("LA", (8, 8), (0, 0)), (255, 255, 255)  # fully transparent black
    else:
        image = Image.new("P", (8, 8), 1)
        image.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
        image.info["transparency"] = 0
        expected = (10, 20, 30)
    rgb = load_reference_image(image, 0)
    assert rgb.mode == "RGB" and rgb.getpixel((4, 4)) == expected


def test_reference_images_of_unsupported_modes_are_refused(pipe):
    from PIL import Image

    with pytest.raises(ValueError, match=r"reference_images\[0\].*mode 'F'"):
        pipe("a photo", [Image.new("F", (8, 8), 3.5)], **FAST)


def test_reference_lora_helpers_refuse_bad_arguments():
    transformer = tiny_flux_transformer()
    add_reference_lora(transformer, rank=2)
    with pytest.raises(ValueError, match="already has an adapter 'mosaic'"):
        add_reference_lora(transformer, rank=2)
    with pytest.raises(ValueError, match="`scale`"):
        set_reference_lora_scale(transformer, True)
    with pytest.raises(ValueError, match="named 'other'"):
        set_reference_lora_scale(transformer, 1.0, adapter_name="other")
    with pytest.raises(ValueError, match="`partial`"):
        load_reference_lora(transformer, reference_lora_state_dict(transformer), partial="yes")
    with pytest.raises(ValueError, match="reference_adapter"):
        MosaicFluxTransformer(transformer, reference_adapter="")
