"""The synthetic-ablation scores (mosaic_kit.eval.synthetic) and a smoke run of its recipe."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mosaic_kit.correspondence import Correspondences
from mosaic_kit.data import SyntheticWorld, render_subject, subject_descriptor
from mosaic_kit.eval import (
    METRICS,
    SyntheticEvalConfig,
    ablation_table,
    attention_log_probability,
    attention_overlap,
    fidelity_baselines,
    locate_subject,
    masked_mse,
    masked_ncc,
    palette_affinity,
    reference_attention_maps,
    subject_attention_mass,
    subject_fidelity,
    summarise_records,
    target_token_masks,
)

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "synthetic_ablation.py"


def random_rows(corr: Correspondences, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(corr.batch_size, corr.num_refs, corr.max_points, corr.tgt_tokens, generator=gen) * 3
    return logits.softmax(-1)


def random_corr(seed: int = 0) -> Correspondences:
    gen = torch.Generator().manual_seed(seed)
    dicts = []
    for _ in range(2):
        sample = []
        for k in range(3):
            points = int(torch.randint(0 if k == 2 else 1, 5, (1,), generator=gen))
            refs = torch.randperm(6, generator=gen)[:points].tolist()
            sample.append({u: int(torch.randint(0, 12, (1,), generator=gen)) for u in refs})
        dicts.append(sample)
    return Correspondences.from_dicts(dicts, ref_tokens=[6, 6, 6], tgt_tokens=12)


# ----------------------------------------------------------------------------- attention scores
def test_log_probability_matches_a_loop_and_ignores_padding():
    corr = random_corr()
    rows = random_rows(corr)
    expected, count = 0.0, 0
    for b, sample in enumerate(corr.to_dicts()):
        for k, pairs in enumerate(sample):
            for p, (u, v) in enumerate(pairs.items()):
                assert int(corr.ref_index[b, k, p]) == u
                expected += math.log(float(rows[b, k, p, v]))
                count += 1
    assert attention_log_probability(rows, corr).item() == pytest.approx(expected / count, rel=1e-5)
    per_point = attention_log_probability(rows, corr, reduction="none")
    assert per_point.shape == corr.point_mask.shape
    assert bool((per_point[~corr.point_mask] == 0).all())
    uniform = torch.full_like(rows, 1 / 12)
    assert attention_log_probability(uniform, corr).item() == pytest.approx(-math.log(12), rel=1e-6)


def test_log_probability_rejects_bad_input():
    corr = random_corr()
    with pytest.raises(ValueError, match="attention"):
        attention_log_probability(torch.rand(2, 3, 1, 12), corr)
    with pytest.raises(ValueError, match="reduction"):
        attention_log_probability(random_rows(corr), corr, reduction="sum")
    with pytest.raises(ValueError, match="eps"):
        attention_log_probability(random_rows(corr), corr, eps=0.0)


def test_reference_maps_are_normalised_point_means():
    corr = random_corr()
    rows = random_rows(corr)
    maps, valid = reference_attention_maps(rows, corr)
    assert valid.tolist() == corr.point_mask.any(-1).tolist()
    for b in range(corr.batch_size):
        for k in range(corr.num_refs):
            mask = corr.point_mask[b, k]
            if mask.any():
                mean = rows[b, k][mask].mean(0)
                torch.testing.assert_close(maps[b, k], mean / mean.sum())
            else:
                assert bool((maps[b, k] == 0).all())


def test_overlap_identical_disjoint_and_against_a_loop():
    same = torch.tensor([[[0.2, 0.3, 0.5], [0.2, 0.3, 0.5]]])
    disjoint = torch.tensor([[[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]])
    both = torch.ones(1, 2, dtype=torch.bool)
    for measure in ("bhattacharyya", "intersection"):
        assert attention_overlap(same, both, measure).item() == pytest.approx(1.0)
        assert attention_overlap(disjoint, both, measure).item() == pytest.approx(0.0)
    assert math.isnan(attention_overlap(same, torch.tensor([[True, False]])).item())

    corr = random_corr(3)
    maps, valid = reference_attention_maps(random_rows(corr, 3), corr)
    got = attention_overlap(maps, valid)
    for b in range(maps.shape[0]):
        pairs = [(i, j) for i in range(3) for j in range(i + 1, 3) if valid[b, i] and valid[b, j]]
        values = [float((maps[b, i] * maps[b, j]).sqrt().sum()) for i, j in pairs]
        if values:
            assert got[b].item() == pytest.approx(sum(values) / len(values), rel=1e-5)
        else:
            assert math.isnan(got[b].item())
    with pytest.raises(ValueError, match="measure"):
        attention_overlap(maps, valid, "kl")


def test_overlap_falls_when_references_separate():
    """Two references attending to their own halves overlap less than two spreading everywhere."""
    spread = torch.full((1, 2, 8), 1 / 8)
    halves = torch.zeros(1, 2, 8)
    halves[0, 0, :4] = 0.25
    halves[0, 1, 4:] = 0.25
    valid = torch.ones(1, 2, dtype=torch.bool)
    assert attention_overlap(halves, valid).item() < attention_overlap(spread, valid).item()


def test_subject_mass_partitions_the_map():
    corr = random_corr(1)
    maps, valid = reference_attention_maps(random_rows(corr, 1), corr)
    masks = torch.zeros(2, 3, 12, dtype=torch.bool)
    masks[:, 0, :4] = True
    masks[:, 1, 3:8] = True  # overlaps subject 0 at token 3
    own, other = subject_attention_mass(maps, valid, masks)
    for b in range(2):
        for k in range(3):
            if not valid[b, k]:
                assert math.isnan(own[b, k].item()) and math.isnan(other[b, k].item())
                continue
            union_others = torch.stack([masks[b, j] for j in range(3) if j != k]).any(0) & ~masks[b, k]
            assert own[b, k].item() == pytest.approx(float(maps[b, k][masks[b, k]].sum()), rel=1e-5)
            assert other[b, k].item() == pytest.approx(float(maps[b, k][union_others].sum()), rel=1e-5, abs=1e-7)
            assert own[b, k].item() + other[b, k].item() <= 1 + 1e-6


def test_target_token_masks_majority_rule():
    masks = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    masks[0, 0, :2, :3] = True  # 6 of the 16 pixels of token (0, 0): not a majority
    masks[0, 0, 4:8, 4:6] = True  # 8 of the 16 pixels of token (1, 1): half is enough
    tokens = target_token_masks(masks, (2, 2))
    assert tokens.tolist() == [[[False, False, False, True]]]
    with pytest.raises(ValueError, match="multiples"):
        target_token_masks(torch.zeros(1, 1, 7, 8, dtype=torch.bool), (2, 2))


# ----------------------------------------------------------------------------- image scores
def slow_ncc(image: torch.Tensor, template: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    image, template, mask = image.double(), template.double(), mask.bool()
    h, w = template.shape[1:]
    out = torch.zeros(image.shape[1] - h + 1, image.shape[2] - w + 1, dtype=torch.float64)
    t = template[:, mask]
    t = t - t.mean(1, keepdim=True)
    for y in range(out.shape[0]):
        for x in range(out.shape[1]):
            window = image[:, y : y + h, x : x + w][:, mask]
            window = window - window.mean(1, keepdim=True)
            denominator = (t.square().sum() * window.square().sum()).sqrt()
            out[y, x] = 0.0 if window.square().sum() < 1e-10 else (t * window).sum() / denominator
    return out


def test_masked_ncc_matches_a_dense_twin():
    gen = torch.Generator().manual_seed(0)
    image = torch.rand(3, 12, 10, generator=gen)
    template = torch.rand(3, 5, 4, generator=gen)
    mask = torch.rand(5, 4, generator=gen) > 0.3
    torch.testing.assert_close(masked_ncc(image, template, mask).double(), slow_ncc(image, template, mask),
                               atol=2e-5, rtol=1e-4)


def test_masked_ncc_is_gain_and_offset_invariant_and_zero_on_flat_windows():
    gen = torch.Generator().manual_seed(1)
    template = torch.rand(3, 4, 4, generator=gen)
    mask = torch.ones(4, 4, dtype=torch.bool)
    image = torch.full((3, 12, 12), 0.5)
    image[:, 5:9, 2:6] = template * 0.3 + 0.1
    scores = masked_ncc(image, template, mask)
    assert divmod(int(scores.argmax()), scores.shape[1]) == (5, 2)
    assert scores.max().item() == pytest.approx(1.0, abs=1e-4)
    assert scores[0, 8].item() == 0.0  # a flat window
    with pytest.raises(ValueError, match="flat"):
        masked_ncc(image, torch.ones(3, 4, 4), mask)
    with pytest.raises(ValueError, match="no larger"):
        masked_ncc(image, torch.rand(3, 13, 4), torch.ones(13, 4, dtype=torch.bool))


def test_palette_affinity_covers_the_mix_of_the_two_colours():
    palette = torch.tensor([[0.1, 0.2, 0.9], [0.9, 0.9, 0.1]])
    mixes = torch.linspace(0, 1, 5)[:, None] * (palette[1] - palette[0]) + palette[0]  # (5, 3) on the segment
    image = torch.cat((mixes, torch.tensor([[0.9, 0.1, 0.1]]))).T[:, :, None]  # (3, 6, 1)
    affinity = palette_affinity(image, palette)[:, 0]
    torch.testing.assert_close(affinity[:5], torch.ones(5))
    assert affinity[5].item() < 0.01
    with pytest.raises(ValueError, match="sigma"):
        palette_affinity(image, palette, sigma=0.0)


def test_masked_mse_per_region():
    image, target = torch.zeros(3, 2, 2), torch.zeros(3, 2, 2)
    image[:, 0, 0] = 0.5
    masks = torch.tensor([[[True, True], [False, False]], [[False, False], [True, True]]])
    torch.testing.assert_close(masked_mse(image, target, masks), torch.tensor([0.125, 0.0]))


def _canvas(size: int = 64, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, 4, 4, generator=gen) * 0.3 + 0.35
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear")[0]


def _paste(canvas: torch.Tensor, rgba: torch.Tensor, top: int, left: int) -> torch.Tensor:
    out = canvas.clone()
    h, w = rgba.shape[1:]
    alpha = rgba[3:]
    out[:, top : top + h, left : left + w] = rgba[:3] * alpha + out[:, top : top + h, left : left + w] * (1 - alpha)
    return out


def _recolour(rgba: torch.Tensor, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Moves every pixel from the segment of palette ``source`` to the same place on ``target``'s."""
    direction = source[1] - source[0]
    pixels = rgba[:3].flatten(1).T
    along = ((pixels - source[0]) @ direction / direction.square().sum()).clamp(0, 1)
    moved = target[0] + along[:, None] * (target[1] - target[0])
    return torch.cat((moved.T.reshape(3, *rgba.shape[1:]), rgba[3:]))


