"""The FLUX multi-reference forward against the stock diffusers forward and a naive eq. 4-7."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from flux_naive import naive_forward  # noqa: E402

from mosaic_kit.attention import RefTargetCapture, dense_ref_target_attention  # noqa: E402
from mosaic_kit.correspondence import Correspondences  # noqa: E402
from mosaic_kit.models import (  # noqa: E402
    MosaicFluxTransformer,
    add_reference_lora,
    latent_image_ids,
    load_reference_lora,
    pack_latents,
    reference_lora_state_dict,
    reference_position_ids,
    save_reference_lora,
    set_reference_lora_scale,
    unpack_latents,
)
from mosaic_kit.models.testing import random_packed_inputs, tiny_flux_transformer  # noqa: E402


def randomise_lora(transformer, seed=1, std=0.05):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if ".lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen, dtype=param.dtype) * std)


def lora_model(rank=4, dtype=torch.float64, seed=0, **kwargs):
    transformer = tiny_flux_transformer(seed=seed)
    add_reference_lora(transformer, rank=rank)
    randomise_lora(transformer)
    return MosaicFluxTransformer(transformer.to(dtype), **kwargs)


def stock(transformer, inputs):
    return transformer(
        hidden_states=inputs["target_tokens"],
        encoder_hidden_states=inputs["text_embeddings"],
        pooled_projections=inputs["pooled_embeddings"],
        timestep=inputs["timestep"],
        img_ids=inputs["target_ids"],
        txt_ids=inputs["text_ids"],
        guidance=inputs["guidance"],
        return_dict=False,
    )[0]


@pytest.mark.parametrize("guidance_embeds", [True, False])
def test_zero_references_equal_stock_forward(guidance_embeds):
    transformer = tiny_flux_transformer(guidance_embeds=guidance_embeds)
    inputs = random_packed_inputs(transformer, batch=2, target_size=(48, 32))
    expected = stock(transformer, inputs)
    model = MosaicFluxTransformer(transformer)
    with torch.no_grad():
        got = model(**inputs)
        # the installed processor keeps a plain call stock
        again = stock(transformer, inputs)
    assert (got - expected).abs().max() <= 1e-5
    assert torch.equal(again, expected)


def test_zero_references_ignore_the_lora():
    transformer = tiny_flux_transformer()
    inputs = random_packed_inputs(transformer, batch=1)
    expected = stock(transformer, inputs)
    add_reference_lora(transformer, rank=4)
    randomise_lora(transformer)
    got = MosaicFluxTransformer(transformer)(**inputs)
    assert (got - expected).abs().max() <= 1e-5


@pytest.mark.parametrize(
    "sizes,mode",
    [
        ([(32, 32)], "isolated"),
        ([(32, 32), (32, 32), (32, 32)], "isolated"),
        ([(32, 32), (16, 48), (48, 16)], "isolated"),
        ([(32, 32), (32, 32)], "full"),
        ([(16, 32), (32, 16)], "full"),
    ],
)
def test_references_equal_naive_eq_4_to_7(sizes, mode):
    model = lora_model(reference_attention=mode)
    inputs = random_packed_inputs(model.transformer, batch=2, target_size=(32, 48), reference_sizes=sizes,
                                  dtype=torch.float64)
    got = model(**inputs)
    expected = naive_forward(model.transformer, inputs, reference_attention=mode)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)


def test_reference_guidance_and_timestep_settings_match_naive():
    model = lora_model(reference_timestep=0.25)
    inputs = random_packed_inputs(model.transformer, batch=1, reference_sizes=[(32, 32), (32, 32)], dtype=torch.float64)
    got = model(**inputs, reference_guidance=1.0)
    expected = naive_forward(model.transformer, inputs, reference_timestep=0.25, reference_guidance=1.0)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
    assert not torch.allclose(got, model(**inputs))  # the settings matter


def test_isolated_references_do_not_see_each_other():
    model = lora_model()
    inputs = random_packed_inputs(model.transformer, reference_sizes=[(32, 32), (32, 32)], dtype=torch.float64)
    base = model(**inputs)
    # changing reference 2 changes the target (the target attends to it) ...
    changed = dict(inputs, reference_tokens=inputs["reference_tokens"].clone())
    changed["reference_tokens"][:, 4:] += 1.0
    assert not torch.allclose(model(**changed), base)
    # ... but with one reference only, the prediction is what it is with reference 1 alone
    # under "isolated", reference 1's own stream ignores reference 2: check via the naive twin
    record_a, record_b = [], []
    naive_forward(model.transformer, inputs, record=record_a)
    naive_forward(model.transformer, changed, record=record_b)
    # reference 1's first-block queries do not depend on reference 2
    torch.testing.assert_close(record_a[0][0][:, :, :4], record_b[0][0][:, :, :4])


def test_lora_scale_zero_sends_references_through_base_weights():
    model = lora_model(dtype=torch.float64)
    inputs = random_packed_inputs(model.transformer, reference_sizes=[(32, 32)], dtype=torch.float64)
    set_reference_lora_scale(model.transformer, 0.0)
    got = model(**inputs)
    plain = tiny_flux_transformer().to(torch.float64)
    expected = naive_forward(plain, inputs)  # no LoRA at all
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
    set_reference_lora_scale(model.transformer, 1.0)
    assert not torch.allclose(model(**inputs), expected)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradients_reach_only_lora_parameters(checkpointing):
    model = lora_model(dtype=torch.float32)
    if checkpointing:
        model.transformer.enable_gradient_checkpointing()
    inputs = random_packed_inputs(model.transformer, batch=2, reference_sizes=[(32, 32), (16, 32)])
    model(**inputs).square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(".lora_" in n for n in grads)
    # in the last block only the references' keys and values reach the target
    last = f"single_transformer_blocks.{len(model.transformer.single_transformer_blocks) - 1}."
    unused = tuple(last + m for m in ("attn.to_q.", "proj_mlp.", "proj_out."))
    lora_params = [n for n, _ in model.named_parameters() if ".lora_" in n and not any(u in n for u in unused)]
    assert set(grads) == set(lora_params)
    assert all(g.abs().sum() > 0 for g in grads.values())


def test_gradient_checkpointing_gives_the_same_gradients():
    def grads(checkpointing):
        model = lora_model(dtype=torch.float64)
        if checkpointing:
            model.transformer.enable_gradient_checkpointing()
        inputs = random_packed_inputs(model.transformer, reference_sizes=[(32, 32), (32, 32)], dtype=torch.float64)
        corr = Correspondences.from_dicts([[{0: 1, 3: 2}, {1: 0}]], ref_tokens=[4, 4], tgt_tokens=4)
        capture = RefTargetCapture(corr, aggregate="points")
        out = model(**inputs, capture=capture)
        (out.square().mean() - capture.result().pair_log_probs.sum()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(plain[name], checkpointed[name], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("capture_blocks", ["double", "all"])
def test_capture_equals_dense_twin_of_the_same_queries_and_keys(capture_blocks):
    model = lora_model(capture_blocks=capture_blocks)
    sizes = [(32, 32), (16, 32)]
    inputs = random_packed_inputs(model.transformer, batch=2, target_size=(32, 48), reference_sizes=sizes,
                                  dtype=torch.float64)
    corr = Correspondences.from_dicts(
        [[{0: 1, 3: 5}, {0: 2, 1: 3}], [{2: 0}, {1: 4}]], ref_tokens=[4, 2], tgt_tokens=6
    )
    capture = RefTargetCapture(corr, aggregate="points")
    model(**inputs, capture=capture)
    result = capture.result()
    expected_blocks = 2 if capture_blocks == "double" else 4
    assert result.num_blocks == expected_blocks

    # the same queries and keys, recorded by a hook on the attention modules
    queries, keys = [], []
    hooks = []

    def hook(module, args, kwargs, output):
        queries.append(output.capture_query)
        keys.append(output.capture_key)

    modules = [b.attn for b in model.transformer.transformer_blocks]
    if capture_blocks == "all":
        modules += [b.attn for b in model.transformer.single_transformer_blocks]
    hooks = [m.register_forward_hook(hook, with_kwargs=True) for m in modules]
    model(**inputs, capture=RefTargetCapture(corr, aggregate="points"))
    for h in hooks:
        h.remove()
    dense = dense_ref_target_attention(queries, keys)  # (B, N_ref, N_tgt)
    rows, targets = corr.global_rows.clamp_min(0), corr.tgt_index.clamp_min(0)
    batch_index = torch.arange(rows.shape[0])[:, None, None].expand_as(rows)
    expected = dense[batch_index, rows, targets].log()
    torch.testing.assert_close(result.pair_log_probs[corr.point_mask], expected[corr.point_mask])

    # and the double-block queries/keys are the naive model's post-RoPE ones
    record = []
    naive_forward(model.transformer, inputs, record=record)
    for (q, k), q_got, k_got in zip(record, queries, keys):
        torch.testing.assert_close(q_got, q, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(k_got, k, rtol=1e-9, atol=1e-9)


def test_reference_cache_equals_self_only_references_at_every_step():
    model = lora_model()
    inputs = random_packed_inputs(model.transformer, batch=2, reference_sizes=[(32, 32), (16, 32)], dtype=torch.float64)
    cache = model.build_reference_cache(
        inputs["reference_tokens"], inputs["reference_ids"], inputs["pooled_embeddings"],
        inputs["reference_token_counts"], guidance=inputs["guidance"], reference_guidance=1.0,
    )
    assert len(cache.keys) == 4
    refs = {k: inputs[k] for k in ("reference_tokens", "reference_ids", "reference_token_counts")}
    main = {k: v for k, v in inputs.items() if k not in refs}
    cached = model(**main, reference_cache=cache)
    uncached = model(**inputs, reference_guidance=1.0)
    assert not torch.allclose(cached, uncached)
    expected = naive_forward(model.transformer, inputs, reference_attention="self", reference_guidance=1.0)
    torch.testing.assert_close(cached, expected, rtol=1e-9, atol=1e-9)
    # the cache does not depend on the step: reuse it at another timestep
    step2 = dict(main, timestep=main["timestep"] * 0.5)
    expected2 = naive_forward(model.transformer, dict(inputs, timestep=step2["timestep"]), reference_attention="self",
                              reference_guidance=1.0)
    torch.testing.assert_close(model(**step2, reference_cache=cache), expected2, rtol=1e-9, atol=1e-9)
    cache_again = model.build_reference_cache(
        inputs["reference_tokens"], inputs["reference_ids"], inputs["pooled_embeddings"],
        inputs["reference_token_counts"], guidance=inputs["guidance"], reference_guidance=1.0,
    )
    for a, b in zip(cache.keys + cache.values, cache_again.keys + cache_again.values):
        assert torch.equal(a, b)


def test_lora_file_in_released_layout_loads_where_it_belongs(tmp_path):
    from safetensors.torch import save_file

    transformer = tiny_flux_transformer()
    dim = transformer.inner_dim
    gen = torch.Generator().manual_seed(3)
    rank = 3
    names = ["x_embedder"]
    for i in range(2):
        names += [f"transformer_blocks.{i}.{m}" for m in
                  ("norm1.linear", "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "ff.net.2")]
        names += [f"single_transformer_blocks.{i}.{m}" for m in
                  ("norm.linear", "proj_mlp", "proj_out", "attn.to_q", "attn.to_k", "attn.to_v")]
    modules = dict(transformer.named_modules())
    state = {}
    for name in names:
        linear = modules[name]
        state[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, linear.in_features, generator=gen)
        state[f"transformer.{name}.lora_B.weight"] = torch.randn(linear.out_features, rank, generator=gen)
    assert dim > 0
    path = tmp_path / "released.safetensors"
    save_file(state, str(path))
    load_reference_lora(transformer, path)
    modules = dict(transformer.named_modules())
    for name in names:
        layer = modules[name]
        assert torch.equal(layer.lora_A["mosaic"].weight, state[f"transformer.{name}.lora_A.weight"])
        assert torch.equal(layer.lora_B["mosaic"].weight, state[f"transformer.{name}.lora_B.weight"])
        assert layer.scaling["mosaic"] == 1.0  # released: scale exactly 1
    # nothing else got an adapter
    adapted = {n for n, m in transformer.named_modules() if hasattr(m, "lora_A")}
    assert adapted == set(names)
    # round trip save -> load is exact
    out = save_reference_lora(transformer, tmp_path / "again.safetensors")
    other = tiny_flux_transformer()
    load_reference_lora(other, out)
    a, b = reference_lora_state_dict(transformer), reference_lora_state_dict(other)
    assert a.keys() == b.keys() == state.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_lora_files_mean_scale_one_whatever_alpha(tmp_path):
    from safetensors.torch import load_file

    transformer = tiny_flux_transformer()
    add_reference_lora(transformer, rank=4, alpha=8)
    randomise_lora(transformer)
    path = save_reference_lora(transformer, tmp_path / "lora.safetensors")
    raw = reference_lora_state_dict(transformer)
    saved = load_file(str(path))
    for key, value in raw.items():  # alpha / rank = 2 folded into B: the released code applies scale 1
        torch.testing.assert_close(saved[key], value * 2 if ".lora_B." in key else value)
    other = tiny_flux_transformer()
    load_reference_lora(other, path)
    assert all(m.scaling["mosaic"] == 1.0 for m in other.modules() if hasattr(m, "scaling"))
    inputs = random_packed_inputs(transformer, reference_sizes=[(32, 32)])
    torch.testing.assert_close(MosaicFluxTransformer(other)(**inputs), MosaicFluxTransformer(transformer)(**inputs))


def test_lora_only_on_modules_the_forward_routes():
    with pytest.raises(ValueError, match="reference-routed modules"):
        add_reference_lora(tiny_flux_transformer(), rank=2, target_modules=r"^transformer_blocks\.0\.ff\.net\.0\.proj$")
    transformer = tiny_flux_transformer()
    with pytest.raises(ValueError, match="reference-routed modules"):
        load_reference_lora(transformer, {
            "transformer.transformer_blocks.0.attn.add_q_proj.lora_A.weight": torch.zeros(2, 32),
            "transformer.transformer_blocks.0.attn.add_q_proj.lora_B.weight": torch.zeros(32, 2),
        })
    assert not getattr(transformer, "peft_config", {})
    # the output projection (peft's suffix match of "proj_out" adapts it) is accepted and inert
    inputs = random_packed_inputs(transformer, reference_sizes=[(32, 32)])
    before = MosaicFluxTransformer(transformer)(**inputs)
    load_reference_lora(transformer, {"transformer.proj_out.lora_A.weight": torch.ones(2, 32),
                                      "transformer.proj_out.lora_B.weight": torch.ones(64, 2)}, partial=True)
    torch.testing.assert_close(MosaicFluxTransformer(transformer)(**inputs), before)


def test_bf16_autocast_with_zero_references_equals_stock():
    transformer = tiny_flux_transformer()
    inputs = random_packed_inputs(transformer, batch=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = stock(transformer, inputs)
        got = MosaicFluxTransformer(transformer)(**inputs)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_wrapping_keeps_the_chosen_attention_backend():
    transformer = tiny_flux_transformer()
    transformer.set_attention_backend("_native_math")
    chosen = next(iter(transformer.attn_processors.values()))._attention_backend
    MosaicFluxTransformer(transformer)
    assert all(p._attention_backend == chosen for p in transformer.attn_processors.values())


def test_reference_cache_of_another_model_is_refused():
    model = lora_model(dtype=torch.float32)
    inputs = random_packed_inputs(model.transformer, reference_sizes=[(32, 32)])
    cache = model.build_reference_cache(inputs["reference_tokens"], inputs["reference_ids"],
                                        inputs["pooled_embeddings"], guidance=inputs["guidance"])
    cache.keys.pop()
    main = {k: v for k, v in inputs.items() if not k.startswith("reference_")}
    with pytest.raises(ValueError, match="one entry per block"):
        model(**main, reference_cache=cache)


@pytest.mark.parametrize(
    "state,match",
    [
        ({"transformer.nope.lora_A.weight": torch.zeros(2, 3), "transformer.nope.lora_B.weight": torch.zeros(3, 2)},
         "LoRA state dict.*naming no linear module"),
        ({"unet.x.lora_A.weight": torch.zeros(2, 3)}, "LoRA state dict: expected LoRA keys"),
        ({"transformer.x_embedder.lora_A.weight": torch.zeros(2, 5),
          "transformer.x_embedder.lora_B.weight": torch.zeros(32, 2)}, "of shape"),
        ({"transformer.x_embedder.lora_A.weight": torch.zeros(2, 64)}, "both lora_A and lora_B"),
        ({}, "none"),
    ],
)
def test_bad_lora_files_raise(state, match):
    with pytest.raises(ValueError, match=match):
        load_reference_lora(tiny_flux_transformer(), state)


def test_bad_lora_path_raises(tmp_path):
    with pytest.raises(ValueError, match="existing"):
        load_reference_lora(tiny_flux_transformer(), tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="safetensors"):
        load_reference_lora(tiny_flux_transformer(), bad)


def test_packing_matches_diffusers():
    from diffusers import FluxPipeline

    latents = torch.randn(2, 16, 6, 4)
    torch.testing.assert_close(pack_latents(latents), FluxPipeline._pack_latents(latents, 2, 16, 6, 4))
    ids = FluxPipeline._prepare_latent_image_ids(2, 3, 2, "cpu", torch.float32)
    torch.testing.assert_close(latent_image_ids(3, 2), ids)
    torch.testing.assert_close(unpack_latents(pack_latents(latents), 6, 4), latents)


def test_reference_position_ids_follow_the_released_shift():
    ids = reference_position_ids([(512, 512), (512, 512), (512, 512)])
    per_ref = ids.view(3, 32 * 32, 3)
    for k in range(3):
        assert per_ref[k, :, 2].min() == -32 * (k + 1)
        assert per_ref[k, :, 2].max() == -32 * (k + 1) + 31
        assert torch.equal(per_ref[k, :, 1], torch.arange(32).repeat_interleave(32).float())
    with pytest.raises(ValueError, match="multiples of 16"):
        reference_position_ids([(500, 512)])


@pytest.mark.parametrize(
    "change,match",
    [
        ({"reference_token_counts": (3,)}, "summing"),
        ({"reference_ids": torch.zeros(3, 3)}, "reference_ids"),
        ({"reference_tokens": torch.zeros(1, 4, 7)}, "reference_tokens"),
        ({"target_ids": torch.zeros(3, 3)}, "target_ids"),
        ({"target_tokens": torch.zeros(1, 4)}, "target_tokens"),
    ],
)
def test_bad_forward_inputs_raise(change, match):
    model = MosaicFluxTransformer(tiny_flux_transformer())
    inputs = random_packed_inputs(model.transformer, reference_sizes=[(32, 32)])
    with pytest.raises(ValueError, match=match):
        model(**{**inputs, **change})


def test_bad_settings_raise():
    with pytest.raises(ValueError, match="reference_attention"):
        MosaicFluxTransformer(tiny_flux_transformer(), reference_attention="cross")
    with pytest.raises(ValueError, match="capture_blocks"):
        MosaicFluxTransformer(tiny_flux_transformer(), capture_blocks="single")
    with pytest.raises(ValueError, match="FluxTransformer2DModel"):
        MosaicFluxTransformer(torch.nn.Linear(2, 2))
