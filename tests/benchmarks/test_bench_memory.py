"""The memory benchmark: its fake-tensor measurement equals a real CPU run, its configurations are
the real architectures, its GPU autocast policy is CUDA's, and its command line runs."""

from __future__ import annotations

import json

import pytest
from helpers import load_script
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")


def load_bench():
    return load_script("benchmarks/bench_memory.py", "bench_memory")


def _fake_and_real(name: str, mode: str, quantize: str = "none"):
    bench = load_bench()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fake = bench.measure_fake(bench.CONFIGS[name], mode, flops=False, quantize=quantize)
        real = bench.measure_real(bench.CONFIGS[name], mode, "cpu", quantize=quantize)
    finally:
        torch.set_num_threads(threads)
    return bench, fake, real


def _check_agreement(fake, real, tolerance=0.05):
    held = real["held_bytes"]  # weights, optimiser state, EMA and inputs before the step
    # the whole peak, and what the step itself adds (activations, gradients, temporaries)
    assert abs(real["allocator_peak_bytes"] / fake["peak_bytes"] - 1) < tolerance
    step_fake, step_real = fake["peak_bytes"] - held, real["allocator_peak_bytes"] - held
    assert step_real > 0 and step_fake > 0
    assert abs(step_real / step_fake - 1) < tolerance, (step_fake, step_real)
    # MemTracker over the real tensors sees what it saw over the fake ones
    assert abs(real["peak_bytes"] / fake["peak_bytes"] - 1) < tolerance


def test_fake_measurement_equals_a_real_cpu_run_on_a_small_model():
    """A small FLUX.2 (4 heads × 64, 1 + 1 blocks, 256² target and two 256² references) with
    MOSAIC: the fake peak and the CPU allocator's peak of the same step agree within 5 %
    (measured: 0.1 % of the step's own share). On the tiny test models a few tens of KB of small
    allocations outside torch's operators (the profiler's, Python scalars) are a quarter of the
    step, so the check needs a model whose activations dominate."""
    _, fake, real = _fake_and_real("small-flux2", "mosaic")
    _check_agreement(fake, real)
    assert fake["lora_bytes"] == real["lora_bytes"] and fake["base_bytes"] == real["base_bytes"]


@pytest.mark.slow
@pytest.mark.parametrize("name,mode", [("real-width-flux2", "plain"), ("real-width-flux2", "mosaic"),
                                       ("real-width-flux2", "dense"), ("real-width-flux1", "mosaic"),
                                       ("small-flux1", "dense")])
def test_fake_measurement_equals_a_real_cpu_run_at_real_width(name, mode):
    """FLUX.2 [klein] 4B and FLUX.1-dev at real width (24 heads × 128, MLP 9216 / 12288, text
    width 7680 / 4096), 1 double + 1 single block, short sequences: the fake peak and the CPU
    allocator's peak of the same step agree within 5 % (measured: within 0.1 %), the step's own
    share included."""
    _, fake, real = _fake_and_real(name, mode)
    _check_agreement(fake, real)
    if name.startswith("real-width"):
        assert fake["base_bytes"] > 5e8  # real width: the blocks and embedders hold ≥ 0.5 GB of bf16 weights


def test_real_configurations_have_the_published_sizes():
    """Each real configuration builds the published architecture (parameters on meta)."""
    from diffusers import Flux2Transformer2DModel, FluxTransformer2DModel, QwenImageTransformer2DModel

    bench = load_bench()
    expected = {  # billions of parameters: the models' names
        "flux1-dev-k2": (FluxTransformer2DModel, 11.5, 12.2),
        "klein-4b-512": (Flux2Transformer2DModel, 3.5, 4.2),
        "klein-9b-512": (Flux2Transformer2DModel, 8.5, 9.5),
        "flux2-dev-512": (Flux2Transformer2DModel, 31.0, 33.0),
        "qwen-edit-plus-k3": (QwenImageTransformer2DModel, 19.5, 21.0),
    }
    for name, (cls, low, high) in expected.items():
        with torch.device("meta"):
            model = cls(**bench.CONFIGS[name]["transformer"])
        billions = sum(p.numel() for p in model.parameters()) / 1e9
        assert low < billions < high, (name, billions)
    assert set(bench.REAL) >= set(expected)


def test_gpu_autocast_policy_runs_cudas_float32_ops_in_float32():
    bench = load_bench()
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert x.softmax(-1).dtype == torch.bfloat16  # CPU autocast's own policy
        with bench.GpuAutocastPolicy():
            assert x.softmax(-1).dtype == torch.float32
            assert torch.nn.functional.layer_norm(x, (8,)).dtype == torch.float32
            assert x.exp().dtype == torch.float32 and x.sum().dtype == torch.float32
            assert torch.nn.functional.linear(x, torch.randn(4, 8)).dtype == torch.bfloat16  # still autocast
    with bench.GpuAutocastPolicy():  # outside autocast: nothing changes
        assert x.softmax(-1).dtype == torch.bfloat16


