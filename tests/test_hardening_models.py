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
    without = copy.deepcopy(both)
    without.set_adapters(["mosaic"])
    assert not torch.allclose(MosaicFluxTransformer(without)(**inputs), got)


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
