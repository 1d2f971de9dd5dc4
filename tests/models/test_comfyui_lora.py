"""ComfyUI-format LoRA files (`mosaic_kit.models.comfyui`, ``family.save_lora(..., format="comfyui")``):
the key names ComfyUI's loader reads, checked by round trips back to the diffusers keys through
diffusers' own converters (every tensor equal), through diffusers' own FLUX.2 checkpoint converter
(the original module names and row order ComfyUI runs), and into the stock FLUX.2 pipeline."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import Flux2KleinPipeline, FluxPipeline  # noqa: E402
from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers  # noqa: E402

from mosaic_kit.models import Flux2Family, MosaicFluxFamily, read_lora_file  # noqa: E402
from mosaic_kit.models.comfyui import (  # noqa: E402
    ComfyLoraKey,
    comfyui_lora_name,
    comfyui_to_diffusers,
    diffusers_to_comfyui,
)
from mosaic_kit.models.flux import FLUX1_COMFYUI_KEYS  # noqa: E402
from mosaic_kit.models.flux.lora import REFERENCE_LORA_TARGETS  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (tests/conftest.py)


def _randomise(params, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g))


def _flux1_real_width_state(rank: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """A folded reference LoRA with FLUX.1-dev's real widths (hidden 3072, MLP 12288) on every
    module `REFERENCE_LORA_TARGETS` routes, for one double and one single block (no model: only the
    file's tensors matter, and diffusers' kohya converter assumes the real widths)."""
    import re

    hidden, mlp = 3072, 12288
    shapes = {"x_embedder": (64, hidden), "transformer_blocks.0.norm1.linear": (hidden, 6 * hidden),
              "transformer_blocks.0.attn.to_out.0": (hidden, hidden), "transformer_blocks.0.ff.net.2": (mlp, hidden),
              "single_transformer_blocks.0.norm.linear": (hidden, 3 * hidden),
              "single_transformer_blocks.0.proj_mlp": (hidden, mlp),
              "single_transformer_blocks.0.proj_out": (hidden + mlp, hidden)}
    for p in "qkv":
        shapes[f"transformer_blocks.0.attn.to_{p}"] = (hidden, hidden)
        shapes[f"single_transformer_blocks.0.attn.to_{p}"] = (hidden, hidden)
    assert all(re.fullmatch(REFERENCE_LORA_TARGETS, m) for m in shapes)  # exactly the routed modules
    g = torch.Generator().manual_seed(seed)
    state = {}
    for module, (fan_in, fan_out) in shapes.items():
        state[f"transformer.{module}.lora_A.weight"] = torch.randn(rank, fan_in, generator=g)
        state[f"transformer.{module}.lora_B.weight"] = torch.randn(fan_out, rank, generator=g)
    return state


def test_flux1_comfyui_keys_round_trip_through_diffusers_kohya_converter():
    """diffusers reads ComfyUI/kohya FLUX.1 files with ``_convert_kohya_flux_lora_to_diffusers``
    (``FluxPipeline.lora_state_dict``), which knows the original names and splits the fused q/k/v
    and ``linear1`` (q, k, v, MLP at 3072/3072/3072/12288) itself: every tensor comes back equal."""
    state = _flux1_real_width_state()
    comfy = diffusers_to_comfyui(state, FLUX1_COMFYUI_KEYS)
    assert "lora_unet_single_blocks_0_linear1.lora_up.weight" in comfy
    assert comfy["lora_unet_single_blocks_0_linear1.lora_down.weight"].shape == (8, 3072)  # 4 parts × rank 2
    back = FluxPipeline.lora_state_dict(dict(comfy))
    # diffusers 0.42.1's kohya converter names ``lora_unet_img_in`` "x_embedder" without the
    # "transformer." prefix its other keys carry; the tensors are what matter here.
    back = {k if k.startswith("transformer.") else f"transformer.{k}": v for k, v in back.items()}
    assert sorted(back) == sorted(state)
    unequal = [k for k in state if not torch.equal(back[k], state[k])]
    assert not unequal


def test_flux1_family_comfyui_file_holds_the_diffusers_file_tensors(tmp_path):
    """The FLUX.1 family's two files (alpha ≠ rank: the fold is exercised) describe one LoRA:
    the ComfyUI file converted back equals the diffusers file tensor for tensor, and every
    ComfyUI module's ``alpha/rank · up @ down`` is the stacked ``B @ A`` of its diffusers parts."""
    family = MosaicFluxFamily.tiny()
    family.add_lora(rank=2, alpha=3)
    _randomise(family.trainable_parameters())
    diffusers_file = read_lora_file(family.save_lora(tmp_path / "lora.safetensors"))
    comfy = read_lora_file(family.save_lora(tmp_path / "lora_comfyui.safetensors", format="comfyui"))
    assert all(k.startswith("lora_unet_") for k in comfy)
    back = comfyui_to_diffusers(comfy, FLUX1_COMFYUI_KEYS)
    assert sorted(back) == sorted(diffusers_file)
    assert all(torch.equal(back[k], diffusers_file[k]) for k in back)
    for entry in FLUX1_COMFYUI_KEYS:
        if "{i}" not in entry.comfy:
            continue
        name = entry.name(0)
        if f"{name}.lora_down.weight" not in comfy:
            continue
        delta = comfy[f"{name}.alpha"] / comfy[f"{name}.lora_down.weight"].shape[0] * (
            comfy[f"{name}.lora_up.weight"].double() @ comfy[f"{name}.lora_down.weight"].double())
        parts = [f"transformer.{m.replace('{i}', '0')}" for m in entry.diffusers]
        stacked = torch.cat([diffusers_file[f"{p}.lora_B.weight"].double() @ diffusers_file[f"{p}.lora_A.weight"].double()
                             for p in parts])
        torch.testing.assert_close(delta, stacked, rtol=1e-12, atol=1e-12)


