"""The Qwen-Image-Edit-Plus family against the stock `QwenImageEditPlusPipeline`: what a pipeline
call feeds its transformer (with PIL references) is the family's encoding bit for bit, the
family's forward is the transformer's prediction in that call, the LoRA file loads with the stock
``load_lora_weights``, changes the output and ``disable_lora()`` restores it; the 2509 transformer
(no ``zero_cond_t``) and the capture; bad options refused."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from mosaic_kit.attention import RefTargetCapture  # noqa: E402
from mosaic_kit.correspondence import Correspondences  # noqa: E402
from mosaic_kit.models.qwen import QwenEditPlusFamily  # noqa: E402
from mosaic_kit.utils.images import tensor_to_pil  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _eight_bit(*shape, seed=0):
    """Images whose values are k/255, so a PIL round trip keeps them exactly."""
    return torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(seed)).float() / 255


def _stock_call(family, prompt, references, size, steps=1):
    """Runs the stock pipeline (the family's image areas) and returns the transformer's first call:
    its keyword arguments and its output."""
    calls = []

    def keep(module, args, kwargs, output):
        calls.append((dict(kwargs), output[0]))

    handle = family.transformer.register_forward_hook(keep, with_kwargs=True)
    try:
        with family.image_sizes():
            family.pipe(image=[tensor_to_pil(r) for r in references], prompt=prompt, height=size[0], width=size[1],
                        num_inference_steps=steps, true_cfg_scale=1.0, generator=torch.Generator().manual_seed(0),
                        output_type="pt")
    finally:
        handle.remove()
    return calls[0]


@pytest.mark.parametrize("zero_cond_t", [True, False])  # 2511, 2509
def test_encoding_and_forward_equal_what_the_stock_pipeline_runs(zero_cond_t):
    # references of 32×64 px: the pipeline keeps them at that size for VAE_IMAGE_SIZE = 32·64
    family = QwenEditPlusFamily.tiny(seed=1, transformer_overrides={"zero_cond_t": zero_cond_t},
                                     vae_image_size=32 * 64)
    references = _eight_bit(2, 3, 32, 64)
    kwargs, output = _stock_call(family, "a red cube", references, (32, 48))
    inputs = family.encode(None, ["a red cube"], references[None], target_size=(32, 48))
    n_tgt = inputs.layout.target_grid.num_tokens
    assert n_tgt == 6 and inputs.layout.reference_token_counts == (8, 8)
    assert kwargs["img_shapes"] == inputs.conditioning["img_shapes"] == [[(1, 2, 3), (1, 2, 4), (1, 2, 4)]]
    assert torch.equal(kwargs["encoder_hidden_states"], inputs.conditioning["encoder_hidden_states"])
    assert kwargs["encoder_hidden_states_mask"] is None and inputs.conditioning["encoder_hidden_states_mask"] is None
    assert torch.equal(kwargs["hidden_states"][:, n_tgt:], inputs.conditioning["reference_tokens"])
    with torch.no_grad():
        prediction = family.forward(inputs, kwargs["hidden_states"][:, :n_tgt], kwargs["timestep"])
    assert torch.equal(prediction, output[:, :n_tgt])


def test_text_encoder_sees_every_reference_as_a_picture(monkeypatch):
    family = QwenEditPlusFamily.tiny()
    seen = []
    original = type(family.pipe.processor).__call__

    def spy(self, *args, **kwargs):
        seen.append((kwargs["text"], [image.size for image in kwargs["images"]]))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(family.pipe.processor), "__call__", spy)
    family.encode(torch.rand(1, 3, 32, 32), ["a cat"], torch.rand(1, 3, 3, 32, 16))
    (text,), sizes = seen[0]
    assert text.count("<|image_pad|>") == 3 and "Picture 3: <|vision_start|>" in text and "Picture 4" not in text
    assert sizes == [(32, 96)] * 3  # calculate_dimensions(64², 1/2): w = √2048 → 32, h = 90.5 → 96 (multiples of 32)


def test_lora_loads_with_stock_load_lora_weights_changes_the_output_and_disable_lora_restores_it(tmp_path):
    from diffusers import QwenImageEditPlusPipeline

    from mosaic_kit.models.qwen.tiny import tiny_qwen_edit_plus_components

    trained = QwenEditPlusFamily.tiny(seed=2)
    trained.add_lora(rank=4, alpha=2.0, init=False)
    folder = trained.save_lora(tmp_path).parent
    stock = QwenImageEditPlusPipeline(**tiny_qwen_edit_plus_components(seed=2))  # a fresh stock pipeline
    stock.set_progress_bar_config(disable=True)
    family = QwenEditPlusFamily(stock, vae_image_size=32 * 32, condition_image_size=64 * 64)
    references = [tensor_to_pil(r) for r in _eight_bit(2, 3, 32, 32)]

    def run():
        with family.image_sizes():
            return stock(image=references, prompt="a cat", height=32, width=32, num_inference_steps=2,
                         true_cfg_scale=1.0, generator=torch.Generator().manual_seed(0), output_type="pt").images

    base = run()
    stock.load_lora_weights(str(folder))
    assert stock.transformer.active_adapters() == ["default_0"]
    with_lora = run()
    assert not torch.allclose(with_lora, base, atol=1e-4)  # the LoRA changes the output
    with torch.no_grad():  # alpha from the file's metadata: the stock transformer is the trained one
        kwargs = dict(hidden_states=torch.randn(1, 12, 16), encoder_hidden_states=torch.randn(1, 5, 16),
                      timestep=torch.tensor([0.5]), img_shapes=[[(1, 2, 2), (1, 2, 2), (1, 2, 2)]], return_dict=False)
        assert torch.equal(stock.transformer(**kwargs)[0], trained.transformer(**kwargs)[0])
    stock.disable_lora()
    assert torch.equal(run(), base)


def test_capture_sees_every_block_and_trains_the_lora():
    family = QwenEditPlusFamily.tiny()
    family.add_lora(rank=2, init=False)
    family.set_trainable("lora")
    inputs = family.encode(torch.rand(1, 3, 32, 32), ["a cat"], torch.rand(1, 2, 3, 32, 32))
    corr = Correspondences.from_dicts([[{0: 1, 3: 2}, {1: 0}]], ref_tokens=[4, 4], tgt_tokens=4)
    capture = RefTargetCapture(corr)
    prediction = family.forward(inputs, torch.randn(1, 4, 16), torch.tensor([0.6]), capture=capture)
    result = capture.result()
    assert result.num_blocks == 2 and prediction.shape == (1, 4, 16)
    result.pair_log_probs.sum().backward()
    grads = [p.grad for name, p in family.transformer.named_parameters() if "to_q.lora_A" in name]
    assert grads and all(g is not None and bool(g.abs().sum() > 0) for g in grads)


@pytest.mark.parametrize("options, message", [
    ({"condition_image_size": 0}, "`condition_image_size` to be a positive int"),
    ({"vae_image_size": 12.5}, "`vae_image_size` to be a positive int"),
    ({"capture_blocks": "single"}, "`capture_blocks` 'all', 'double'"),
    ({"negative_prompt": None}, "`negative_prompt` to be a string"),
])
def test_bad_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        QwenEditPlusFamily.tiny(**options)


def test_bad_uses_are_refused():
    with pytest.raises(ValueError, match="`factor` to be a power of two"):
        QwenEditPlusFamily.tiny(pixel_space=3)
    with pytest.raises(ValueError, match="QwenImageTransformer2DModel"):
        QwenEditPlusFamily(object())
    family = QwenEditPlusFamily.tiny()
    with pytest.raises(ValueError, match="at least one reference"):
        family.sample("a cat", [], 32, 32, num_inference_steps=1)
    with pytest.raises(ValueError, match="`targets` or `target_size`"):
        family.encode(None, ["a cat"])
    with pytest.raises(ValueError, match="add a LoRA first"):
        family.trainable_parameters("lora")


def test_lora_writer_takes_the_trainers_format_records_a_digest_and_load_refuses_a_changed_file(tmp_path):
    # the trainer's checkpoints call save_lora(path, state_dict=..., format=...): the Qwen family's
    # writer is the in-sequence base's (digest added, ComfyUI refused without a key map)
    from safetensors import safe_open
    from safetensors.torch import save_file

    from mosaic_kit.models import LORA_DIGEST_KEY

    family = QwenEditPlusFamily.tiny()
    family.add_lora(rank=2, init=False)
    file = family.save_lora(tmp_path / "lora.safetensors", format="diffusers")
    with safe_open(file, framework="pt") as written:
        metadata, tensors = written.metadata(), {key: written.get_tensor(key) for key in written.keys()}
    assert LORA_DIGEST_KEY in metadata and "lora_adapter_metadata" in metadata
    fresh = QwenEditPlusFamily.tiny()
    fresh.load_lora(file)
    assert all(torch.equal(fresh.lora_parameters()[k], v) for k, v in family.lora_parameters().items())
    key = sorted(tensors)[0]
    save_file({**tensors, key: tensors[key] + 1}, str(tmp_path / "changed.safetensors"), metadata=metadata)
    with pytest.raises(ValueError, match="is damaged"):
        QwenEditPlusFamily.tiny().load_lora(tmp_path / "changed.safetensors")
    with pytest.raises(NotImplementedError, match="ComfyUI key map"):
        family.save_lora(tmp_path / "comfy.safetensors", format="comfyui")


def test_pixel_space_family_round_trips_images_and_keeps_the_pipeline_layout():
    """``pixel_space`` (the synthetic world's CPU ablation): the stock pipeline's own steps encode
    pixels losslessly, laid out as with the VAE; the stock pipeline samples through it."""
    from PIL import Image

    family = QwenEditPlusFamily.tiny(pixel_space=2)
    assert family.pipe.vae_scale_factor == 2 and family.pixels_per_token == 4
    assert (family.transformer.config.in_channels, family.transformer.config.out_channels) == (48, 12)
    images, references = _eight_bit(2, 3, 64, 32), _eight_bit(2, 2, 3, 32, 32, seed=1)
    inputs = family.encode(images, ["a", "b"], references)
    assert inputs.target.shape == (2, 16 * 8, 48)  # one token = 4 × 4 pixels, 4·3·2² channels
    assert inputs.layout.reference_token_counts == (64, 64)
    assert inputs.conditioning["img_shapes"][0] == [(1, 16, 8), (1, 8, 8), (1, 8, 8)]
    torch.testing.assert_close(family.decode(inputs.target, 64, 32), images, rtol=0, atol=1e-6)
    out = family.forward(inputs, torch.randn(2, 128, 48), torch.tensor([0.5, 0.5]))
    assert out.shape == (2, 128, 48) and torch.isfinite(out).all()
    image = family.sample("a cat", [Image.new("RGB", (32, 32), "red")], 32, 32, num_inference_steps=1)
    assert image.size == (32, 32)
    with pytest.raises(ValueError, match=r"\(B, C, frames, H, W\)"):
        family.pipe.vae.encode(torch.zeros(1, 3, 8, 8))
