"""Every family's LoRA file records the family that wrote it (`LORA_FAMILY_KEY`), and every family's
``load_lora`` refuses a file of another family even where its module names fit (a FLUX.1 reference
LoRA in FLUX.1-Kontext: same keys, but FLUX.1 applies it to the reference tokens only, Kontext to
every token); files without the key (released checkpoints, stock files) load as before."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from mosaic_kit.models import LORA_FAMILY_KEY, KontextFamily, MosaicFluxFamily  # noqa: E402
from mosaic_kit.pipelines import build_family, family_names  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (tests/conftest.py)


def _metadata(path) -> dict:
    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata() or {}


def _trained(family):
    family.add_lora(rank=2)
    with torch.no_grad():
        for param in family.lora_parameters().values():
            param.normal_(0, 0.1)
    return family


@pytest.mark.parametrize("name", family_names())
def test_every_familys_lora_file_records_its_family(name, tmp_path):
    family = _trained(build_family(name, seed=0))
    assert _metadata(family.save_lora(tmp_path / "lora.safetensors"))[LORA_FAMILY_KEY] == name
    if family.comfyui_lora_keys is not None:
        comfy = family.save_lora(tmp_path / "lora_comfyui.safetensors", format="comfyui")
        assert _metadata(comfy)[LORA_FAMILY_KEY] == name


def test_kontext_refuses_a_flux1_lora_file(tmp_path):
    file = _trained(MosaicFluxFamily.tiny()).save_lora(tmp_path / "flux1.safetensors")
    kontext = KontextFamily.tiny()
    with pytest.raises(ValueError) as error:
        kontext.load_lora(file)
    message = str(error.value)
    assert str(file) in message and "made for model family 'flux1'" in message
    assert "loaded into model family 'kontext' (KontextFamily)" in message
    assert message.endswith("Load it with `MosaicFluxFamily` (training: `model.family: flux1`).")
    assert not getattr(kontext.transformer, "peft_config", None)  # nothing half-loaded


def test_flux1_refuses_a_kontext_lora_file(tmp_path):
    file = _trained(KontextFamily.tiny()).save_lora(tmp_path)
    flux1 = MosaicFluxFamily.tiny()
    for source in (file, file.parent):  # the file, or its folder
        with pytest.raises(ValueError) as error:
            flux1.load_lora(source)
        message = str(error.value)
        assert str(file) in message and "made for model family 'kontext'" in message
        assert "loaded into model family 'flux1' (MosaicFluxFamily)" in message
        assert message.endswith("Load it with `KontextFamily` (training: `model.family: kontext`).")
    assert not getattr(flux1.transformer, "peft_config", None)


def test_a_file_without_the_family_key_loads_as_before(tmp_path):
    """A released-style file (no `LORA_FAMILY_KEY`) loads into its family and, as before, into
    another family whose modules it fits."""
    trained = _trained(MosaicFluxFamily.tiny())
    file = trained.save_lora(tmp_path / "flux1.safetensors")
    metadata = _metadata(file)
    with safe_open(str(file), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    released = tmp_path / "released.safetensors"
    save_file(tensors, str(released), metadata={k: v for k, v in metadata.items() if k != LORA_FAMILY_KEY})
    assert LORA_FAMILY_KEY not in _metadata(released)
    flux1 = MosaicFluxFamily.tiny()
    flux1.load_lora(released)
    loaded = flux1.lora_parameters()
    assert all(torch.equal(loaded[k], v) for k, v in trained.lora_parameters().items())
    kontext = KontextFamily.tiny()
    kontext.load_lora(released)
    assert kontext.transformer.active_adapters() == ["mosaic"]