def test_flux1_comfyui_file_leaves_out_the_inert_proj_out_lora(tmp_path):
    """Released checkpoints carry a LoRA on the top-level ``proj_out`` that no forward applies;
    ComfyUI would apply it, so the ComfyUI file leaves it out (and keeps everything else)."""
    family = MosaicFluxFamily.tiny()
    family.add_lora(rank=2)
    state = {k: v.detach().clone() for k, v in family.lora_parameters().items()}
    proj_out = family.transformer.proj_out
    state["transformer.proj_out.lora_A.weight"] = torch.ones(2, proj_out.in_features)
    state["transformer.proj_out.lora_B.weight"] = torch.ones(proj_out.out_features, 2)
    released = tmp_path / "released.safetensors"
    from mosaic_kit.models import write_lora_file

    write_lora_file(state, released)
    family.load_lora(released)
    comfy = read_lora_file(family.save_lora(tmp_path / "c.safetensors", format="comfyui"))
    assert not any("final_layer" in k for k in comfy)
    assert "lora_unet_img_in.lora_down.weight" in comfy


def _flux2_family(rank: int = 2, alpha: float = 4.0) -> Flux2Family:
    family = Flux2Family.tiny()
    family.add_lora(rank=rank, alpha=alpha, init=False)
    _randomise(family.trainable_parameters(), seed=1)
    return family


def _folded(family: Flux2Family) -> dict[str, torch.Tensor]:
    """The FLUX.2 LoRA applied with scale 1: ``alpha / rank`` folded into ``lora_B``."""
    factor = family.transformer.peft_config["mosaic"].lora_alpha / family.transformer.peft_config["mosaic"].r
    return {f"transformer.{k}": v * factor if ".lora_B." in k else v for k, v in family.lora_state_dict().items()}


def test_flux2_comfyui_file_round_trips_through_diffusers_flux2_loader(tmp_path):
    """``Flux2KleinPipeline.lora_state_dict`` reads the ComfyUI file (its kohya FLUX.2 converter)
    back into the diffusers keys, every tensor equal to the LoRA's (alpha/rank folded)."""
    family = _flux2_family()
    file = family.save_lora(tmp_path / "lora_comfyui.safetensors", format="comfyui")
    comfy = read_lora_file(file)
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in comfy
    assert "lora_unet_single_blocks_1_linear1.lora_up.weight" in comfy
    back = Flux2KleinPipeline.lora_state_dict(str(tmp_path), weight_name=file.name)
    expected = _folded(family)
    assert sorted(back) == sorted(expected)
    assert all(torch.equal(back[k], expected[k]) for k in expected)
    mine = comfyui_to_diffusers(comfy, family.comfyui_lora_keys)
    assert sorted(mine) == sorted(expected) and all(torch.equal(mine[k], expected[k]) for k in expected)


