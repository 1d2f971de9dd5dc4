"""recipes/evaluate.py and the DreamBench harness of mosaic_kit.eval, on a small synthetic benchmark."""

from __future__ import annotations

import csv
import importlib.util
import itertools
import json
import random
import sys
from pathlib import Path

import pytest
from helpers import dreambench_for_tests
from PIL import Image

pytest.importorskip("transformers")

from mosaic_kit.data import DREAMBENCH_MULTI_CASES
from mosaic_kit.eval import (
    DreamBench,
    EvalCase,
    find_case_images,
    image_seed,
    list_cases,
)

ROOT = Path(__file__).resolve().parents[2]
REAL_DREAMBENCH = dreambench_for_tests()

spec = importlib.util.spec_from_file_location("evaluate_recipe", ROOT / "recipes" / "evaluate.py")
recipe = importlib.util.module_from_spec(spec)
sys.modules["evaluate_recipe"] = recipe
spec.loader.exec_module(recipe)

PALETTES = {
    "backpack": [(200, 30, 30), (150, 20, 20)],
    "can": [(30, 60, 220), (200, 200, 250)],
    "dog": [(240, 240, 230), (90, 70, 40)],
}
KINDS = {"backpack": ("backpack", "object"), "can": ("can", "object"), "dog": ("dog", "live")}


def pattern(palette, seed: int, size=(48, 40)) -> Image.Image:
    rng = random.Random(seed)
    image = Image.new("RGB", size, (128, 128, 128))
    for y, x in itertools.product(range(0, size[1], 8), range(0, size[0], 8)):
        image.paste(rng.choice(palette), (x, y, x + 8, y + 8))
    return image


@pytest.fixture
def bench_dir(tmp_path) -> Path:
    """A DreamBench-shaped folder: 3 subjects with 2-3 small photos, 3 prompts per kind, 2 pairs."""
    root = tmp_path / "dreambench"
    for index, (name, palette) in enumerate(PALETTES.items()):
        (root / name).mkdir(parents=True)
        for i in range(2 + index % 2):
            pattern(palette, seed=10 * index + i).save(root / name / f"{i:02d}.jpg")
    meta = {
        "subjects": [{"name": name, "class": cls, "kind": kind} for name, (cls, kind) in KINDS.items()],
        "prompts": {
            "object": ["a {0} {1} in the jungle", "a {0} {1} in the snow", "a {0} {1} on the beach"],
            "live": ["a {0} {1} in the jungle", "a {0} {1} wearing a red hat", "a {0} {1} on the beach"],
        },
    }
    (root / "prompts.json").write_text(json.dumps(meta))
    pairs = [
        {"subjects": ["dog", "backpack"], "prompt": "a {dog} and a {backpack} on a beach"},
        {"subjects": ["can", "dog", "backpack"], "prompt": "a {can}, a {dog} and a {backpack} in a kitchen"},
    ]
    (root / "pairs_multi.json").write_text(json.dumps(pairs))
    return root


CASE_ARGS = ["--max-subjects", "2", "--max-prompts", "2", "--max-multi", "1", "--images-per-prompt", "2"]


def selected_cases(bench_dir: Path) -> list[EvalCase]:
    return list_cases(DreamBench.load(bench_dir), max_subjects=2, max_prompts=2, max_multi=1, images_per_prompt=2)


