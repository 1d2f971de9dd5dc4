"""The capture processors' handle (mosaic_kit.models.insequence) under what diffusers and users do to it.

- diffusers rebuilds processors with ``type(processor)()`` when it loads a FLUX IP-adapter and when
  a pipeline unloads one (FLUX, SD3): a capture processor built with no arguments is the stock one,
  and the IP-adapter loads, runs and unloads with the processors installed, idle or active;
- one capture per forward: a second forward into the same capture, a capture already fed, and a
  nested ``handle.capture(...)`` are refused with a clear error (a checkpoint's recomputation in
  backward still feeds, see tests/models/test_models_insequence.py).
"""

from __future__ import annotations

import types

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import FluxTransformer2DModel, SD3Transformer2DModel  # noqa: E402
from diffusers.loaders.ip_adapter import FluxIPAdapterMixin, SD3IPAdapterMixin  # noqa: E402
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor, FluxIPAdapterAttnProcessor  # noqa: E402

from mosaic_kit.attention import RefTargetCapture  # noqa: E402
from mosaic_kit.correspondence import Correspondences  # noqa: E402
from mosaic_kit.models import (  # noqa: E402
    Flux2CaptureProcessor,
    Flux2ParallelCaptureProcessor,
    FluxCaptureProcessor,
    QwenCaptureProcessor,
    SD3CaptureProcessor,
    SequenceLayout,
    install_capture_processors,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (tests/conftest.py)

JOINT, TEXT, TGT, REF = 32, 6, 12, 2  # 16 image tokens: a 12-token target and two 2-token references


def _flux():
    """The tiny FLUX.1 of diffusers' own transformer tests (one double and one single block)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                      attention_head_dim=16, num_attention_heads=2, joint_attention_dim=JOINT,
                                      pooled_projection_dim=JOINT, axes_dims_rope=(4, 4, 8))


def _flux_inputs(ip_adapter=False):
    gen = torch.Generator().manual_seed(1)
    inputs = dict(
        hidden_states=torch.randn(1, TGT + 2 * REF, 4, generator=gen),
        encoder_hidden_states=torch.randn(1, TEXT, JOINT, generator=gen),
        pooled_projections=torch.randn(1, JOINT, generator=gen),
        img_ids=torch.randn(TGT + 2 * REF, 3, generator=gen), txt_ids=torch.randn(TEXT, 3, generator=gen),
        timestep=torch.tensor([1.0]),
    )
    if ip_adapter:  # a fresh dict per call: the forward pops the embeddings from it
        inputs["joint_attention_kwargs"] = {"ip_adapter_image_embeds": [torch.randn(1, 1, JOINT, generator=gen)]}
    return inputs


def _flux_ip_adapter_state_dict(model):
    """A random FLUX IP-adapter in the layout `_load_ip_adapter_weights` reads: per double block
    the image key/value projections, and an image projection to 4 image tokens."""
    gen = torch.Generator().manual_seed(2)
    hidden = model.inner_dim
    ip = {}
    double = [n for n in model.attn_processors if not n.startswith("single_transformer_blocks")]
    for i in range(len(double)):
        for name in ("to_k_ip", "to_v_ip"):
            ip[f"{i}.{name}.weight"] = torch.randn(hidden, JOINT, generator=gen) * 0.1
            ip[f"{i}.{name}.bias"] = torch.randn(hidden, generator=gen) * 0.1
    image_proj = {"proj.weight": torch.randn(4 * JOINT, JOINT, generator=gen) * 0.1,
                  "proj.bias": torch.zeros(4 * JOINT), "norm.weight": torch.ones(JOINT), "norm.bias": torch.zeros(JOINT)}
    return {"image_proj": image_proj, "ip_adapter": ip}


def _corr():
    return Correspondences.from_dicts([[{0: 1, 1: 5}, {0: 7}]], ref_tokens=[REF, REF], tgt_tokens=TGT)


def _layout():
    return SequenceLayout.concatenated(TGT, [REF, REF])


def _out(model, inputs):
    return model(**inputs, return_dict=False)[0]


@pytest.mark.parametrize("cls", [FluxCaptureProcessor, Flux2CaptureProcessor, Flux2ParallelCaptureProcessor,
                                 SD3CaptureProcessor, QwenCaptureProcessor])
def test_a_processor_built_without_arguments_is_detached_and_the_stock_one(cls):
    processor = cls()  # what diffusers' `type(processor)()` does
    assert processor.detached and not processor.active
    with pytest.raises(TypeError, match="state"):
        cls(block="transformer_blocks.0")
    with pytest.raises(TypeError, match="state"):
        cls(object(), "transformer_blocks.0")


def test_detached_processors_give_the_stock_output_and_install_accepts_them():
    model, inputs = _flux(), _flux_inputs()
    with torch.no_grad():
        stock = _out(model, inputs)
        model.set_attn_processor(FluxCaptureProcessor())
        assert torch.equal(_out(model, inputs), stock)
        handle = install_capture_processors(model)  # detached processors are stock ones: accepted
        with handle.capture(RefTargetCapture(_corr()), _layout()) as capture:
            assert torch.equal(_out(model, inputs), stock)
    assert capture.num_blocks == 2


@pytest.mark.parametrize("active", [False, True], ids=["idle", "active"])
def test_flux_ip_adapter_loads_and_unloads_with_the_processors_installed(active):
    """diffusers' TestFluxTransformerIPAdapter::test_load_ip_adapter, and the pipeline's unloading,
    on the same tiny model: with the processors installed the outputs are the stock model's."""
    stock_model, model = _flux(), _flux()
    handle = install_capture_processors(model)
    with torch.no_grad():
        no_adapter = _out(stock_model, _flux_inputs())
        if active:
            with handle.capture(RefTargetCapture(_corr()), _layout()) as capture:
                assert torch.equal(_out(model, _flux_inputs()), no_adapter)
            assert capture.num_blocks == 2
        state_dict = _flux_ip_adapter_state_dict(model)
        stock_model._load_ip_adapter_weights([state_dict])
        model._load_ip_adapter_weights([state_dict])  # single blocks: `type(processor)()`
        assert any(isinstance(p, FluxIPAdapterAttnProcessor) for p in model.attn_processors.values())
        with_adapter = _out(model, _flux_inputs(ip_adapter=True))
        assert not torch.allclose(with_adapter, no_adapter, atol=1e-4, rtol=1e-4)
        assert torch.equal(with_adapter, _out(stock_model, _flux_inputs(ip_adapter=True)))
        # the handle no longer feeds every block it chose: refused, naming them
        assert not handle.installed
        with pytest.raises(ValueError, match=r"transformer_blocks\.0.*FluxIPAdapterAttnProcessor"):
            handle.set_capture(RefTargetCapture(_corr()), _layout())
        # a pipeline's unload_ip_adapter rebuilds every processor with `type(processor)()`
        FluxIPAdapterMixin.unload_ip_adapter(types.SimpleNamespace(transformer=model))
        FluxIPAdapterMixin.unload_ip_adapter(types.SimpleNamespace(transformer=stock_model))
        assert torch.equal(_out(model, _flux_inputs()), no_adapter)
        handle.remove()  # puts back the original on the block whose processor diffusers rebuilt
        assert all(type(p) is FluxAttnProcessor for p in model.attn_processors.values())
        handle = install_capture_processors(model)
        with handle.capture(RefTargetCapture(_corr()), _layout()) as capture:
            assert torch.equal(_out(model, _flux_inputs()), no_adapter)
    assert capture.num_blocks == 2


def test_sd3_pipeline_unload_ip_adapter_with_the_processors_installed():
    """SD3's unload rebuilds every processor, `attn2`'s included, with `type(processor)()`."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                      num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                      pooled_projection_dim=16, out_channels=4, pos_embed_max_size=8,
                                      dual_attention_layers=(0,))
    gen = torch.Generator().manual_seed(3)
    inputs = dict(hidden_states=torch.randn(1, 4, 4, 12, generator=gen), encoder_hidden_states=torch.randn(1, 3, 16, generator=gen),
                  pooled_projections=torch.randn(1, 16, generator=gen), timestep=torch.tensor([500.0]))
    with torch.no_grad():
        stock = _out(model, inputs)
        handle = install_capture_processors(model)
        SD3IPAdapterMixin.unload_ip_adapter(types.SimpleNamespace(transformer=model))
        assert all(p.detached for p in model.attn_processors.values() if isinstance(p, SD3CaptureProcessor))
        assert torch.equal(_out(model, inputs), stock)
        assert not handle.installed
        handle.remove()
        handle = install_capture_processors(model)
        layout = SequenceLayout.from_canvas((2, 6), target=(0, 0, 2, 2), references=[(0, 2, 2, 2), (0, 4, 2, 2)])
        corr = Correspondences.from_dicts([[{0: 0}, {1: 1}]], ref_tokens=[4, 4], tgt_tokens=4)
        with handle.capture(RefTargetCapture(corr), layout) as capture:
            assert torch.equal(_out(model, inputs), stock)
    assert capture.num_blocks == 2


def test_one_capture_serves_one_forward():
    model, inputs = _flux(), _flux_inputs()
    handle = install_capture_processors(model)
    capture = RefTargetCapture(_corr())
    with torch.no_grad():
        with handle.capture(capture, _layout()):
            _out(model, inputs)
            with pytest.raises(ValueError, match=r"block 'transformer_blocks\.0' fed the active capture a second time"):
                _out(model, inputs)
        # the same capture, fed, set again without reset()
        with pytest.raises(ValueError, match=r"already fed by 2 block"):
            handle.set_capture(capture, _layout())
        capture.reset()
        with handle.capture(capture, _layout()):
            _out(model, inputs)
    assert capture.num_blocks == 2


def test_nested_capture_is_refused_and_leaves_the_outer_one_feeding():
    model, inputs = _flux(), _flux_inputs()
    handle = install_capture_processors(model)
    outer, inner = RefTargetCapture(_corr()), RefTargetCapture(_corr())
    with torch.no_grad(), handle.capture(outer, _layout()):
        with pytest.raises(ValueError, match="nested"):
            with handle.capture(inner, _layout()):
                pass  # pragma: no cover - never entered
        assert handle.active
        _out(model, inputs)
    assert (outer.num_blocks, inner.num_blocks) == (2, 0)
    assert not handle.active


def test_set_capture_after_remove_is_refused():
    model = _flux()
    handle = install_capture_processors(model)
    handle.remove()
    assert not handle.installed
    with pytest.raises(ValueError, match="remove"):
        handle.set_capture(RefTargetCapture(_corr()), _layout())
