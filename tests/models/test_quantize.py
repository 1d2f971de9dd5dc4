"""A quantized frozen base (`mosaic_kit.models.quantize`): torchao int8 weight-only through
diffusers' ``TorchAoConfig`` on the tiny FLUX.1, FLUX.2, Qwen-Image-Edit-Plus and FLUX.1-Kontext
families (the backend that runs on the CPU), the LoRA on top through peft. Gradients reach only
the LoRA, the prediction stays close to the unquantized model's, and the LoRA file has the same
keys and loads into the unquantized stock pipeline."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("torchao")

from diffusers import Flux2KleinPipeline  # noqa: E402

from mosaic_kit.models import (  # noqa: E402
    Flux2Family,
    KontextFamily,
    MosaicFluxFamily,
    QwenEditPlusFamily,
    read_lora_file,
)
from mosaic_kit.models.quantize import (  # noqa: E402
    is_quantized,
    pipeline_quantization_config,
    quantization_config,
    quantize_transformer,
)
from mosaic_kit.pipelines.tiny_flux2 import tiny_flux2_components  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (tests/conftest.py)

RELATIVE_BOUND = 2e-2
"""Bound on ‖quantized − unquantized‖ / ‖unquantized‖ of a tiny model's prediction with the same
LoRA (measured on the CPU: FLUX.2 0.0051, FLUX.1 0.0060, Qwen-Image-Edit-Plus 0.0069, Kontext
0.0060; int8 weight-only rounds each weight row to 1/127 of its largest magnitude)."""


def _flux2_inputs(family, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    inputs = family.encode(torch.rand(2, 3, 32, 32, generator=g), ["a red cat", "a dog"],
                           torch.rand(2, 2, 3, 32, 32, generator=g))
    return inputs, torch.randn(inputs.target.shape, generator=g), torch.tensor([0.3, 0.7])


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("family_class", [Flux2Family, MosaicFluxFamily, QwenEditPlusFamily, KontextFamily],
                         ids=["flux2", "flux1", "qwen_edit_plus", "kontext"])
def test_int8_base_trains_only_the_lora_and_predicts_close_to_the_unquantized_base(family_class):
    plain, quantized = family_class.tiny(), family_class.tiny(quantize="int8")
    assert is_quantized(quantized.transformer) and not is_quantized(plain.transformer)
    assert type(quantized.transformer.transformer_blocks[0].attn.to_q.weight).__name__ == "Int8Tensor"
    for family in (plain, quantized):
        family.add_lora(rank=2)
        family.set_trainable("lora")
    quantized.load_lora_values({k: v.detach() for k, v in plain.lora_parameters().items()})
    if family_class is Flux2Family:
        inputs, noisy, sigmas = _flux2_inputs(plain)
        run = lambda family: family.forward(inputs, noisy, sigmas)  # noqa: E731
    else:
        from mosaic_kit.data import SyntheticWorld, SyntheticWorldConfig, collate_samples

        world = SyntheticWorld(SyntheticWorldConfig(image_size=32, ref_size=32, min_refs=2, max_refs=2))
        batch = collate_samples([world.sample(0)], 32, 32, vae_scale_factor=plain.vae_scale_factor)
        inputs = plain.encode_batch(batch)
        noisy = torch.randn(inputs.target.shape, generator=torch.Generator().manual_seed(0))
        guidance = {"guidance": 3.5} if family_class is MosaicFluxFamily else {}
        run = lambda family: family.forward(inputs, noisy, torch.tensor([0.5]), **guidance)  # noqa: E731
    with torch.no_grad():  # a LoRA that changes the prediction (B = 0 at init), the same in both
        g = torch.Generator().manual_seed(1)
        for key, param in plain.lora_parameters().items():
            if "lora_B" in key:
                param.copy_(torch.randn(param.shape, generator=g))
    quantized.load_lora_values({k: v.detach() for k, v in plain.lora_parameters().items()})
    reference, prediction = run(plain), run(quantized)
    assert _relative(prediction.detach(), reference.detach()) < RELATIVE_BOUND
    prediction.pow(2).mean().backward()
    with_grad = {name for name, p in quantized.transformer.named_parameters() if p.grad is not None}
    lora = {name for name, p in quantized.transformer.named_parameters() if ".lora_" in name}
    assert with_grad and with_grad <= lora  # nothing outside the LoRA gets a gradient
    assert not any(p.requires_grad for name, p in quantized.transformer.named_parameters() if ".lora_" not in name)


def test_lora_of_a_quantized_flux2_base_loads_into_the_unquantized_stock_pipeline(tmp_path):
    plain, quantized = Flux2Family.tiny(), Flux2Family.tiny(quantize="int8")
    for family in (plain, quantized):
        family.add_lora(rank=2, alpha=4, init=False)
    file = quantized.save_lora(tmp_path / "q")
    assert sorted(read_lora_file(file)) == sorted(read_lora_file(plain.save_lora(tmp_path / "p")))
    pipe = Flux2KleinPipeline(**tiny_flux2_components())
    pipe.load_lora_weights(str(file.parent))
    loaded = {k: v for k, v in pipe.transformer.state_dict().items() if ".lora_" in k}
    mine = {k: v for k, v in quantized.transformer.state_dict().items() if ".lora_" in k}
    renamed = {k.replace(".mosaic.", ".default_0."): v for k, v in mine.items()}
    assert sorted(loaded) == sorted(renamed)
    assert all(torch.equal(loaded[k], renamed[k]) for k in loaded)


def test_lora_of_a_quantized_flux1_base_loads_into_the_unquantized_family(tmp_path):
    quantized = MosaicFluxFamily.tiny(quantize="int8")
    quantized.add_lora(rank=2)
    with torch.no_grad():
        for p in quantized.trainable_parameters():
            p.normal_()
    file = quantized.save_lora(tmp_path / "lora.safetensors")
    plain = MosaicFluxFamily.tiny()
    plain.load_lora(file)
    a, b = quantized.lora_parameters(), plain.lora_parameters()
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_quantization_configs():
    assert quantization_config("none") is None and pipeline_quantization_config("none") is None
    assert type(quantization_config("fp8").quant_type).__name__ == "Float8WeightOnlyConfig"
    assert list(pipeline_quantization_config("int8").quant_mapping) == ["transformer"]
    model = Flux2Family.tiny().transformer
    assert quantize_transformer(model, "none") is model
    with pytest.raises(ValueError, match=r"`quantize` to be one of .* but got 'int4'"):
        quantize_transformer(model, "int4")


def test_moving_a_family_with_a_quantized_base_casts_only_the_other_modules():
    """diffusers refuses to cast a quantized model; ``family.to(device, dtype)`` (what the trainer
    does for bf16 runs) casts the encoders and the VAE and only moves the quantized transformer."""
    family = Flux2Family.tiny(quantize="int8")
    norm = family.transformer.transformer_blocks[0].attn.norm_q.weight
    family.to("cpu", torch.bfloat16)
    assert family.pipe.vae.dtype == torch.bfloat16 and family.pipe.text_encoder.dtype == torch.bfloat16
    assert norm.dtype == torch.float32  # the quantized model keeps the dtypes it was loaded with
    assert type(family.transformer.transformer_blocks[0].attn.to_q.weight).__name__ == "Int8Tensor"
