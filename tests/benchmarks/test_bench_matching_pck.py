"""The matching-quality benchmark: it runs on real photos and writes its report; its scoring is exact."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from helpers import dreambench_for_tests

from mosaic_kit.correspondence import DenseMatches
from mosaic_kit.features import parse_extractor_spec

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("bench_matching_pck", ROOT / "benchmarks" / "bench_matching_pck.py")
bench = importlib.util.module_from_spec(spec)
sys.modules["bench_matching_pck"] = bench
spec.loader.exec_module(bench)

PHOTOS = ["--data", str(dreambench_for_tests())]


def test_extractor_specs_parse():
    assert parse_extractor_spec("sift") == ("sift", {})
    assert parse_extractor_spec("sift:patch_size=16,rootsift=false,sigma=1.5,layer=up") == (
        "sift", {"patch_size": 16, "rootsift": False, "sigma": 1.5, "layer": "up"}
    )
    with pytest.raises(ValueError, match="key=value"):
        parse_extractor_spec("sift:patch_size")


def test_scoring_of_exact_and_shifted_matches():
    # A 4×4 grid on a 64-px image (16 px cells) and a homography shifting by one cell to the right.
    shift = torch.tensor([[[1.0, 0.0, 16.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])
    index = (torch.arange(16) + 1).clamp_max(15)[None]  # cell (r, c) → cell (r, c + 1)
    valid = torch.ones(1, 16, dtype=torch.bool)
    matches = DenseMatches(index, torch.ones(1, 16), valid, (4, 4), (4, 4))
    [row] = bench.score_matches(matches, shift, 64)
    # The last column leaves the image; the 12 others are matched to the right cell.
    assert row["in_view"] == 12 and row["kept"] == 12 and row["coverage"] == 1.0
    assert row["pck@0.05"] == 1.0 and row["pck@0.10"] == 1.0
    # Drop half of the in-view cells: coverage halves, PCK stays.
    keep = valid.clone()
    keep[0, :8] = False  # the top two rows
    [row] = bench.score_matches(matches.with_valid(keep), shift, 64)
    assert row["kept"] == 6 and row["coverage"] == 0.5 and row["pck@0.05"] == 1.0
    # Staying put is one cell (16 px) off: beyond 0.05 * 64 = 3.2 px and 0.10 * 64 = 6.4 px.
    [row] = bench.score_identity((4, 4), shift, 64)
    assert row["kept"] == 12 and row["pck@0.05"] == 0.0 and row["pck@0.10"] == 0.0
    # Nothing kept: no PCK, and the summary says so.
    [row] = bench.score_matches(matches.with_valid(torch.zeros(1, 16, dtype=torch.bool)), shift, 64)
    assert row["pck@0.05"] is None and row["coverage"] == 0.0
    summary = bench.summarise([row])
    assert summary["images_without_kept_cells"] == 1 and summary["pck@0.05"]["n"] == 0


def test_benchmark_runs_on_two_photos_and_writes_its_report(tmp_path):
    out = tmp_path / "report.json"
    argv = [
        "--subjects", "dog,teapot", "--images-per-subject", "1", "--size", "64", "--grid", "8",
        "--extractor", "sift:patch_size=16", "--extractor", "sift:patch_size=8", "--out", str(out), *PHOTOS,
    ]
    report = bench.main(argv)
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(report))
    assert saved["settings"]["photos"] == 2 and saved["settings"]["subjects"] == ["dog", "teapot"]
    assert saved["settings"]["size"] == 64 and saved["settings"]["filters"] == list(bench.FILTERS)
    assert saved["hardware"]["device"] == "cpu" and saved["timing"]["total_s"] > 0
    settings = {(r["extractor"], r["filter"]) for r in saved["results"]}
    expected = {(e, f) for e in ("sift:patch_size=16", "sift:patch_size=8") for f in ("none", "mutual", "cycle1")}
    expected |= {("sift:patch_size=16 + sift:patch_size=8", "consensus"), ("identity", "none")}
    assert settings == expected
    for result in saved["results"]:
        assert result["images"] == 2
        for key in ("pck@0.05", "pck@0.10", "coverage"):
            assert set(result[key]) == {"n", "mean", "std", "median", "q25", "q75", "min", "max"}
            if result[key]["n"]:
                assert 0.0 <= result[key]["min"] <= result[key]["median"] <= result[key]["max"] <= 1.0
        assert result["pooled"]["kept"] <= result["pooled"]["in_view"] <= 2 * 64
        if result["filter"] == "none":
            assert result["coverage"]["mean"] == 1.0
        if result["pooled"]["kept"]:
            assert result["pooled"]["pck@0.05"] <= result["pooled"]["pck@0.10"]
    assert [p["subject"] for p in saved["photos"]] == ["dog", "teapot"]
    assert len(saved["photos"][0]["results"]) == len(expected)


def test_the_warps_depend_only_on_the_seed_and_the_photo(tmp_path):
    common = ["--images-per-subject", "1", "--size", "32", "--grid", "4", "--extractor", "sift:patch_size=8", *PHOTOS]
    example = tmp_path / "example.png"
    one = bench.main(["--subjects", "dog", *common, "--out", str(tmp_path / "a.json"), "--example", str(example)])
    assert example.stat().st_size > 0
    two = bench.main(["--subjects", "cat,dog", *common, "--out", str(tmp_path / "b.json")])
    assert one["photos"][0] == two["photos"][1]
    other_seed = bench.main(["--subjects", "dog", *common, "--seed", "1", "--out", str(tmp_path / "c.json")])
    assert other_seed["photos"][0]["homography"] != one["photos"][0]["homography"]