def _reference(identity: int, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    rgba = render_subject(identity, size)
    return rgba[:3] * rgba[3:] + (1 - rgba[3:]), rgba[3] > 0.5


def _distinct_identities(count: int) -> list[int]:
    chosen, names = [], set()
    for identity in range(1_000_000, 1_000_200):
        colours = set(subject_descriptor(identity).colour_names)
        if colours & names or "white" in colours or "black" in colours:
            continue
        chosen.append(identity)
        names |= colours
        if len(chosen) == count:
            return chosen
    raise AssertionError("not enough identities with distinct colours")


def test_locate_subject_finds_a_pasted_subject():
    identity = _distinct_identities(1)[0]
    reference, mask = _reference(identity)
    image = _paste(_canvas(), render_subject(identity, 32), 20, 9)
    match = locate_subject(image, reference, mask, scales=(0.8, 1.0, 1.4))
    assert match.scale == 1.0 and match.score > 0.9
    rows, cols = mask.any(1).nonzero()[:, 0], mask.any(0).nonzero()[:, 0]
    assert (match.top, match.left) == (20 + int(rows[0]), 9 + int(cols[0]))
    assert bool((match.window[20 : 20 + 32, 9 : 9 + 32] == mask).all())
    with pytest.raises(ValueError, match="fits"):
        locate_subject(image, reference, mask, scales=(3.0,))
    with pytest.raises(ValueError, match="scales"):
        locate_subject(image, reference, mask, scales=())


def test_fidelity_higher_when_the_subject_is_in_the_image():
    first, second, third = _distinct_identities(3)
    references = [_reference(first), _reference(second)]
    palettes = torch.stack([subject_descriptor(i).palette for i in (first, second)])
    with_both = _paste(_paste(_canvas(), render_subject(first, 28), 4, 2), render_subject(second, 28), 30, 33)
    without_first = _paste(_paste(_canvas(), render_subject(third, 28), 4, 2), render_subject(second, 28), 30, 33)
    scores = subject_fidelity(with_both, [r for r, _ in references], [m for _, m in references], palettes)
    missing = subject_fidelity(without_first, [r for r, _ in references], [m for _, m in references], palettes)
    assert scores.ncc[0] > missing.ncc[0] + 0.2
    assert scores.colour[0] > missing.colour[0] + 0.3
    assert scores.ncc[1].item() == pytest.approx(missing.ncc[1].item(), abs=0.05)  # subject 1 is in both


def test_leakage_rises_when_colours_are_swapped():
    first, second = _distinct_identities(2)
    palettes = torch.stack([subject_descriptor(i).palette for i in (first, second)])
    references = [_reference(first), _reference(second)]
    clean = _paste(_paste(_canvas(), render_subject(first, 28), 4, 2), render_subject(second, 28), 30, 33)
    swapped_first = _recolour(render_subject(first, 28), palettes[0], palettes[1])  # first shape, second's colours
    leaked = _paste(_paste(_canvas(), swapped_first, 4, 2), render_subject(second, 28), 30, 33)
    args = ([r for r, _ in references], [m for _, m in references], palettes)
    before, after = subject_fidelity(clean, *args), subject_fidelity(leaked, *args)
    assert after.leakage[0] > before.leakage[0] + 0.3
    assert after.colour[0] < before.colour[0] - 0.3
    assert math.isnan(subject_fidelity(clean, args[0][:1], args[1][:1], palettes[:1]).leakage[0].item())


def test_ground_truth_beats_chance_on_the_held_out_world():
    config = SyntheticEvalConfig(num_refs=(1, 3), generation_samples=3)
    rows = fidelity_baselines(config)
    truth = summarise_records([r for r in rows if r["kind"] == "ground_truth"], by=(),
                              metrics=["sample_ncc", "sample_colour", "sample_leakage"])[0]
    chance = summarise_records([r for r in rows if r["kind"] == "chance"], by=(),
                               metrics=["sample_ncc", "sample_colour", "sample_leakage"])[0]
    assert truth["sample_ncc"] > chance["sample_ncc"] + 0.1
    assert truth["sample_colour"] > chance["sample_colour"] + 0.3
    # leakage has a floor from neighbours and shared colours; "chance" is not its ceiling (another
    # sample's target holds none of these subjects' colours): only check it stays well below colour
    assert truth["sample_leakage"] < truth["sample_colour"] / 3


def test_subject_fidelity_checks_its_inputs():
    sample = SyntheticWorld().sample(0, num_refs=2)
    with pytest.raises(ValueError, match="palettes"):
        subject_fidelity(sample.target, sample.references, sample.reference_masks, torch.rand(3, 2, 3))
    with pytest.raises(ValueError, match="masks"):
        subject_fidelity(sample.target, sample.references, sample.reference_masks[:1], torch.rand(2, 2, 3))


# ----------------------------------------------------------------------------- aggregation and config
def test_summaries_and_table():
    records = [
        {"kind": "denoise", "num_refs": 1, "sigma": 0.5, "hit_rate": 0.2, "overlap": float("nan")},
        {"kind": "denoise", "num_refs": 2, "sigma": 0.5, "hit_rate": 0.4, "overlap": 0.5},
        {"kind": "generation", "num_refs": 2, "index": 0, "sample_ncc": 0.3},
    ]
    by_k = summarise_records(records, metrics=["hit_rate", "overlap", "sample_ncc"])
    assert [r["num_refs"] for r in by_k] == [1, 2]
    assert by_k[1] == {"num_refs": 2, "hit_rate": 0.4, "overlap": 0.5, "sample_ncc": 0.3}
    assert math.isnan(by_k[0]["overlap"]) and math.isnan(by_k[0]["sample_ncc"])
    by_sigma = summarise_records(records, by=("sigma",), metrics=["hit_rate"])
    assert by_sigma == [{"sigma": 0.5, "hit_rate": pytest.approx(0.3)}]  # generation records have no sigma
    table = ablation_table({"a": [{"hit_rate": 0.1}, {"hit_rate": 0.3}]}, metrics=["hit_rate", "overlap"],
                           reference_rows={"truth": {"hit_rate": 1.0}})
    assert "| a | 2 | 0.200 ± 0.141 | – |" in table and "| truth | – | 1.000 | – |" in table
    assert set(METRICS) >= {"hit_rate", "log_prob", "overlap", "sample_ncc", "sample_leakage", "ref_gain"}


def test_eval_config_validation():
    with pytest.raises(ValueError, match="num_refs"):
        SyntheticEvalConfig(num_refs=())
    with pytest.raises(ValueError, match="num_refs"):
        SyntheticEvalConfig(num_refs=(1, 9))
    with pytest.raises(ValueError, match="target_size"):
        SyntheticEvalConfig(target_size=40)
    with pytest.raises(ValueError, match="scales"):
        SyntheticEvalConfig(scales=(0.0,))


# ----------------------------------------------------------------------------- the recipe
def run_recipe(out: Path, *extra: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, str(RECIPE), "--smoke", "--output-dir", str(out), *extra],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(RECIPE.parents[1])})  # this checkout's mosaic_kit
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_smoke_run_writes_every_output_and_resumes(tmp_path):
    pytest.importorskip("matplotlib")
    out, docs = tmp_path / "ablation", tmp_path / "docs"
    first = run_recipe(out, "--publish", str(docs))
    settings = ["diffusion", "scal", "scal_mdl"]
    for name in settings:
        run = out / "runs" / name / "seed0"
        for file in ("eval.json", "figure.pt", "images.pt", "transformer.safetensors", "summary.json", "metrics.jsonl",
                     "config.yaml"):
            assert (run / file).is_file(), (name, file)
        payload = json.loads((run / "eval.json").read_text())
        kinds = {(r["kind"], r["num_refs"]) for r in payload["records"]}
        assert kinds == {("denoise", 1), ("denoise", 2), ("generation", 1), ("generation", 2)}
        scal_weight = payload["final_losses"]["scal_weight"]
        assert scal_weight == (0.0 if name == "diffusion" else pytest.approx(0.4))
    results = json.loads((out / "results.json").read_text())
    assert list(results["overall"]) == settings and results["wall_seconds"] > 0
    assert set(results["overall"]["scal"][0]) >= set(METRICS)
    table = (out / "table.md").read_text()
    for row in ("| diffusion | 1 |", "| scal | 1 |", "| scal_mdl | 1 |", "| ground truth (real target) |",
                "| chance (other subjects' target) |", "hit-rate ↑", "sample leakage ↓"):
        assert row in table
    with open(out / "per_k.csv") as handle:
        per_k = list(csv.DictReader(handle))
    assert {(r["setting"], r["num_refs"]) for r in per_k} == {(s, k) for s in settings for k in ("1", "2")}
    with open(out / "records.csv") as handle:
        kinds = {r["kind"] for r in csv.DictReader(handle)}
    assert kinds == {"denoise", "generation", "ground_truth", "chance"}
    for name in ("attention_vs_k.png", "fidelity_vs_k.png", "attention_maps.png", "samples.png"):
        assert (out / name).stat().st_size > 1000
        assert (docs / f"synthetic_{name}").is_file()
    assert not (docs / "synthetic_table.md").exists()
    assert "done earlier" not in first.stdout

    # a finished (setting, seed) is skipped; an unfinished one is trained and evaluated again
    (out / "runs" / "scal" / "seed0" / "eval.json").unlink()
    second = run_recipe(out)
    assert second.stdout.count("done earlier: skipped") == 2
    assert "[scal seed 0] loaded the trained weights" in second.stdout


