"""Resume after SIGKILL at many moments (mid-step, inside every phase of a checkpoint save, while
pruning, while finishing) and after damage to the newest checkpoints: every resumed run must end
bit-identical to an uninterrupted one (same per-step losses, same final LoRA and EMA tensors).

Each run is the training recipe in a subprocess on the tiny CPU config (one thread). Slow suite:
``pytest -m slow tests/training/test_checkpoints_slow.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "flux_mosaic_train.py"
# the smoke config (the main job's default, main_cpu.yaml, trains for minutes)
SMOKE = ["--config", str(REPO / "recipes" / "configs" / "tiny_cpu.yaml")]
STEPS, EVERY, KILL_SAVE = 8, 2, 6  # checkpoints at 2, 4, 6, 8; keep 2; the save of step 6 is killed
OVERRIDES = [f"max_steps={STEPS}", f"checkpoint_every={EVERY}", "keep_checkpoints=2", "validate_every=0",
             "validation_samples=0", "tracker=null", "log_every=1", "cpu_threads=1", "data.target_size=64",
             "data.ref_size=32", "data.batch_size=2", "model.lora_rank=4", "data.synthetic_refs=[1,3]",
             "data.caption_dropout=0.3", "data.image_dropout=0.2"]

# Runs the recipe after wrapping one function so that the process SIGKILLs itself at a chosen moment.
DRIVER = r'''
import json, os, runpy, shutil, signal, sys
spec = json.loads(sys.argv[1])
import mosaic_kit
assert mosaic_kit.__file__.startswith(spec["repo"]), mosaic_kit.__file__
import mosaic_kit.training.checkpoint_folders as C
import mosaic_kit.training.trainer as T
import mosaic_kit.training.checkpointing as S  # the trainer's checkpoint writer

state = {"saving": None, "calls": 0}
point, kill_step = spec.get("point"), spec.get("step")

def die():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)

def armed():
    return state["saving"] == kill_step

save_checkpoint = T.MosaicTrainer.save_checkpoint
def tracked_save(self):
    state["saving"] = self.step
    try:
        return save_checkpoint(self)
    finally:
        state["saving"] = None
T.MosaicTrainer.save_checkpoint = tracked_save

def before(module, name, condition=armed):
    original = getattr(module, name)
    def wrapper(*args, **kwargs):
        if condition():
            die()
        return original(*args, **kwargs)
    setattr(module, name, wrapper)

def after(module, name, condition=armed):
    original = getattr(module, name)
    def wrapper(*args, **kwargs):
        out = original(*args, **kwargs)
        if condition():
            die()
        return out
    setattr(module, name, wrapper)

if point == "mid_step":  # inside the step after the checkpoint: after backward, before the optimiser
    step_fn = T.MosaicTrainer.training_step
    def training_step(self, *args, **kwargs):
        out = step_fn(self, *args, **kwargs)
        if self.step + 1 == kill_step:
            die()
        return out
    T.MosaicTrainer.training_step = training_step
elif point == "after_accelerate_state":  # optimizer/scheduler/RNG files written, nothing else
    import accelerate
    after(accelerate.Accelerator, "save_state")
elif point == "before_raw_lora":  # the inference LoRA written, the resume LoRA not
    before(S, "write_lora_file")
elif point == "mid_digest":  # half the files hashed, no digest file
    def third_hash():
        state["calls"] += armed()
        return armed() and state["calls"] == 3
    before(C, "_sha256", third_hash)
elif point == "digest_not_renamed":  # the digest written under its temporary name, not renamed
    replace = os.replace
    def replace_unless_digest(src, dst, *args, **kwargs):
        if armed() and str(dst).endswith(C.DIGEST_FILE):
            die()
        return replace(src, dst, *args, **kwargs)
    os.replace = replace_unless_digest
elif point == "before_publish":  # complete and digested, not renamed into place
    before(S, "publish_checkpoint")
elif point == "before_prune":  # published, old checkpoints not yet removed
    before(S, "remove_checkpoint")
elif point == "mid_prune":  # renamed to its trash name, half deleted
    rmtree = shutil.rmtree
    def half_rmtree(path, *args, **kwargs):
        if armed() and os.path.basename(str(path)).startswith(".trash-"):
            files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)
            for victim in files[: len(files) // 2]:
                os.unlink(victim)
            die()
        return rmtree(path, *args, **kwargs)
    shutil.rmtree = half_rmtree
elif point == "in_finish":  # the final LoRA files written, summary.json not
    before(T, "write_text_atomic", lambda: state.get("finishing", False))
    finish = T.MosaicTrainer.finish
    def tracked_finish(self, *args, **kwargs):
        state["finishing"] = True
        return finish(self, *args, **kwargs)
    T.MosaicTrainer.finish = tracked_finish
elif point is not None:
    raise SystemExit(f"unknown kill point {point}")

sys.argv = [spec["recipe"], *spec["args"]]
runpy.run_path(spec["recipe"], run_name="__main__")
'''


def run(out: Path, point: str | None = None, step: int | None = None, resume: bool = False):
    args = [*SMOKE, f"output_dir={out}", *OVERRIDES] + (["--resume", "latest"] if resume else [])
    spec = {"repo": str(REPO), "recipe": str(RECIPE), "args": args, "point": point, "step": step, "out": str(out)}
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", DRIVER, json.dumps(spec)], capture_output=True, text=True,
                          timeout=600, env=env, cwd=REPO)


def outcome(out: Path) -> dict:
    """What must be bit-identical: the per-step losses and every final LoRA tensor."""
    from safetensors.torch import load_file

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"losses": {r["step"]: r["loss"] for r in records},
            "lora": load_file(str(out / "pytorch_lora_weights.safetensors")),
            "ema": load_file(str(out / "ema_lora_weights.safetensors"))}


def assert_bit_identical(got: dict, expected: dict) -> None:
    assert got["losses"] == expected["losses"]
    for name in ("lora", "ema"):
        assert got[name].keys() == expected[name].keys()
        for key in expected[name]:
            assert torch.equal(got[name][key], expected[name][key]), (name, key)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("reference") / "run"
    done = run(out)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(outcome(out)["losses"]) == list(range(1, STEPS + 1))
    return outcome(out)


KILL_POINTS = [("mid_step", 5), ("mid_step", 7), ("after_accelerate_state", KILL_SAVE),
               ("before_raw_lora", KILL_SAVE), ("mid_digest", KILL_SAVE), ("digest_not_renamed", KILL_SAVE),
               ("before_publish", KILL_SAVE), ("before_prune", KILL_SAVE), ("mid_prune", KILL_SAVE),
               ("in_finish", None)]


@pytest.mark.slow
@pytest.mark.parametrize("point,step", KILL_POINTS, ids=[f"{p}-{s}" for p, s in KILL_POINTS])
def test_sigkill_then_resume_ends_bit_identical(tmp_path, reference, point, step):
    out = tmp_path / "run"
    killed = run(out, point, step)
    assert killed.returncode == -9, (killed.returncode, killed.stderr[-3000:])  # SIGKILL, at the chosen moment
    assert not (out / "summary.json").exists()
    leftovers = [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith((".tmp-", ".trash-"))]
    if point in ("after_accelerate_state", "before_raw_lora", "mid_digest", "digest_not_renamed", "before_publish"):
        assert leftovers == [f".tmp-step-{KILL_SAVE:07d}"]  # the kill really hit the save
    if point == "mid_prune":
        assert leftovers == [f".trash-step-{KILL_SAVE - 2 * EVERY:07d}"]
    resumed = run(out, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_bit_identical(outcome(out), reference)
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith((".tmp-", ".trash-"))]
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step-0000006", "step-0000008"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == STEPS and summary["resumed_from"]


def damage(folder: Path, how: str) -> str:
    """Damages one checkpoint; returns the file the warning must name."""
    if how == "flip_bytes":
        target = folder / "optimizer.bin"
        data = bytearray(target.read_bytes())
        for offset in (len(data) // 3, len(data) // 2):
            data[offset] ^= 0x5A
        target.write_bytes(bytes(data))
        return "optimizer.bin"
    if how == "truncate":
        target = folder / "lora_parameters.safetensors"
        target.write_bytes(target.read_bytes()[:-100])
        return "lora_parameters.safetensors"
    if how == "delete_digest":
        (folder / "checkpoint_digest.json").unlink()
        return "checkpoint_digest.json"
    if how == "delete_file":
        (folder / "trainer_rank0.pt").unlink()
        return "trainer_rank0.pt"
    raise ValueError(how)


@pytest.fixture(scope="module")
def killed_at_7(tmp_path_factory) -> Path:
    """A run killed in step 7: checkpoints 4 and 6 on disk (copied by each test that damages them)."""
    out = tmp_path_factory.mktemp("killed") / "run"
    killed = run(out, "mid_step", 7)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step-0000004", "step-0000006"]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("how", ["flip_bytes", "truncate", "delete_digest", "delete_file"])
def test_damaged_newest_checkpoint_falls_back_and_ends_bit_identical(tmp_path, reference, killed_at_7, how):
    out = tmp_path / "run"
    shutil.copytree(killed_at_7, out)
    newest = out / "checkpoints" / "step-0000006"
    name = damage(newest, how)
    resumed = run(out, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Skipping damaged or incomplete checkpoint {newest}, file '{name}'" in resumed.stderr
    assert_bit_identical(outcome(out), reference)
    assert json.loads((out / "summary.json").read_text())["resumed_from"].endswith("step-0000004")


@pytest.mark.slow
def test_all_checkpoints_damaged_is_a_clear_error(tmp_path, killed_at_7):
    out = tmp_path / "run"
    shutil.copytree(killed_at_7, out)
    damage(out / "checkpoints" / "step-0000006", "flip_bytes")
    damage(out / "checkpoints" / "step-0000004", "truncate")
    resumed = run(out, resume=True)
    assert resumed.returncode != 0
    assert "CheckpointError" in resumed.stderr and "no intact checkpoint to resume from" in resumed.stderr
    assert f"{out / 'checkpoints' / 'step-0000006'}, file 'optimizer.bin'" in resumed.stderr
    assert f"{out / 'checkpoints' / 'step-0000004'}, file 'lora_parameters.safetensors'" in resumed.stderr
    assert not (out / "summary.json").exists()


@pytest.mark.slow
def test_two_processes_fall_back_from_a_damaged_checkpoint_and_end_bit_identical(tmp_path):
    """Two CPU processes (gloo): process 0 verifies, both resume from its choice."""

    def launch(out: Path, *extra: str):
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        return subprocess.run(
            [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
             "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(RECIPE), *SMOKE,
             f"output_dir={out}", *OVERRIDES, "max_steps=4", *extra],
            capture_output=True, text=True, timeout=600, env=env, cwd=REPO)

    reference = tmp_path / "reference"
    done = launch(reference)
    assert done.returncode == 0, done.stderr[-3000:]
    expected = outcome(reference)
    damaged = tmp_path / "damaged"
    shutil.copytree(reference, damaged)
    for name in ("summary.json", "pytorch_lora_weights.safetensors", "ema_lora_weights.safetensors"):
        (damaged / name).unlink()
    name = damage(damaged / "checkpoints" / "step-0000004", "flip_bytes")
    done = launch(damaged, "--resume", "latest")
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"step-0000004, file '{name}'" in done.stderr
    assert json.loads((damaged / "summary.json").read_text())["resumed_from"].endswith("step-0000002")
    assert_bit_identical(outcome(damaged), expected)


NAN_DRIVER = r'''
import os, runpy, sys
import torch
import mosaic_kit.training.trainer as T
from mosaic_kit import check_finite

how = os.environ["NAN_HOW"]
setup = T.MosaicTrainer.setup

def poisoned_setup(self):
    setup(self)
    objective = self.objective
    rank = self.accelerator.process_index

    class Poisoned:
        def __getattr__(self, name):
            return getattr(objective, name)

        def __call__(self, prediction, *args, step, **kwargs):
            if rank == 1 and step + 1 == 3:  # process 1 only, step 3
                prediction = prediction * float("nan")
                if how == "check":
                    check_finite("prediction", prediction)  # the objective's hot-path input check
            return objective(prediction, *args, step=step, **kwargs)

    self.objective = Poisoned()

T.MosaicTrainer.setup = poisoned_setup
sys.argv = [sys.argv[1], *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
'''


@pytest.mark.slow
@pytest.mark.parametrize("how", ["loss", "check"])
def test_two_processes_stop_together_when_one_goes_non_finite(tmp_path, how):
    """A NaN on one process only: every process stops at the same step (no hang in the all-reduce)."""
    driver = tmp_path / "driver.py"
    driver.write_text(NAN_DRIVER)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "NAN_HOW": how}
    done = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(driver), str(RECIPE), *SMOKE,
         f"output_dir={tmp_path / 'run'}", *OVERRIDES, "max_steps=4",
         f"check_finite_steps={4 if how == 'check' else 0}"],
        capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if "NonFiniteTrainingError: Training stopped at step 3" in line]
    assert len(errors) == 2, done.stderr[-4000:]  # both processes, same step
    if how == "loss":
        assert all("`flow_matching` is not finite on process 1" in line for line in errors)
    else:
        assert any("Expected `prediction` to hold only finite values" in line for line in errors)
        assert any("a finite check failed on process 1" in line for line in errors)
    assert [p.name for p in sorted((tmp_path / "run" / "checkpoints").iterdir())] == ["step-0000002"]