def check_outputs(out: Path, cases: list[EvalCase], images_root: Path) -> dict:
    """Checks every file a run writes; returns the summary."""
    assert sorted(p.name for p in out.iterdir() if p.name != "images") == [
        "cases", "results.csv", "results.json", "settings.json", "sheets", "summary.json", "summary.md",
    ]
    assert not list(out.rglob(".*.tmp"))  # atomic writes leave nothing behind
    metrics = ("clip_i", "clip_t", "dino", "clip_i_whole", "dino_whole")
    results = json.loads((out / "results.json").read_text())
    assert [r["case_id"] for r in results] == [c.case_id for c in cases]
    for case, result in zip(cases, results):
        stored = json.loads((out / "cases" / f"{case.case_id}.json").read_text())
        assert stored == result
        assert result["prompt"] == case.prompt and result["subjects"] == list(case.subjects)
        assert result["num_images"] == len(result["images"]) == 2
        assert all((images_root / name).is_file() for name in result["images"])
        for metric in metrics:
            assert -100 <= result[metric] <= 100
            assert len(result["per_image"][metric]) == 2
            assert result[metric] == pytest.approx(sum(result["per_image"][metric]) / 2, abs=1e-3)
        if case.setting == "multi":
            assert list(result["per_subject"]) == list(case.subjects)
            for scores in result["per_subject"].values():
                assert len(scores["clip_i_boxes"]) == len(scores["dino_boxes"]) == 2
                assert all(len(box) == 4 for box in scores["clip_i_boxes"])
        else:
            assert "per_subject" not in result
            assert (result["clip_i"], result["dino"]) == (result["clip_i_whole"], result["dino_whole"])
    with open(out / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["case_id"] for row in rows] == [c.case_id for c in cases]
    assert set(rows[0]) == {"case_id", "setting", "subjects", "index", "prompt", "num_images", *metrics}
    for row, result in zip(rows, results):
        assert float(row["clip_i"]) == pytest.approx(result["clip_i"]) and row["subjects"] == "+".join(result["subjects"])
    summary = json.loads((out / "summary.json").read_text())
    singles = [r for r in results if r["setting"] == "single"]
    assert summary["single"]["cases"] == len(singles) == 4 and summary["single"]["images"] == 8
    assert summary["multi"]["cases"] == 1 and summary["multi"]["images"] == 2
    for metric in metrics:
        assert summary["single"][metric] == pytest.approx(sum(r[metric] for r in singles) / 4, abs=1e-3)
    markdown = (out / "summary.md").read_text()
    assert "| Setting | Cases | Images | CLIP-I ↑ | CLIP-T ↑ | DINO ↑ |" in markdown
    assert f"| Single-Subject | 4 | 8 | {summary['single']['clip_i']:.2f} |" in markdown
    assert "| Multi-Subject | 1 | 2 |" in markdown and "| Multi-Subject (whole image) | 1 | 2 |" in markdown
    subjects = sorted({c.subjects[0] for c in cases if c.setting == "single"})
    assert sorted(summary["sheets"]) == sorted([f"sheets/single/{s}.png" for s in subjects] + ["sheets/multi.png"])
    for sheet in summary["sheets"]:
        with Image.open(out / sheet) as image:
            assert image.format == "PNG" and image.width >= 128 and image.height >= 128
    settings = json.loads((out / "settings.json").read_text())
    assert settings["metrics"] == "tiny" and settings["images_per_prompt"] == 2
    return summary