@pytest.mark.slow
def test_fidelity_preset_smoke_run_scores_presence_with_intervals_and_held_out_identities(tmp_path):
    """The fidelity world (docs/results/fidelity.md): generation through the family, presence,
    t-intervals over seeds and the held-out table; one setting, two seeds, to stay quick."""
    pytest.importorskip("matplotlib")
    out = tmp_path / "fidelity"
    run_recipe(out, "--preset", "fidelity-cpu", "ablation.seeds=[0,1]",
               "ablation.settings={diffusion: {scal_weight: 0.0, mdl_weight: 0.0}}",
               "ablation.held_out_eval={attention_samples: 1, sigmas: [0.5], generation_samples: 1}",
               "eval.target_size=32", "eval.ref_size=16", "train.data.target_size=32", "train.data.ref_size=16")
    results = json.loads((out / "results.json").read_text())
    assert results["interval"] == "t95"
    assert [len(results["overall"]["diffusion"])] == [2]
    assert all("sample_presence" in row for row in results["overall"]["diffusion"])
    assert results["held_out_overall"]["diffusion"][0]["sample_presence"] >= 0
    table = (out / "table.md").read_text()
    assert "95 % Student-t interval" in table and "sample presence ↑" in table and "Held-out identities" in table
    payload = json.loads((out / "runs" / "diffusion" / "seed0" / "eval.json").read_text())
    world = json.loads(json.dumps(results["eval"]["world"]))
    assert world["identity_range"] == [0, 8] and payload["held_out_records"]
    assert "| diffusion | 2 |" in table and " ± " in table.split("| diffusion | 2 |")[1].splitlines()[0]