def test_command_line_writes_its_table_and_report(tmp_path, capsys):
    out = tmp_path / "memory.json"
    threads = torch.get_num_threads()
    try:
        report = load_bench().main(["--configs", "tiny-flux2", "--modes", "plain,mosaic", "--no-encoders",
                                    "--same-process", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(report))
    assert [(r["config"], r["mode"], r["quantize"]) for r in saved["results"]] == [
        ("tiny-flux2", "plain", "none"), ("tiny-flux2", "mosaic", "none")]
    for row in saved["results"]:
        assert row["peak_bytes"] > row["base_bytes"] + row["lora_bytes"] > 0 and row["flops"] > 0
        assert sum(row["by_category"].values()) == row["peak_bytes"]
    [overhead] = saved["overhead"]
    plain, mosaic = (r["peak_bytes"] for r in saved["results"])
    assert overhead["mosaic_extra_bytes"] == mosaic - plain
    assert saved["device"] == "cpu" and saved["hardware"]["device"] == "cpu"
    table = capsys.readouterr().out
    assert "tiny-flux2" in table and "+ MOSAIC" in table
    markdown = load_bench().format_markdown(saved)
    assert markdown.count("\n") == 2 and "flux2 (small), 64² target, 2 × 32² refs" in markdown


def test_command_line_refuses_unknown_configurations():
    with pytest.raises(SystemExit):
        load_bench().main(["--configs", "flux3-huge"])
    with pytest.raises(SystemExit):
        load_bench().main(["--configs", "tiny-flux2", "--modes", "sparse"])


@pytest.mark.parametrize("quantize", ["int8", "nf4"])
def test_quantized_base_fake_measurement_equals_a_real_cpu_run(quantize):
    """The quantized layout (int8 + per-channel scales; NF4 packed codes + double-quantized block
    absmax) with its dequantized transients: fake and real CPU peaks agree within 5 %, and the
    base holds exactly the layout's bytes."""
    bench, fake, real = _fake_and_real("small-flux2", "mosaic", quantize)
    _check_agreement(fake, real)
    assert fake["base_bytes"] == real["base_bytes"]
    step = bench.Step(bench.CONFIGS["small-flux2"], fake=True)  # the bf16 base: the same linears
    expected = 0
    for module in step.transformer.modules():
        if type(module) is torch.nn.Linear and not module.weight.requires_grad:
            out_features, in_features = module.weight.shape
            bias = 0 if module.bias is None else 2 * out_features
            if quantize == "int8":
                expected += out_features * in_features + 2 * out_features + bias
            else:
                blocks = out_features * in_features // 64
                expected += out_features * in_features // 2 + blocks + 4 * -(-blocks // 256) + 4 + bias
        elif not isinstance(module, torch.nn.Linear):
            expected += sum(p.numel() * p.element_size() for p in module.parameters(recurse=False)
                            if not p.requires_grad)
    assert fake["base_bytes"] == expected
    assert fake["base_bytes"] < step.base_bytes()[0] / (1.9 if quantize == "int8" else 3.5)


def test_quantized_linear_computes_through_its_dequantized_weight():
    """Values and gradients of `QuantizedLinear` are those of a linear layer with its dequantized
    weight (int8 codes times per-channel scales), and only the input gets a gradient."""
    bench = load_bench()
    layer = bench.QuantizedLinear(torch.nn.Linear(8, 4), "int8")
    with torch.no_grad():
        layer.qweight.copy_(torch.randint(-127, 128, (4, 8), dtype=torch.int8))
        layer.scale.copy_(torch.rand(4) + 0.5)
        layer.bias.copy_(torch.randn(4))
    weight = layer.qweight.to(torch.bfloat16) * layer.scale[:, None]
    x = torch.randn(3, 8, dtype=torch.bfloat16, requires_grad=True)
    out = layer(x)
    assert torch.equal(out, torch.nn.functional.linear(x, weight, layer.bias))
    out.sum().backward()
    assert torch.allclose(x.grad.float(), weight.float().sum(0).expand(3, 8), rtol=1e-2)
    assert all(p.grad is None for p in layer.parameters())
    with pytest.raises(ValueError, match="`layout`"):
        bench.QuantizedLinear(torch.nn.Linear(8, 4), "int4")


def test_ratio_to_the_fake_peak_is_written_per_row_and_base(tmp_path):
    """What scripts/gpu_check.sh reads: a run with ``--fake-report`` writes ``ratio_to_fake`` next
    to each row of the same configuration, mode and base (here against itself: 1)."""
    bench = load_bench()
    fake = tmp_path / "fake.json"
    threads = torch.get_num_threads()
    try:
        bench.main(["--configs", "tiny-qwen", "--modes", "mosaic", "--quantize", "none,int8", "--no-encoders",
                    "--no-flops", "--same-process", "--out", str(fake)])
        report = bench.main(["--configs", "tiny-qwen", "--modes", "mosaic", "--quantize", "none,int8,nf4",
                             "--no-encoders", "--no-flops", "--same-process", "--fake-report", str(fake),
                             "--out", str(tmp_path / "measured.json")])
    finally:
        torch.set_num_threads(threads)
    ratios = {row["quantize"]: row.get("ratio_to_fake") for row in report["results"]}
    assert ratios == {"none": 1.0, "int8": 1.0, "nf4": None}
    assert "measured / fake" in bench.format_report(report)


def test_ready_configurations_fit_their_cards():
    """The measured report holds each ready configuration (recipes/configs/gpu_*.yaml) with its
    base and encoder setting, and the 24 GB one peaks at most at 22 GiB, encoders as it says."""
    bench = load_bench()
    report = json.loads((bench.RESULTS / "memory-cpu.json").read_text())
    rows = {(r["config"], r["mode"], r.get("quantize", "none")): r for r in report["results"]}
    limits = {"gpu-24gb": 22, "gpu-48gb": 44.7, "gpu-80gb": 74.5}  # GiB a card of that size holds, less context
    for name, cfg in bench.READY.items():
        row = rows[(name, "mosaic", cfg["quantize"])]
        encoders = sum(e["bytes_bf16"] for e in report["encoders"][cfg["encoders"]]) if cfg["live_encoders"] else 0
        assert (row["peak_bytes"] + encoders) / bench.GIB <= limits[name], name
