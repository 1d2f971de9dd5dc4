"""The forward benchmark compares like with like, and runs."""

from __future__ import annotations

import json

import pytest
from helpers import load_script
import torch

pytest.importorskip("diffusers")

from mosaic_kit.models import MosaicFluxTransformer, add_reference_lora  # noqa: E402
from mosaic_kit.models.testing import random_packed_inputs, tiny_flux_transformer  # noqa: E402



def load_bench():
    return load_script("benchmarks/bench_forward.py", "bench_forward")


@pytest.mark.parametrize("sizes", [[(32, 32)], [(32, 32), (32, 32), (32, 32)]])
def test_released_style_attention_computes_the_same_prediction(sizes):
    bench = load_bench()
    transformer = tiny_flux_transformer()
    add_reference_lora(transformer, rank=4)
    with torch.no_grad():
        for name, param in transformer.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    model = MosaicFluxTransformer(transformer.double())
    inputs = random_packed_inputs(transformer, batch=2, reference_sizes=sizes, dtype=torch.float64)
    ours = model(**inputs)
    transformer.set_attn_processor(bench._released_processor_class()())
    released = model(**inputs)
    torch.testing.assert_close(released, ours, rtol=1e-10, atol=1e-10)


def test_released_style_losses_equal_the_capture_losses():
    from mosaic_kit.attention import RefTargetCapture
    from mosaic_kit.correspondence import Correspondences
    from mosaic_kit.losses.functional import mdl, scal

    bench = load_bench()
    dicts = [{0: 1, 2: 3}, {1: 0, 3: 2}]
    corr = Correspondences.from_dicts([dicts], ref_tokens=[4, 4], tgt_tokens=5)
    gen = torch.Generator().manual_seed(0)
    queries = [torch.randn(1, 2, 8, 8, generator=gen, dtype=torch.float64) for _ in range(2)]
    keys = [torch.randn(1, 2, 5, 8, generator=gen, dtype=torch.float64) for _ in range(2)]
    released = bench.released_losses(dicts, [4, 4], queries, keys)
    capture = RefTargetCapture(corr, aggregate="all")
    for q, k in zip(queries, keys):
        capture.add(q, k)
    result = capture.result()
    ours = 0.1 * scal(result, corr, reduction="pooled", eps=1e-9) + mdl(result, corr, divergence="jsd")
    torch.testing.assert_close(torch.as_tensor(released, dtype=torch.float64), ours.double(), rtol=1e-6, atol=1e-8)


@pytest.mark.slow
def test_benchmark_runs_and_writes_its_report(tmp_path):
    out = tmp_path / "forward.json"
    report = load_bench().main(["--preset", "tiny", "--refs", "2", "--modes", "infer,train+losses", "--repeats", "1",
                                "--out", str(out)])
    saved = json.loads(out.read_text())
    methods = {(r["mode"], r["method"]) for r in saved["results"]}
    assert methods == {("infer", "released"), ("infer", "mosaic"), ("infer", "mosaic-cache"),
                       ("train+losses", "released"), ("train+losses", "mosaic")}
    assert all(r["time_ms"] > 0 for r in report["results"])
    assert saved["hardware"]["device"] == "cpu"
