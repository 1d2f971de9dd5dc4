"""recipes/build_correspondences.py on a tiny manifest of real DreamBench photos."""

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
from helpers import dreambench_for_tests

from mosaic_kit.correspondence import (
    is_disjoint,
    load_correspondences,
    load_released_dicts,
)

ROOT = Path(__file__).resolve().parents[2]
DREAMBENCH = dreambench_for_tests()

spec = importlib.util.spec_from_file_location("build_correspondences", ROOT / "recipes" / "build_correspondences.py")
recipe = importlib.util.module_from_spec(spec)
sys.modules["build_correspondences"] = recipe
spec.loader.exec_module(recipe)


@pytest.fixture
def manifest(tmp_path):
    from PIL import Image

    mask_path = tmp_path / "masks" / "dog_mask.png"
    mask_path.parent.mkdir()
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (8, 8, 56, 56))
    mask.save(mask_path)
    rows = [
        {"id": "dog", "target": str(DREAMBENCH / "dog/00.jpg"), "references": [str(DREAMBENCH / "dog/01.jpg")],
         "target_mask": "masks/dog_mask.png"},
        {"id": "cat_and_can", "target": str(DREAMBENCH / "cat/00.jpg"),
         "references": [str(DREAMBENCH / "cat/01.jpg"), str(DREAMBENCH / "can/00.jpg")]},
        {"id": "teapot", "target": str(DREAMBENCH / "teapot/00.jpg"), "references": [str(DREAMBENCH / "teapot/01.jpg")]},
        {"id": "broken", "target": str(tmp_path / "missing.jpg"), "references": [str(DREAMBENCH / "dog/00.jpg")]},
    ]
    path = tmp_path / "manifest.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _run(manifest, out, *extra):
    return recipe.main([
        "--manifest", str(manifest), "--output-dir", str(out), "--target-size", "128", "--ref-size", "128",
        "--grid", "16", "--draw", "2", *extra,
    ])


def test_recipe_writes_both_formats_drawings_and_a_summary(manifest, tmp_path):
    out = tmp_path / "out"
    summary = _run(manifest, out, "--extractor", "sift", "--extractor", "sift:patch_size=24", "--consensus-radius", "1")
    assert (summary["done"], summary["skipped"], summary["failed"]) == (3, 0, 1)
    assert summary["failures"][0]["id"] == "broken" and "missing.jpg" in summary["failures"][0]["reason"]
    assert not (out / "broken.pt").exists()
    for sample_id, refs in (("dog", 1), ("cat_and_can", 2), ("teapot", 1)):
        corr = load_correspondences(out / f"{sample_id}.pt")
        assert corr.num_refs == refs and corr.ref_tokens == (64,) * refs and corr.tgt_tokens == 64
        assert bool(is_disjoint(corr).all()) and corr.confidence is not None
        assert load_released_dicts(out / f"{sample_id}.json") == corr.to_dicts()
        assert int(corr.num_points.sum()) > 0
    dog = load_correspondences(out / "dog.pt")  # the mask keeps target tokens inside [8, 56)² of 64 px
    rows, cols = dog.tgt_index[dog.point_mask] // 8, dog.tgt_index[dog.point_mask] % 8
    assert bool(((rows >= 1) & (rows <= 6) & (cols >= 1) & (cols <= 6)).all())
    drawings = sorted(p.name for p in (out / "drawings").iterdir())
    assert drawings == ["cat_and_can_ref0.png", "cat_and_can_ref1.png", "dog_ref0.png"]
    assert json.loads((out / "summary-0of1.json").read_text())["done"] == 3


def test_resume_skips_finished_samples(manifest, tmp_path):
    out = tmp_path / "out"
    _run(manifest, out)
    before = {p: p.stat().st_mtime_ns for p in out.glob("*.pt")}
    summary = _run(manifest, out)
    assert (summary["done"], summary["skipped"], summary["failed"]) == (0, 3, 1)
    assert {p: p.stat().st_mtime_ns for p in out.glob("*.pt")} == before
    (out / "teapot.json").unlink()  # a half-finished sample is redone
    assert _run(manifest, out)["done"] == 1


def test_shards_cover_every_sample_once(manifest, tmp_path):
    ids = []
    for shard in range(3):
        summary = _run(manifest, tmp_path / f"shard{shard}", "--shard", f"{shard}/3", "--draw", "0")
        ids += [p.stem for p in (tmp_path / f"shard{shard}").glob("*.pt")] + [f["id"] for f in summary["failures"]]
    assert sorted(ids) == ["broken", "cat_and_can", "dog", "teapot"]


def test_settings_are_recorded_and_a_resume_with_other_settings_is_refused(manifest, tmp_path, capsys):
    out = tmp_path / "out"
    _run(manifest, out, "--extractor", "sift:grid_size=8")  # a spec's own grid size wins over --grid
    assert load_correspondences(out / "dog.pt").num_points.sum() <= 64
    assert json.loads((out / "settings.json").read_text())["extractor"] == [["sift", {"grid_size": 8}]]
    capsys.readouterr()  # the first run's progress bar
    with pytest.raises(SystemExit) as refused:
        _run(manifest, out, "--filter", "mutual", "--extractor", "sift:grid_size=8")
    error = capsys.readouterr().err
    assert refused.value.code == 2 and "other settings (filter: 'none')" in error and len(error.strip().splitlines()) == 1
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "dog.pt").stat().st_mode & 0o777 == 0o666 & ~umask


def test_bad_manifest_and_arguments(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "a b", "target": "x.jpg", "references": ["y.jpg"]}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1: `id` must be"):
        recipe.read_manifest(bad)
    for row, message in (
        ({"id": "a", "target": None, "references": ["y.jpg"]}, "`target` must be a path"),
        ({"id": "a", "target": "x.jpg", "references": [1]}, "`references` must be a non-empty list of paths"),
        ({"id": "settings", "target": "x.jpg", "references": ["y.jpg"]}, "`id` must be"),
        ({"id": "summary-0of1", "target": "x.jpg", "references": ["y.jpg"]}, "`id` must be"),
        ([1, 2], "expected a JSON object"),
    ):
        bad.write_text(json.dumps(row) + "\n")
        with pytest.raises(ValueError, match=message):
            recipe.read_manifest(bad)
    bad.write_text(json.dumps({"id": "a", "target": "x.jpg"}) + "\n")
    with pytest.raises(ValueError, match=r"missing \['references'\]"):
        recipe.read_manifest(bad)
    with pytest.raises(SystemExit):
        recipe.main(["--manifest", str(bad), "--output-dir", str(tmp_path), "--shard", "3/3"])
    with pytest.raises(SystemExit):
        recipe.main(["--manifest", str(bad), "--output-dir", str(tmp_path), "--extractor", "sift:patch_size"])
