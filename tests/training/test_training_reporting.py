"""The trainer's split pieces: `model.trainable`, the attention panels of the validation sheet
(paper Fig. 6) and the names that moved out of `mosaic_kit.training.trainer`."""

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

from mosaic_kit.correspondence import Correspondences, TokenGrid  # noqa: E402
from mosaic_kit.reporting import attention_panels  # noqa: E402
from mosaic_kit.training import config_from_dict  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def _pixels(image) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255


def test_attention_panels_draw_the_mean_point_row_and_the_true_region():
    grid = TokenGrid(64, 64)  # 4 x 4 tokens of 16 x 16 pixels
    corr = Correspondences.from_dicts([[{0: 5, 1: 6}, {}, {2: 15}]], ref_tokens=[4, 4, 4], tgt_tokens=16)
    rows = torch.zeros(1, 3, 2, 16)
    rows[0, 0, 0, 5], rows[0, 0, 1, 5] = 0.8, 0.4  # both points of reference 0 attend to token 5
    rows[0, 0, 1, 6] = 0.4
    rows[0, 2, 0, 0] = 1.0  # reference 2's point attends far from its target token 15
    target = torch.full((3, 64, 64), 0.5)
    panels = attention_panels(rows, corr, grid, target)
    assert len(panels) == 2  # reference 1 holds no point: no panel
    heat, region = (_pixels(image) for image in panels[0])

    def token(image, index):  # the mean colour of one token's 16 x 16 patch
        r, c = divmod(index, 4)
        return image[:, 16 * r:16 * r + 16, 16 * c:16 * c + 16].mean(dim=(1, 2))

    dimmed = 0.5 * 0.45
    # the mean row is 0.6 at token 5 (the maximum, drawn fully red), 0.2 at token 6 (a third)
    torch.testing.assert_close(token(heat, 5), torch.tensor([1.0, 0.15, 0.05]), atol=2 / 255, rtol=0)
    torch.testing.assert_close(token(heat, 6), dimmed * (2 / 3) + torch.tensor([1.0, 0.15, 0.05]) / 3,
                               atol=2 / 255, rtol=0)
    torch.testing.assert_close(token(heat, 0), torch.full((3,), dimmed), atol=1 / 255, rtol=0)
    for index in (5, 6):  # the true region: the target tokens of the two points
        torch.testing.assert_close(token(region, index), torch.tensor([0.1, 0.85, 0.2]), atol=1 / 255, rtol=0)
    torch.testing.assert_close(token(region, 0), torch.full((3,), dimmed), atol=1 / 255, rtol=0)
    heat2, region2 = (_pixels(image) for image in panels[1])
    assert token(heat2, 0)[0] > 0.99 and token(region2, 15)[1] > 0.84 and token(region2, 0)[1] < 0.3


def test_attention_panels_check_their_inputs():
    corr = Correspondences.from_dicts([[{0: 5}]], ref_tokens=[4], tgt_tokens=16)
    with pytest.raises(ValueError, match=r"point_rows.*\(1, 1, 1, 16\)"):
        attention_panels(torch.zeros(1, 1, 1, 8), corr, TokenGrid(64, 64), torch.rand(3, 64, 64))
    with pytest.raises(ValueError, match=r"target.*\(3, H, W\)"):
        attention_panels(torch.zeros(1, 1, 1, 16), corr, TokenGrid(64, 64), torch.rand(64, 64))
    with pytest.raises(ValueError, match="target_grid"):
        attention_panels(torch.zeros(1, 1, 1, 16), corr, TokenGrid(32, 64), torch.rand(3, 64, 64))


def test_model_trainable_is_a_closed_option():
    assert config_from_dict({}).model.trainable == "lora"
    assert config_from_dict({"model": {"trainable": "all"}}).model.trainable == "all"
    with pytest.raises(ValueError, match="model.trainable"):
        config_from_dict({"model": {"trainable": "base"}})


def test_moved_names_stay_importable():
    from mosaic_kit import training
    from mosaic_kit.reporting import plot_loss_curves
    from mosaic_kit.training import trainer

    for name in ("MosaicTrainer", "NonFiniteTrainingError", "build_dataset", "plot_loss_curves"):
        assert getattr(trainer, name) is getattr(training, name)
    assert training.plot_loss_curves is plot_loss_curves


def test_trainable_all_trains_the_base_resumes_exactly_and_draws_attention(tmp_path):
    """`model.trainable: all`: base weights move, the checkpoint holds them and a resume from step 2
    reproduces the uninterrupted losses and weights bit for bit (with two accumulated micro-batches:
    each has its own generators, all restored); the step-0 attention sheet and the validation sheet
    are written."""
    from safetensors.torch import load_file

    recipe = REPO / "recipes" / "flux_mosaic_train.py"
    common = ["data.target_size=64", "data.ref_size=32", "data.batch_size=2", "model.lora_rank=4",
              "data.synthetic_refs=[1,2]", "model.trainable=all", "gradient_accumulation=2", "max_steps=3", "checkpoint_every=2",
              "keep_checkpoints=2", "validation_samples=1", "validation_steps=1", "validate_every=0",
              "tracker=null", "log_every=1", "model.tiny_overrides={num_layers: 1, num_single_layers: 1}"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}

    def run(out, *extra, kill=None):
        done = subprocess.run([sys.executable, str(recipe), "--config", str(REPO / "recipes" / "configs" / "tiny_cpu.yaml"),
                               f"output_dir={out}", *common, *extra], capture_output=True,
                              text=True, timeout=600, env={**env, **({"MOSAIC_KILL_AT_STEP": kill} if kill else {})})
        return done

    reference, killed = tmp_path / "reference", tmp_path / "killed"
    assert run(reference).returncode == 0
    assert (reference / "samples" / "attention-step-0000000.png").is_file()
    assert (reference / "samples" / "step-0000003.png").is_file()
    saved = load_file(str(reference / "checkpoints" / "step-0000002" / "trainable_parameters.safetensors"))
    assert any(".lora_" not in name for name in saved) and any(".lora_" in name for name in saved)
    assert run(killed, kill="2").returncode == -9
    assert run(killed, "--resume", "latest").returncode == 0

    def outcome(out):
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in records}, load_file(
            str(out / "checkpoints" / "step-0000003" / "trainable_parameters.safetensors"))

    (expected_losses, expected_weights), (got_losses, got_weights) = outcome(reference), outcome(killed)
    assert got_losses == expected_losses and sorted(got_losses) == [1, 2, 3]
    assert expected_weights.keys() == got_weights.keys()
    assert all(torch.equal(got_weights[k], expected_weights[k]) for k in expected_weights)
    first = load_file(str(reference / "checkpoints" / "step-0000002" / "trainable_parameters.safetensors"))
    base = [k for k in first if ".lora_" not in k and "proj_out" in k]
    assert base and any(not torch.equal(first[k], expected_weights[k]) for k in base)  # the base trains