def test_flux2_comfyui_names_and_rows_are_the_original_checkpoint_layout(tmp_path):
    """ComfyUI adds ``alpha/rank · up @ down`` to the original checkpoint's weight named by the
    key (``lora_unet_`` + the name with ``_`` for ``.``). Treating those updates as an original
    checkpoint, diffusers' own FLUX.2 checkpoint converter maps them onto exactly the diffusers
    modules' ``B @ A``: the names exist in the original layout and the fused rows are in its order."""
    family = _flux2_family(rank=3, alpha=3)
    comfy = read_lora_file(family.save_lora(tmp_path / "c.safetensors", format="comfyui"))
    checkpoint = {}
    for entry in family.comfyui_lora_keys:
        for index in ("0", "1") if "{i}" in entry.comfy else (None,):
            original = entry.comfy.replace("{i}", str(index))
            name = comfyui_lora_name(original)
            assert name == "lora_unet_" + original.replace(".", "_")
            if f"{name}.lora_down.weight" in comfy:
                down, up = comfy[f"{name}.lora_down.weight"].double(), comfy[f"{name}.lora_up.weight"].double()
                checkpoint[f"{original}.weight"] = comfy[f"{name}.alpha"].double() / down.shape[0] * (up @ down)
    assert len(checkpoint) == len(comfy) // 3
    converted = convert_flux2_transformer_checkpoint_to_diffusers(checkpoint)
    expected = {k.removesuffix(".lora_A.weight"): None for k in family.lora_state_dict() if ".lora_A." in k}
    state = family.lora_state_dict()
    assert sorted(converted) == sorted(f"{m}.weight" for m in expected)
    for module in expected:
        delta = state[f"{module}.lora_B.weight"].double() @ state[f"{module}.lora_A.weight"].double()
        torch.testing.assert_close(converted[f"{module}.weight"], delta, rtol=1e-12, atol=1e-12)


def test_flux2_comfyui_file_loads_into_the_stock_pipeline(tmp_path):
    """The stock pipeline's ``load_lora_weights`` of the ComfyUI file gives the transformer the
    family's LoRA: the same prediction as the LoRA in memory."""
    from mosaic_kit.pipelines.tiny_flux2 import tiny_flux2_components

    family = _flux2_family()
    file = family.save_lora(tmp_path / "lora_comfyui.safetensors", format="comfyui")
    pipe = Flux2KleinPipeline(**tiny_flux2_components())
    pipe.load_lora_weights(str(tmp_path), weight_name=file.name)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, 4, family.token_channels, generator=g)
    kwargs = dict(encoder_hidden_states=torch.randn(1, 3, pipe.transformer.config.joint_attention_dim, generator=g),
                  timestep=torch.tensor([0.5]), img_ids=torch.zeros(4, 4), txt_ids=torch.zeros(3, 4),
                  return_dict=False)
    with torch.no_grad():
        mine = family.transformer(hidden, **kwargs)[0]
        stock = pipe.transformer(hidden, **kwargs)[0]
        pipe.transformer.disable_lora()
        base = pipe.transformer(hidden, **kwargs)[0]
    assert not torch.allclose(mine, base, atol=1e-4)  # the LoRA changes the prediction
    torch.testing.assert_close(stock, mine, rtol=1e-5, atol=1e-5)


def test_comfyui_format_errors(tmp_path):
    family = _flux2_family()
    with pytest.raises(ValueError, match=r"`format` to be one of \('diffusers', 'comfyui'\), but got 'kohya'"):
        family.save_lora(tmp_path / "x.safetensors", format="kohya")
    with pytest.raises(ValueError, match="ComfyUI LoRA to be a .safetensors file"):
        family.save_lora(tmp_path / "folder", format="comfyui")
    keys = family.comfyui_lora_keys
    state = _folded(family)
    partial = {k: v for k, v in state.items() if ".attn.to_k." not in k}
    with pytest.raises(ValueError, match=r"LoRA on all of .*to_k'\] have none"):
        diffusers_to_comfyui(partial, keys)
    with pytest.raises(ValueError, match="no ComfyUI name"):
        diffusers_to_comfyui({**state, "transformer.norm_out.linear.lora_A.weight": torch.ones(2, 32),
                              "transformer.norm_out.linear.lora_B.weight": torch.ones(64, 2)}, keys)
    comfy = diffusers_to_comfyui(state, keys)
    dense = dict(comfy)
    dense["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"] = torch.ones_like(
        comfy["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"])
    with pytest.raises(ValueError, match="block-diagonal"):
        comfyui_to_diffusers(dense, keys)
    with pytest.raises(ValueError, match="'in' or 'rest'"):
        ComfyLoraKey("a.{i}.b", ("x", "y"), widths=("in",))
