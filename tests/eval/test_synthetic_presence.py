"""Presence of generated subjects (presence_threshold, subject_presence) and the intervals over
seeds of the ablation tables (mean_interval, ablation_table(interval="t95"))."""

from __future__ import annotations

import math

import pytest
import torch

from mosaic_kit.eval import (
    SyntheticEvalConfig,
    ablation_table,
    baseline_presence_threshold,
    fidelity_baselines,
    mean_interval,
    presence_threshold,
    subject_presence,
)


def test_threshold_is_halfway_between_ground_truth_and_chance():
    assert presence_threshold([0.8, 1.0, float("nan")], torch.tensor([0.1, 0.3])) == pytest.approx(0.55)
    with pytest.raises(ValueError, match="above chance"):
        presence_threshold([0.2], [0.4])
    with pytest.raises(ValueError, match="`chance`"):
        presence_threshold([0.9], [float("nan")])
    with pytest.raises(TypeError, match="`ground_truth`"):
        presence_threshold("high", [0.1])


def test_presence_counts_subjects_at_or_above_the_threshold():
    colour = torch.tensor([0.2, 0.55, 0.9, float("nan")])
    present = subject_presence(colour, 0.55)
    assert present[:3].tolist() == [0.0, 1.0, 1.0] and math.isnan(present[3])
    with pytest.raises(ValueError, match="`colour`"):
        subject_presence(torch.tensor([[0.5]]), 0.5)
    with pytest.raises(ValueError, match="threshold"):
        subject_presence(colour, 1.5)


def test_baselines_carry_presence_and_separate_truth_from_chance():
    world = {"identity_range": [0, 8], "subject_style": "two_tone", "background": "plain"}
    config = SyntheticEvalConfig(num_refs=(1, 2), generation_samples=2, target_size=32, ref_size=16, world=world)
    records = fidelity_baselines(config)
    threshold = baseline_presence_threshold(records)
    truth = [r for r in records if r["kind"] == "ground_truth"]
    chance = [r for r in records if r["kind"] == "chance"]
    colours = [c for r in truth for c in r["subject_colours"]], [c for r in chance for c in r["subject_colours"]]
    assert threshold == pytest.approx((sum(colours[0]) / len(colours[0]) + sum(colours[1]) / len(colours[1])) / 2)
    mean = lambda rows: sum(r["sample_presence"] for r in rows) / len(rows)  # noqa: E731
    assert mean(truth) > 0.9 and mean(chance) < 0.5


def test_t_interval_over_seeds():
    mean, half = mean_interval([0.1, 0.2, 0.3, float("nan")])  # n = 3: t(0.975, 2) = 4.303, s = 0.1
    assert mean == pytest.approx(0.2) and half == pytest.approx(4.303 * 0.1 / math.sqrt(3), rel=1e-6)
    assert mean_interval([0.1, 0.3], "std")[1] == pytest.approx(0.1414, abs=1e-4)
    assert math.isnan(mean_interval([0.4])[1]) and mean_interval([0.4], "std") == (0.4, 0.0)
    with pytest.raises(ValueError, match="interval"):
        mean_interval([0.1], "ci")
    table = ablation_table({"a": [{"hit_rate": 0.1}, {"hit_rate": 0.2}, {"hit_rate": 0.3}], "b": [{"hit_rate": 0.5}]},
                           metrics=["hit_rate"], interval="t95")
    assert "| a | 3 | 0.200 ± 0.248 |" in table and "| b | 1 | 0.500 |" in table
    with pytest.raises(ValueError, match="interval"):
        ablation_table({"a": [{"hit_rate": 0.1}]}, interval="sem")