def test_score_only_run_writes_every_file_and_resumes(bench_dir, tmp_path, capsys):
    cases = selected_cases(bench_dir)
    assert [c.setting for c in cases] == ["single"] * 4 + ["multi"]
    images = tmp_path / "generated"
    for case in cases:
        folder = images / case.case_id
        folder.mkdir(parents=True)
        name = case.subjects[0]
        for i in range(3):  # one more than --images-per-prompt: the first two (by name) are scored
            pattern(PALETTES[name], seed=100 + i, size=(64, 64)).save(folder / f"{i:02d}.png")
        (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "run"
    args = ["--score-only", str(images), "--output-dir", str(out), "--dreambench", str(bench_dir), "--tiny-metrics", "--no-progress",
            *CASE_ARGS]
    summary = recipe.main(args)
    assert (summary["scored_cases"], summary["resumed_cases"], summary["missing_cases"]) == (5, 0, [])
    assert check_outputs(out, cases, images) == summary
    result = json.loads((out / "results.json").read_text())[0]
    assert result["images"] == [f"{cases[0].case_id}/00.png", f"{cases[0].case_id}/01.png"]

    # a rerun resumes every case and writes the same results
    before = (out / "results.json").read_text()
    again = recipe.main(args)
    assert (again["scored_cases"], again["resumed_cases"]) == (0, 5)
    assert (out / "results.json").read_text() == before

    # other settings in the same folder are refused (a one-line usage error); --overwrite redoes everything
    with pytest.raises(SystemExit) as refused:
        recipe.main(args + ["--crop-stride", "0.25"])
    error = capsys.readouterr().err
    assert refused.value.code == 2 and "crop_stride" in error and len(error.strip().splitlines()) == 1
    redone = recipe.main(args + ["--crop-stride", "0.25", "--overwrite"])
    assert redone["scored_cases"] == 5 and redone["crop_stride"] == 0.25


def test_score_only_refuses_missing_cases_unless_allowed(bench_dir, tmp_path):
    cases = selected_cases(bench_dir)
    images = tmp_path / "generated"
    for case in cases[1:]:
        (images / case.case_id).mkdir(parents=True)
        for i in range(2):
            pattern(PALETTES[case.subjects[0]], seed=i).save(images / case.case_id / f"{i}.jpg")
    args = ["--score-only", str(images), "--dreambench", str(bench_dir), "--tiny-metrics", "--no-progress", "--no-sheets",
            *CASE_ARGS]
    with pytest.raises(ValueError, match=f"1 of 5 cases have none.*{cases[0].case_id}"):
        recipe.main(args + ["--output-dir", str(tmp_path / "a")])
    summary = recipe.main(args + ["--output-dir", str(tmp_path / "b"), "--allow-missing"])
    assert summary["missing_cases"] == [cases[0].case_id] and summary["single"]["cases"] == 3
    assert not (tmp_path / "b" / "sheets").exists()


def test_generation_smoke_run(bench_dir, tmp_path):
    pipelines = pytest.importorskip("mosaic_kit.pipelines")
    if not hasattr(pipelines, "tiny_mosaic_pipeline"):
        pytest.skip("mosaic_kit.pipelines.tiny_mosaic_pipeline is not available yet")
    cases = selected_cases(bench_dir)
    out = tmp_path / "run"
    args = ["--generate", "--tiny", "--tiny-metrics", "--output-dir", str(out), "--dreambench", str(bench_dir), "--no-progress",
            "--device", "cpu", "--height", "32", "--width", "32", "--ref-size", "32", "--steps", "1",
            "--max-sequence-length", "8", *CASE_ARGS]
    summary = recipe.main(args)
    assert summary["scored_cases"] == 5 and summary["generation"]["height"] == 32
    images = out / "images"
    check_outputs(out, cases, images)
    for case in cases:
        paths = find_case_images(images, case)
        assert [p.name for p in paths] == ["00.png", "01.png"]
        for path in paths:
            with Image.open(path) as image:
                assert image.size == (32, 32)
    settings = json.loads((out / "settings.json").read_text())
    assert settings["pipeline"] == "tiny" and settings["steps"] == 1
    # resuming: nothing is generated or scored again
    stamps = {p: p.stat().st_mtime_ns for p in images.rglob("*.png")}
    assert recipe.main(args)["resumed_cases"] == 5
    assert {p: p.stat().st_mtime_ns for p in images.rglob("*.png")} == stamps


def recorder(calls: list):
    """A pipeline stand-in class that records its keyword arguments and returns black images."""

    class Recorder:
        def __call__(self, **kwargs):
            calls.append(kwargs)
            return type("Output", (), {"images": [Image.new("RGB", (kwargs["width"], kwargs["height"]))]})()

    return Recorder


def test_generation_calls_the_pipeline_with_the_documented_interface(bench_dir, tmp_path):
    from mosaic_kit.eval import GenerationSettings, generate_case_images

    calls = []
    Recorder = recorder(calls)
    bench = DreamBench.load(bench_dir)
    case = list_cases(bench, settings=["multi"], max_multi=1, images_per_prompt=2, seed=0)[0]
    settings = GenerationSettings(height=16, width=48, num_inference_steps=3, guidance_scale=2.0, seed=5,
                                  reference_index=1, reference_size=None, pipeline_kwargs={"progress": False})
    paths = generate_case_images(Recorder(), bench, case, tmp_path / "images", settings)
    assert len(calls) == 2 and all(p.is_file() for p in paths)
    first = calls[0]
    assert set(first) == {"prompt", "reference_images", "height", "width", "num_inference_steps", "guidance_scale",
                          "generator", "progress"}
    assert first["prompt"] == case.prompt and len(first["reference_images"]) == len(case.subjects)
    assert first["reference_images"][0].size == (48, 40)  # photo 01 as read; the pipeline preprocesses
    assert first["generator"].initial_seed() == image_seed(5, case.case_id, 0)
    assert calls[1]["generator"].initial_seed() == image_seed(5, case.case_id, 1)
    generate_case_images(Recorder(), bench, case, tmp_path / "images", settings)
    assert len(calls) == 2  # existing images are not regenerated
    with pytest.raises(ValueError, match="pipeline_kwargs"):
        GenerationSettings(pipeline_kwargs={"height": 3})
    with pytest.raises(ValueError, match="reference_index"):
        generate_case_images(Recorder(), bench, case, tmp_path / "other", GenerationSettings(reference_index=5))


def test_case_listing_and_prompts(bench_dir):
    bench = DreamBench.load(bench_dir)
    cases = list_cases(bench, images_per_prompt=1)
    assert len(cases) == 3 * 3 + 2
    assert cases[0].case_id == "single/backpack/00" and cases[0].prompt == "a backpack in the jungle"
    dog = [c for c in cases if c.subjects == ("dog",)]
    assert dog[1].prompt == "a dog wearing a red hat"
    assert cases[-1].prompt == "a can, a dog and a backpack in a kitchen" and cases[-1].case_id == "multi/01"
    with_token = list_cases(bench, settings=["multi"], identifier="sks", images_per_prompt=1)
    assert with_token[0].prompt == "a sks dog and a sks backpack on a beach"
    a = list_cases(bench, max_subjects=2, max_prompts=2, seed=3)
    assert a == list_cases(bench, max_subjects=2, max_prompts=2, seed=3)
    assert len({c.subjects for c in a if c.setting == "single"}) == 2
    with pytest.raises(ValueError, match="max_subjects"):
        list_cases(bench, max_subjects=4)
    with pytest.raises(ValueError, match="settings"):
        list_cases(bench, settings=["both"])
    with pytest.raises(ValueError, match="images_per_prompt"):
        list_cases(bench, images_per_prompt=0)


def test_benchmark_validation(bench_dir):
    pairs = json.loads((bench_dir / "pairs_multi.json").read_text())
    pairs.append({"subjects": ["dog", "cat"], "prompt": "a {dog} and a {cat}"})
    (bench_dir / "pairs_multi.json").write_text(json.dumps(pairs))
    with pytest.raises(ValueError, match=r"unknown \['cat'\]"):
        DreamBench.load(bench_dir)
    with pytest.raises(ValueError, match="not a folder"):
        DreamBench.load(bench_dir / "missing")


def test_the_real_benchmark_follows_the_paper_protocol():
    """On the real photos (the full copy, or the repository's subset of it): 25 prompts per subject
    and 4 images per prompt, and the toolkit's multi-subject cases whose subjects are all there;
    the full protocol has 30 subjects (3,000 images) and 20 multi-subject cases of 2-4 subjects."""
    bench = DreamBench.load(REAL_DREAMBENCH)
    cases = list_cases(bench)
    single = [c for c in cases if c.setting == "single"]
    multi = [c for c in cases if c.setting == "multi"]
    assert len(single) == len(bench.subjects) * 25 and sum(c.num_images for c in single) == 4 * len(single)
    assert {c.subjects[0] for c in single} == set(bench.subjects) and {"dog", "cat", "teapot"} <= set(bench.subjects)
    assert {s.kind for s in bench.subjects.values() if s.class_name in ("dog", "cat")} == {"live"}
    complete = [case for case in DREAMBENCH_MULTI_CASES if set(case["subjects"]) <= set(bench.subjects)]
    assert list(bench.pairs) == complete and len(multi) == len(complete) >= 3
    assert multi[0].prompt == "a dog and a backpack on a beach"
    assert all("{" not in c.prompt for c in cases)
    assert len(DREAMBENCH_MULTI_CASES) == 20 and len({s for c in DREAMBENCH_MULTI_CASES for s in c["subjects"]}) == 30
    sizes = [len(c["subjects"]) for c in DREAMBENCH_MULTI_CASES]
    assert (sizes.count(2), sizes.count(3), sizes.count(4)) == (7, 6, 7)
    if len(bench.subjects) == 30:  # the full copy
        assert sum(c.num_images for c in single) == 3000 and len(multi) == 20


def test_reference_photos_are_opened_with_the_data_packages_checks(bench_dir, tmp_path):
    """16-bit grey photos keep their grey (PIL's own conversion clips them to white); an unreadable
    photo is a ValueError naming the file, not a raw PIL error."""
    from mosaic_kit.eval import GenerationSettings, generate_case_images

    calls = []
    Recorder = recorder(calls)
    bench = DreamBench.load(bench_dir)
    case = list_cases(bench, settings=["multi"], max_multi=1, images_per_prompt=1, seed=0)[0]
    settings = GenerationSettings(height=16, width=16, num_inference_steps=1, reference_index=1, reference_size=None)
    for name in case.subjects:
        Image.new("I;16", (48, 40), 128 * 257).save(bench_dir / name / "01.jpg", format="PNG")
    generate_case_images(Recorder(), bench, case, tmp_path / "grey", settings)
    assert [r.getpixel((5, 5)) for r in calls[0]["reference_images"]] == [(128, 128, 128)] * len(case.subjects)
    (bench_dir / case.subjects[0] / "01.jpg").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"01\.jpg: expected a readable image file"):
        generate_case_images(Recorder(), bench, case, tmp_path / "broken", settings)
