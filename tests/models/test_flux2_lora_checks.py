"""LoRA files into the FLUX.2 family: `Flux2Family.load_lora` verifies the digest mosaic_kit records
(a changed tensor is refused, as `read_lora_file` refuses it), and a LoRA made for another model
(FLUX.1 into FLUX.2, FLUX.2 into FLUX.1, another FLUX.2 size) is refused with an error that names
the file, the model it was made for and the model it is being loaded into, never peft's raw
``size mismatch`` (also through the trainer's ``model.init_lora``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("diffusers")

from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from mosaic_kit.models import (  # noqa: E402
    Flux2Family,
    add_reference_lora,
    load_reference_lora,
    save_reference_lora,
)
from mosaic_kit.models.testing import tiny_flux_transformer  # noqa: E402

CONFIG = Path(__file__).resolve().parents[2] / "recipes" / "configs" / "tiny_flux2_cpu.yaml"


def _flux2_file(folder: Path, **overrides) -> tuple[Flux2Family, Path]:
    """A FLUX.2 LoRA file as the trainer writes it (`Flux2Family.save_lora`, the one writer:
    diffusers' layout and adapter metadata, digest recorded)."""
    family = Flux2Family.tiny(transformer_overrides=overrides or None)
    family.add_lora(rank=2, init=False)
    return family, family.save_lora(folder / "pytorch_lora_weights.safetensors")


def _flux1_file(folder: Path) -> Path:
    transformer = tiny_flux_transformer()
    add_reference_lora(transformer, rank=2)
    return save_reference_lora(transformer, folder / "flux1.safetensors")


def _changed(path: Path, out: Path) -> Path:
    """``path`` with one tensor changed and its metadata (the recorded digest) kept."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    state = load_file(str(path))
    key = sorted(state)[0]
    state[key] = state[key] + 1e-3
    save_file(state, str(out), metadata=metadata)
    return out


@pytest.mark.parametrize("with_adapter", [False, True], ids=["fresh", "resume"])
def test_a_file_with_a_changed_tensor_is_refused(tmp_path, with_adapter):
    _, good = _flux2_file(tmp_path)
    bad_folder = tmp_path / "bad"
    bad_folder.mkdir()
    bad = _changed(good, bad_folder / "pytorch_lora_weights.safetensors")
    for source in (bad, bad_folder):  # the file, or the run folder holding it
        family = Flux2Family.tiny()
        if with_adapter:
            family.add_lora(rank=2)
        with pytest.raises(ValueError, match="is damaged") as error:
            family.load_lora(source)
        assert str(bad) in str(error.value) and "mosaic_kit.sha256" in str(error.value)
        if not with_adapter:
            assert not getattr(family.transformer, "peft_config", None)  # nothing was loaded
    family = Flux2Family.tiny()
    family.load_lora(good)  # the unchanged file loads, with its values
    saved = load_file(str(good))
    loaded = family.lora_state_dict()
    assert {f"transformer.{k}" for k in loaded} == set(saved)
    assert all(torch.equal(loaded[k], saved[f"transformer.{k}"]) for k in loaded)


@pytest.mark.parametrize("with_adapter", [False, True], ids=["fresh", "resume"])
def test_a_flux1_lora_into_flux2_names_the_file_and_both_models(tmp_path, with_adapter):
    path = _flux1_file(tmp_path)
    family = Flux2Family.tiny()
    if with_adapter:
        family.add_lora(rank=2)
    with pytest.raises(ValueError) as error:
        family.load_lora(path)
    message = str(error.value)
    assert str(path) in message and "size mismatch" not in message
    assert "made for FLUX.1 (FluxTransformer2DModel)" in message
    assert "FLUX.2 (Flux2Transformer2DModel)" in message and "being loaded into" in message
    assert "single_transformer_blocks.0.attn.to_q" in message or "norm1.linear" in message  # the evidence
    if not with_adapter:
        assert not getattr(family.transformer, "peft_config", None)


def test_a_flux2_lora_into_flux1_names_the_file_and_both_models(tmp_path):
    _, path = _flux2_file(tmp_path)
    with pytest.raises(ValueError) as error:
        load_reference_lora(tiny_flux_transformer(), path)
    message = str(error.value)
    assert str(path) in message and "made for FLUX.2 (Flux2Transformer2DModel)" in message
    assert "FLUX.1 (FluxTransformer2DModel)" in message and "to_qkv_mlp_proj" in message


def test_a_lora_of_another_flux2_size_names_the_shapes(tmp_path):
    _, path = _flux2_file(tmp_path, attention_head_dim=8, axes_dims_rope=(2, 2, 2, 2))
    with pytest.raises(ValueError) as error:
        Flux2Family.tiny().load_lora(path)
    message = str(error.value)
    assert str(path) in message and "another FLUX.2 model (other layer widths)" in message
    assert "other shapes" in message and "size mismatch" not in message


def test_init_lora_of_flux1_in_flux2_training_is_refused(tmp_path):
    from mosaic_kit.training import MosaicTrainer, config_from_dict

    path = _flux1_file(tmp_path)
    raw = yaml.safe_load(CONFIG.read_text())
    raw["output_dir"] = str(tmp_path / "run")
    raw["model"]["init_lora"] = str(path)
    threads = torch.get_num_threads()
    try:
        with pytest.raises(ValueError, match="made for FLUX.1") as error:
            MosaicTrainer(config_from_dict(raw)).setup()
    finally:
        torch.set_num_threads(threads)
    assert str(path) in str(error.value) and "Flux2Transformer2DModel" in str(error.value)


def test_a_state_dict_with_non_lora_keys_is_refused_and_left_unchanged():
    state = {"transformer.x_embedder.weight": torch.zeros(2, 2)}
    family = Flux2Family.tiny()
    with pytest.raises(ValueError, match="LoRA state dict: expected LoRA"):
        family.load_lora(state)
    assert list(state) == ["transformer.x_embedder.weight"] and not getattr(family.transformer, "peft_config", None)
