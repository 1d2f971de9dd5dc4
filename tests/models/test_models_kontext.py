"""The FLUX.1-Kontext family: reference position ids as ComfyUI's
``FluxKontextMultiReferenceLatentMethod`` defines them (against a slow twin that counts in latent
cells and rounds to tokens as ComfyUI does), the stock ids for one reference, K-reference
sampling that equals the stock `FluxKontextPipeline` for one reference (with the family's LoRA
loaded by the stock ``load_lora_weights``), the capture, and the trainer on the tiny config."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("diffusers")

from diffusers import FluxKontextPipeline  # noqa: E402
from PIL import Image  # noqa: E402

from mosaic_kit.attention import RefTargetCapture  # noqa: E402
from mosaic_kit.correspondence import Correspondences  # noqa: E402
from mosaic_kit.models.flux.tiny import tiny_flux_components  # noqa: E402
from mosaic_kit.models.kontext import REFERENCE_METHODS, KontextFamily, kontext_reference_ids  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
CONFIG = Path(__file__).resolve().parents[2] / "recipes" / "configs" / "tiny_kontext_cpu.yaml"


def _comfy_ids(target_cells, reference_cells, method, scale=1):
    """ComfyUI's rule, counted as it counts: sizes and offsets in latent cells (patch 2), each
    offset rounded to tokens with ``(cells + 1) // 2``, ids one token at a time."""
    rows = []
    h = w = 0
    index = 0
    for ref_h, ref_w in reference_cells:
        if method == "index":
            index += scale
            h_off = w_off = 0
        elif method == "uxo":
            index = 0
            h_off, w_off = (target_cells[0] + 1) // 2 * 2 + h, (target_cells[1] + 1) // 2 * 2 + w
            h, w = h + ref_h, w + ref_w
        else:
            index, h_off, w_off = 1, 0, 0
            if ref_h + h > ref_w + w:
                w_off = w
            else:
                h_off = h
            h, w = max(h, ref_h + h_off), max(w, ref_w + w_off)
        for i in range((ref_h + 1) // 2):
            for j in range((ref_w + 1) // 2):
                rows.append([index, i + (h_off + 1) // 2, j + (w_off + 1) // 2])
    return torch.tensor(rows, dtype=torch.float32)


@settings(max_examples=40, deadline=None)
@given(method=st.sampled_from(REFERENCE_METHODS), target=st.tuples(st.integers(1, 4), st.integers(1, 4)),
       refs=st.lists(st.tuples(st.integers(1, 4), st.integers(1, 4)), min_size=1, max_size=4))
def test_reference_ids_are_comfyuis(method, target, refs):
    expected = _comfy_ids([2 * v for v in target], [(2 * h, 2 * w) for h, w in refs], method)
    assert torch.equal(kontext_reference_ids(target, refs, method), expected)


def test_the_methods_place_references_as_the_node_describes():
    refs = [(2, 2), (2, 2), (2, 2)]
    offset = kontext_reference_ids((2, 2), refs, "offset").view(3, 4, 3)
    assert offset[:, :, 0].unique().tolist() == [1.0]  # every reference at index 1 ...
    assert [tuple(r[0, 1:].tolist()) for r in offset] == [(0, 0), (2, 0), (0, 2)]  # ... tiled, not overlapping
    index = kontext_reference_ids((2, 2), refs, "index").view(3, 4, 3)
    assert index[:, 0, 0].tolist() == [1, 2, 3] and all(torch.equal(r[:, 1:], index[0, :, 1:]) for r in index)
    uxo = kontext_reference_ids((2, 2), refs, "uxo").view(3, 4, 3)
    assert uxo[:, :, 0].unique().tolist() == [0.0]
    assert [tuple(r[0, 1:].tolist()) for r in uxo] == [(2, 2), (4, 4), (6, 6)]  # diagonal past the target
    with pytest.raises(ValueError, match="method"):
        kontext_reference_ids((2, 2), refs, "side")
    with pytest.raises(ValueError, match="positive ints"):
        kontext_reference_ids((2, 0), refs)


@pytest.fixture(scope="module")
def family():
    return KontextFamily.tiny(seed=2)


@pytest.mark.parametrize("method", ["offset", "index"])
def test_one_reference_gets_the_stock_pipelines_ids(family, method):
    family.reference_method = method
    try:
        inputs = family.encode(torch.rand(1, 3, 32, 48), ["a"], torch.rand(1, 1, 3, 48, 32))
    finally:
        family.reference_method = "offset"
    _, _, latent_ids, image_ids = family.pipe.prepare_latents(torch.rand(1, 3, 48, 32), 1, 4, 32, 48, torch.float32,
                                                              "cpu", torch.Generator().manual_seed(0))
    assert torch.equal(inputs.conditioning["latent_ids"], latent_ids)
    assert torch.equal(inputs.conditioning["reference_ids"], image_ids)


def test_bad_options_are_refused(family):
    with pytest.raises(ValueError, match="reference_method"):
        KontextFamily(family.pipe, reference_method="side")
    with pytest.raises(ValueError, match="FluxTransformer2DModel"):
        KontextFamily(object())
    with pytest.raises(ValueError, match="max_sequence_length"):
        KontextFamily(family.pipe, max_sequence_length=0)


def test_the_capture_is_fed_by_every_block(family):
    inputs = family.encode(torch.rand(1, 3, 32, 32), ["a"], torch.rand(1, 2, 3, 32, 32))
    corr = Correspondences.from_dicts([[{0: 1, 3: 2}, {1: 0}]], ref_tokens=[4, 4], tgt_tokens=4)
    capture = RefTargetCapture(corr)
    family.forward(inputs, torch.randn(1, 4, 16), torch.tensor([0.5]), capture=capture)
    result = capture.result()
    assert result.num_blocks == 4 and torch.isfinite(result.pair_log_probs).all()


def _pil(seed, size):
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(size[1], size[0], 3, generator=g) * 255).to(torch.uint8).numpy())


def test_sampling_one_reference_equals_the_stock_pipeline_with_the_lora_it_loads(tmp_path):
    trained = KontextFamily.tiny(seed=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        trained.add_lora(rank=4, alpha=2.0, init=False)
    trained.save_lora(tmp_path)
    stock = FluxKontextPipeline(**tiny_flux_components(seed=2))
    stock.set_progress_bar_config(disable=True)
    reference = _pil(1, (32, 48))

    def generate(pipe):
        return np.asarray(pipe(image=reference, prompt="a cat", height=32, width=32, num_inference_steps=2,
                               generator=torch.Generator().manual_seed(0), max_sequence_length=32, max_area=32 * 32,
                               _auto_resize=False).images[0])

    before = generate(stock)
    stock.load_lora_weights(str(tmp_path))
    with_lora = generate(stock)
    assert not np.array_equal(before, with_lora)  # the LoRA changes the output
    for method in ("offset", "index"):
        ours = trained.sample("a cat", [reference], 32, 32, num_inference_steps=2,
                              generator=torch.Generator().manual_seed(0), reference_method=method)
        assert np.array_equal(np.asarray(ours), with_lora), method


def test_sampling_k_references_depends_on_the_method(family):
    refs = [_pil(k, (32, 32)) for k in range(3)]
    images = {m: np.asarray(family.sample("a", refs, 32, 32, 2, generator=torch.Generator().manual_seed(0),
                                          reference_method=m)) for m in REFERENCE_METHODS}
    assert images["offset"].shape == (32, 32, 3)
    assert not np.array_equal(images["offset"], images["index"]) and not np.array_equal(images["index"], images["uxo"])


def test_tiny_kontext_config_trains_with_finite_losses(tmp_path):
    from mosaic_kit.training import MosaicTrainer, config_from_dict

    raw = yaml.safe_load(CONFIG.read_text())
    raw.update(output_dir=str(tmp_path / "run"), max_steps=4, checkpoint_every=4, log_every=2, validation_samples=1)
    trainer = MosaicTrainer(config_from_dict(raw), progress=False)
    assert trainer.train()["steps"] == 4 and type(trainer.family).__name__ == "KontextFamily"
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(np.isfinite(r["scal"]) and r["scal"] > 0 and np.isfinite(r["mdl"]) for r in rows if "scal" in r)
    assert (tmp_path / "run" / "pytorch_lora_weights.safetensors").is_file()
    assert (tmp_path / "run" / "samples" / "step-0000004.png").is_file()  # sampled by the family's K-reference loop


@pytest.mark.parametrize("into", ["flux2", "qwen_edit_plus"])
def test_a_kontext_lora_in_another_model_is_hinted_to_kontext_not_flux1(tmp_path, into):
    """The hint comes from what the families declare (architecture, LoRA targets): a Kontext LoRA
    has FLUX.1's module names, but only the Kontext family loads its text-stream projections."""
    from mosaic_kit.pipelines import build_family

    kontext = KontextFamily.tiny()
    kontext.add_lora(rank=2)
    file = kontext.save_lora(tmp_path)
    with pytest.raises(ValueError, match="made for FLUX.1") as error:
        build_family(into).load_lora(file)
    message = str(error.value)
    assert message.endswith("Load it with `KontextFamily` (training: `model.family: kontext`).") and "flux1" not in message
    flux1 = build_family("flux1")  # a FLUX.1 reference LoRA still goes to the FLUX.1 family
    flux1.add_lora(rank=2)
    with pytest.raises(ValueError, match=r"Load it with `MosaicFluxFamily` \(training: `model.family: flux1`\)\.$"):
        build_family(into).load_lora(flux1.save_lora(tmp_path / "flux1.safetensors"))
