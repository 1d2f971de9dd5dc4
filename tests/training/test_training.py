"""The training recipe and library: smoke run, exact resume after SIGKILL, crash-safe checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")

from helpers import load_script  # noqa: E402
from mosaic_kit.attention import PointAttentionRows, dense_ref_target_attention  # noqa: E402
from mosaic_kit.correspondence import Correspondences  # noqa: E402
from mosaic_kit.models import logit_normal_sigmas, resolution_shift_mu  # noqa: E402
from mosaic_kit.training import (  # noqa: E402
    MosaicTrainer,
    apply_overrides,
    config_from_dict,
    load_config,
)

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "flux_mosaic_train.py"
# the smoke config (the main job's default, main_cpu.yaml, trains for minutes)
SMOKE = ["--config", str(REPO / "recipes" / "configs" / "tiny_cpu.yaml")]
FAST = ["data.target_size=64", "data.ref_size=32", "data.batch_size=2", "validation_samples=1",
        "validation_steps=2", "log_every=1", "model.lora_rank=4", "data.synthetic_refs=[1,3]"]


def run_recipe(out: Path, *overrides: str, env: dict | None = None, check: bool = True):
    done = subprocess.run(
        [sys.executable, str(RECIPE), *SMOKE, f"output_dir={out}", *FAST, *overrides],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},  # this checkout's mosaic_kit, not an installed one
    )
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


def losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records}


def test_two_step_smoke_run_writes_every_file(tmp_path):
    out = tmp_path / "run"
    done = run_recipe(out, "max_steps=2", "checkpoint_every=1", "validate_every=1", "keep_checkpoints=1")
    assert "torchvision" not in done.stderr  # no transformers image-processor warnings (mosaic_kit.models)
    config = (out / "config.yaml").read_text()
    assert "max_steps: 2" in config and "target_size: 64" in config
    checkpoints = sorted((out / "checkpoints").iterdir())
    assert [c.name for c in checkpoints] == ["step-0000002"]  # keep_checkpoints=1 removed step 1
    files = {p.name for p in checkpoints[0].iterdir()}
    assert {"pytorch_lora_weights.safetensors", "lora_parameters.safetensors", "ema_lora_weights.safetensors",
            "ema.pt", "optimizer.bin",
            "scheduler.bin", "trainer_rank0.pt", "trainer_state.json", "random_states_0.pkl",
            "checkpoint_digest.json"} <= files
    assert not any(name.startswith("model") for name in files)  # LoRA only, never the base model
    from safetensors.torch import load_file

    lora = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert lora and all(k.startswith("transformer.") and ".lora_" in k for k in lora)
    assert (out / "ema_lora_weights.safetensors").is_file()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    for key in ("loss", "flow_matching", "scal", "mdl", "lr", "grad_norm", "hit_rate"):
        assert key in records[0]
    assert all(0 <= r["hit_rate"] <= 1 for r in records)
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    assert (out / "samples" / "step-0000001.png").is_file() and (out / "samples" / "step-0000002.png").is_file()
    assert (out / "loss_curves.png").stat().st_size > 1000
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["bad_samples"] == {"counts": {}, "ids": {}}  # synthetic: no bad data

    # the LoRA loads into the inference pipeline
    from mosaic_kit.pipelines import MosaicFluxPipeline
    from mosaic_kit.pipelines.tiny import tiny_flux_components

    pipe = MosaicFluxPipeline(**tiny_flux_components())
    pipe.load_mosaic_weights(out)
    assert "mosaic" in pipe.transformer.peft_config


def test_resume_after_sigkill_reproduces_the_uninterrupted_losses(tmp_path):
    common = ["max_steps=8", "checkpoint_every=2", "validate_every=0", "tracker=null", "data.caption_dropout=0.3",
              "data.image_dropout=0.2"]
    reference = tmp_path / "reference"
    run_recipe(reference, *common)
    killed = tmp_path / "killed"
    done = run_recipe(killed, *common, env={"MOSAIC_KILL_AT_STEP": "5"}, check=False)
    assert done.returncode == -9  # SIGKILL
    assert max(losses(killed)) == 5 and not (killed / "summary.json").exists()
    run_recipe(killed, *common, "--resume", "latest")
    expected, got = losses(reference), losses(killed)
    assert sorted(got) == list(range(1, 9))
    assert got == expected  # bit-for-bit the same per-step losses
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["resumed_from"].endswith("step-0000004")


def test_crash_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    overrides = [f"output_dir={tmp_path / 'run'}", "max_steps=2", "checkpoint_every=2", "validate_every=0",
                 "tracker=null", *FAST, "validation_samples=0"]
    config = load_config([REPO / "recipes" / "configs" / "tiny_cpu.yaml"], overrides)
    trainer = MosaicTrainer(config)
    trainer.train()
    good = trainer.checkpoints()
    assert [p.name for p in good] == ["step-0000002"]

    import mosaic_kit.training.checkpointing as module  # the trainer's checkpoint writer

    def explode(*args, **kwargs):
        raise OSError("disk full")

    trainer.step = 3
    monkeypatch.setattr(module, "write_lora_file", explode)  # the raw LoRA file of the checkpoint
    with pytest.raises(OSError, match="disk full"):
        trainer.save_checkpoint()
    monkeypatch.undo()
    assert [p.name for p in trainer.checkpoints()] == ["step-0000002"]
    resumed = MosaicTrainer(load_config([REPO / "recipes" / "configs" / "tiny_cpu.yaml"], overrides))
    resumed.setup()
    path = resumed.load_checkpoint("latest")
    assert path.name == "step-0000002" and resumed.step == 2


def test_resume_without_checkpoint_raises(tmp_path):
    config = load_config([REPO / "recipes" / "configs" / "tiny_cpu.yaml"],
                         [f"output_dir={tmp_path}", "tracker=null", *FAST])
    trainer = MosaicTrainer(config)
    with pytest.raises(ValueError, match="found none"):
        trainer.load_checkpoint("latest")


@pytest.mark.slow
def test_two_process_cpu_run(tmp_path):
    out = tmp_path / "ddp"
    done = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", str(RECIPE), *SMOKE, f"output_dir={out}", *FAST,
         "max_steps=3", "checkpoint_every=3", "validate_every=0", "tracker=null", "model.capture_blocks=all"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 3
    checkpoint = out / "checkpoints" / "step-0000003"
    assert (checkpoint / "trainer_rank0.pt").is_file() and (checkpoint / "trainer_rank1.pt").is_file()


# -- library pieces -----------------------------------------------------------------------------------
def test_apply_overrides_leaves_the_callers_nested_dicts_unchanged():
    values = {"model": {"family_options": {"reference_method": "offset"}, "lora_rank": 4}, "max_steps": 2}
    result = apply_overrides(values, ["model.family_options.reference_method=index", "model.family_options.x.y=1",
                                      "model.lora_rank=8", "max_steps=3"])
    assert values == {"model": {"family_options": {"reference_method": "offset"}, "lora_rank": 4}, "max_steps": 2}
    assert result == {"model": {"family_options": {"reference_method": "index", "x": {"y": 1}}, "lora_rank": 8},
                      "max_steps": 3}
    assert apply_overrides(values, []) == values and apply_overrides(values, [])["model"] is not values["model"]
    with pytest.raises(TypeError, match="`overrides` to be a list of `key=value` strings"):
        apply_overrides(values, "max_steps=3")
    with pytest.raises(TypeError, match="`values` to be a dict of settings, but got list"):
        apply_overrides([], ["max_steps=3"])


def test_config_overrides_and_errors(tmp_path):
    assert apply_overrides({}, ["optim.betas=[0.8, 0.9]"]) == {"optim": {"betas": [0.8, 0.9]}}
    config = load_config([REPO / "recipes" / "configs" / "tiny_cpu.yaml"], ["optim.lr=5e-4", "data.batch_size=3"])
    assert config.optim.lr == 5e-4 and config.data.batch_size == 3 and config.data.target_size == 128
    with pytest.raises(ValueError, match="Unknown settings"):
        config_from_dict({"max_step": 3})
    with pytest.raises(ValueError, match="Unknown settings in `optim`"):
        config_from_dict({"optim": {"learning_rate": 3}})
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides({}, ["optim.lr"])
    with pytest.raises(ValueError, match="data.kind"):
        config_from_dict({"data": {"kind": "webdataset"}})
    with pytest.raises(ValueError, match="data.root"):
        config_from_dict({"data": {"kind": "manifest"}})
    with pytest.raises(ValueError, match="multiple of 16"):
        config_from_dict({"data": {"target_size": 100}})
    with pytest.raises(ValueError, match="mixed_precision"):
        config_from_dict({"mixed_precision": "fp8"})


def test_sigmas_are_logit_normal_then_shifted():
    """The one sigma sampler (`logit_normal_sigmas`, what every family's `sample_sigmas` draws)
    with the one shift (`resolution_shift_mu`)."""
    g = torch.Generator().manual_seed(0)
    plain = logit_normal_sigmas(20000, g, None)
    assert abs(plain.mean().item() - 0.5) < 0.01  # sigmoid of a centred normal
    g = torch.Generator().manual_seed(0)
    mu = resolution_shift_mu(4096)
    shifted = logit_normal_sigmas(20000, g, mu)
    expected = torch.exp(torch.tensor(mu)) / (torch.exp(torch.tensor(mu)) + (1 / plain - 1))
    torch.testing.assert_close(shifted, expected)
    assert shifted.mean() > plain.mean()


def test_point_attention_rows_equal_the_dense_map():
    corr = Correspondences.from_dicts([[{0: 1, 3: 2}, {1: 0}], [{2: 2}, {}]], ref_tokens=[4, 2], tgt_tokens=3)
    gen = torch.Generator().manual_seed(0)
    queries = [torch.randn(2, 3, 6, 8, generator=gen, dtype=torch.float64) for _ in range(2)]
    keys = [torch.randn(2, 3, 3, 8, generator=gen, dtype=torch.float64) for _ in range(2)]
    rows = PointAttentionRows(corr)
    for q, k in zip(queries, keys):
        rows.add(q, k)
    dense = dense_ref_target_attention(queries, keys)  # (B, N_ref, N_tgt)
    got = rows.result()
    for b in range(2):
        for k in range(2):
            for p in range(corr.max_points):
                if corr.point_mask[b, k, p]:
                    torch.testing.assert_close(got[b, k, p].double(), dense[b, corr.global_rows[b, k, p]], atol=1e-6,
                                               rtol=1e-5)


@pytest.mark.parametrize("kind", ["released", "manifest"])
def test_trains_on_released_and_manifest_data_with_the_composer(tmp_path, kind):
    from mosaic_kit.data import make_manifest_fixture, make_released_fixture

    subjects = [("dog", "a dog"), ("cat", "a cat"), ("owl", "an owl"), ("fox", "a fox")]
    if kind == "released":
        make_released_fixture(tmp_path / "data", subjects)
        root = tmp_path / "data"
    else:
        root = make_manifest_fixture(tmp_path / "data", [item for item, _ in subjects])
    overrides = [f"output_dir={tmp_path / 'run'}", "max_steps=2", "checkpoint_every=2", "validate_every=0",
                 "tracker=null", *FAST, "validation_samples=0", f"data.kind={kind}", f"data.root={root}",
                 "data.compose=[1,3]"]
    config = load_config([REPO / "recipes" / "configs" / "tiny_cpu.yaml"], overrides)
    summary = MosaicTrainer(config).train()
    assert summary["steps"] == 2
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)


def test_shipped_configs_parse():
    from accelerate.commands.config.config_args import ClusterConfig

    kinds = {}
    for path in sorted((REPO / "recipes" / "accelerate").glob("*.yaml")):
        kinds[path.stem] = str(ClusterConfig.from_yaml_file(str(path)).distributed_type)
    assert kinds == {"deepspeed_zero2": "DistributedType.DEEPSPEED", "fsdp": "DistributedType.FSDP",
                     "multi_gpu": "DistributedType.MULTI_GPU", "single_gpu": "DistributedType.NO"}
    fsdp = ClusterConfig.from_yaml_file(str(REPO / "recipes" / "accelerate" / "fsdp.yaml"))
    assert fsdp.fsdp_config["fsdp_version"] == 2  # the trainer shards with FSDP2
    for name in ("main_cpu", "tiny_cpu", "flux_512", "flux_512_released"):  # the training recipe's configs
        config = load_config([REPO / "recipes" / "configs" / f"{name}.yaml"])
        assert config.max_steps >= 1, name


def test_main_job_default_is_the_fidelity_world_that_draws():
    """The README's main job trains in the world and with the model of the fidelity preset, whose
    diffusion baseline draws its references (docs/results/fidelity.md); only the objective differs
    (SCAL + Jensen-Shannon MDL) and the run validates on the trained identities."""
    import yaml

    recipe = load_script("recipes/flux_mosaic_train.py", "main_job_default")
    assert recipe.DEFAULT_CONFIG.name == "main_cpu.yaml"
    main = load_config([recipe.DEFAULT_CONFIG])
    preset = config_from_dict(yaml.safe_load((REPO / "recipes" / "configs" / "fidelity_cpu.yaml").read_text())["train"])
    for section, names in {"model": ("base", "pixel_space", "prediction", "tiny_overrides", "trainable", "lora_rank"),
                           "data": ("target_size", "ref_size", "batch_size", "synthetic_refs", "synthetic_world"),
                           "optim": ("lr", "schedule", "warmup_steps")}.items():
        for name in names:
            assert getattr(getattr(main, section), name) == getattr(getattr(preset, section), name), (section, name)
    assert main.max_steps == preset.max_steps and main.ema_decay == preset.ema_decay
    assert main.data.synthetic_world["layout"] == "ordered" and main.model.prediction == "sample"
    assert main.data.synthetic_validation == "seen" and main.validation_samples >= 1 and main.validate_every >= 1
