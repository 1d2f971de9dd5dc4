"""XVerseBench through recipes/evaluate.py and mosaic_kit.eval.xversebench on a tiny fake benchmark
written in the benchmark's own format: reading the case files, generation through a pipeline,
records, resume, shards, and an end-to-end recipe run that is killed and resumed."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("transformers")

from xverse_fixtures import write_fake_xversebench

from mosaic_kit.eval.xversebench import (
    XVerseBench,
    XVerseGeneration,
    evaluate_xversebench,
    generate_case_images,
    judge_task_type,
    list_cases,
    tiny_xverse_scorers,
)

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("evaluate_recipe_xversebench", ROOT / "recipes" / "evaluate.py")
recipe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(recipe)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def bench_dir(tmp_path) -> Path:
    return write_fake_xversebench(tmp_path / "XVerse")


@pytest.fixture(scope="module")
def scorers():
    return tiny_xverse_scorers(seed=0)


class RecordingPipeline:
    """A reference-image pipeline test double: records its calls, returns a flat image whose
    colour is the mean of the references'."""

    def __init__(self):
        self.calls = []

    def __call__(self, *, prompt, reference_images, height, width, generator, **kwargs):
        self.calls.append({"prompt": prompt, "references": [r.size for r in reference_images], "height": height,
                           "width": width, "seed": generator.initial_seed(), **kwargs})
        colour = tuple(sum(r.resize((1, 1)).getpixel((0, 0))[c] for r in reference_images) // len(reference_images)
                       for c in range(3))
        return type("Out", (), {"images": [Image.new("RGB", (width, height), colour)]})()


def test_case_files_are_read_in_the_benchmarks_format(bench_dir):
    bench = XVerseBench.load(bench_dir)
    single, multi = bench.cases["single"], bench.cases["multi"]
    assert [c.case_id for c in single + multi] == ["single/000", "single/001", "multi/000"]
    assert single[1].prompt == "a corgi on the beach\n"  # kept exactly: the DSG file is matched on it
    assert [(s.name, s.kind, s.label) for s in multi[0].subjects] == [
        ("human_00_boy.jpg", "human", "boy"), ("object_00_motorcycle.jpg", "object", "motorcycle"),
        ("animal_03_corgi.png", "animal", "corgi")]
    assert multi[0].dependencies["3"] == (1, 2) and single[0].questions["1"] == "Is there a boy?"
    assert [judge_task_type(c) for c in single + multi] == ["single_character", "single_object", "multiple_character_object"]
    assert [c.case_id for c in list_cases(bench, shard=(1, 2))] == ["single/001"]
    assert [c.case_id for c in list_cases(bench, splits=("multi",))] == ["multi/000"]


def test_bad_case_files_are_refused_with_the_reason(bench_dir):
    dsg = bench_dir / "eval" / "tools" / "XVerseBench_single_DSG.json"
    questions = json.loads(dsg.read_text())
    questions[1]["prompt"] = "another prompt"
    dsg.write_text(json.dumps(questions))
    with pytest.raises(ValueError, match="DSG.json\\[1\\] to be the questions"):
        XVerseBench.load(bench_dir)
    (bench_dir / "assets" / "XVerseBench" / "human" / "00_boy.jpg").unlink()
    with pytest.raises(ValueError, match="00_boy.jpg"):
        XVerseBench.load(bench_dir, splits=("multi",))
    with pytest.raises(ValueError, match="shard"):
        list_cases(XVerseBench(bench_dir, {"single": ()}), splits=("single",), shard=(2, 2))


def test_generation_calls_the_pipeline_with_xverse_sizes_and_seeds(bench_dir, tmp_path):
    bench = XVerseBench.load(bench_dir)
    case = bench.cases["multi"][0]
    from mosaic_kit.eval.xversebench.benchmark import open_subject_photo

    photos = {s.name: open_subject_photo(s.image_path) for s in case.subjects}
    pipe = RecordingPipeline()
    paths = generate_case_images(pipe, case, photos, tmp_path / "images", XVerseGeneration(pipeline_kwargs={"x": 1}))
    assert [p.relative_to(tmp_path / "images").as_posix() for p in paths] == [f"multi/000/{i:02d}.png" for i in range(4)]
    assert [c["seed"] for c in pipe.calls] == [42, 43, 44, 45]
    assert {(c["height"], c["width"], c["ref_size"], c["x"]) for c in pipe.calls} == {(768, 768, 256, 1)}
    assert pipe.calls[0]["references"] == [(256, 256)] * 3
    generate_case_images(pipe, case, photos, tmp_path / "images")
    assert len(pipe.calls) == 4  # nothing redone


def test_run_writes_records_and_summary_and_resumes(bench_dir, tmp_path, scorers):
    bench = XVerseBench.load(bench_dir)
    settings = XVerseGeneration(height=32, width=32, reference_size=16)
    out = tmp_path / "run"
    first = list_cases(bench, shard=(0, 2))
    summary = evaluate_xversebench(bench, first, out, scorers, pipe=RecordingPipeline(), generation=settings, progress=False)
    assert summary["records"] == 2 and not summary["complete"] and summary["run"]["scored"] == 2
    record = json.loads((out / "cases" / "multi" / "000.json").read_text())
    assert record["num_images"] == 4 and len(record["dpg_per_image"]) == 4 and len(record["dsg_answers"][0]) == 3
    assert set(record["id_sim"]) == {"human_00_boy.jpg"} and set(record["ip_sim"]) == {"object_00_motorcycle.jpg", "animal_03_corgi.png"}
    assert all(len(v) == 4 for v in record["ip_sim"].values()) and record["aes_input"] == "grid"
    # the other shard completes the run; the first shard's records are read back, not redone
    stamp = (out / "cases" / "multi" / "000.json").stat().st_mtime_ns
    pipe = RecordingPipeline()
    summary = evaluate_xversebench(bench, list_cases(bench), out, scorers, pipe=pipe, generation=settings, progress=False)
    assert summary["complete"] and summary["run"] == {"cases": 3, "scored": 1, "resumed": 2, "missing": []}
    assert (out / "cases" / "multi" / "000.json").stat().st_mtime_ns == stamp and len(pipe.calls) == 4
    assert json.loads((out / "summary.json").read_text())["single"]["cases"] == 2
    assert "| **this run** |" in (out / "summary.md").read_text()


def test_score_only_needs_images_unless_missing_allowed(bench_dir, tmp_path, scorers):
    bench = XVerseBench.load(bench_dir, splits=("single",), num_images=1)
    images = tmp_path / "images" / "single" / "001"
    images.mkdir(parents=True)
    Image.new("RGB", (32, 32), "orange").save(images / "a.png")
    with pytest.raises(ValueError, match="1 of 2 cases have none"):
        evaluate_xversebench(bench, list_cases(bench), tmp_path / "out", scorers, images_root=tmp_path / "images")
    summary = evaluate_xversebench(bench, list_cases(bench), tmp_path / "out", scorers, images_root=tmp_path / "images",
                                   allow_missing=True, progress=False)
    assert summary["run"]["missing"] == ["single/000"] and summary["single"]["cases"] == 1
    assert summary["single"]["id_sim"] is None and summary["single"]["avg"] is None  # the only case with a human is missing


def recipe_command(bench_dir: Path, out: Path) -> list[str]:
    return [sys.executable, str(ROOT / "recipes" / "evaluate.py"), "--benchmark", "xversebench", "--xversebench",
            str(bench_dir), "--generate", "--tiny", "--tiny-metrics", "--judge", "tiny", "--images-per-prompt", "2",
            "--height", "32", "--width", "32", "--ref-size", "32", "--steps", "2", "--max-sequence-length", "16",
            "--device", "cpu", "--no-progress", "--output-dir", str(out)]


@pytest.mark.slow
def test_recipe_end_to_end_resumes_after_a_kill(bench_dir, tmp_path):
    """3 cases on the CPU through recipes/evaluate.py: killed once the first record is written,
    rerun, it resumes (the first record is not redone) and the summary covers all 3 cases."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(recipe_command(bench_dir, out), env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 300
    while not list((out / "cases").rglob("*.json")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    _, stderr = process.communicate()
    records = list((out / "cases").rglob("*.json"))
    assert len(records) == 1, stderr.decode()[-2000:]
    assert not (out / "summary.json").exists()
    first, stamp = records[0], records[0].stat().st_mtime_ns
    done = subprocess.run(recipe_command(bench_dir, out), env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and summary["records"] == 3
    assert summary["run"]["resumed"] == 1 and summary["run"]["scored"] == 2
    assert first.stat().st_mtime_ns == stamp
    for split in ("single", "multi"):
        assert all(summary[split][k] is not None for k in ("dpg", "id_sim", "ip_sim", "aes", "avg"))
    assert summary["overall"] is not None and summary["judge"]["task_types"].keys() == {
        "single_character", "single_object", "multiple_character_object"}
    assert "| **this run** |" in done.stdout and "Table 2" in done.stdout
    assert len(list((out / "images").rglob("*.png"))) == 6
    settings = json.loads((out / "settings.json").read_text())
    assert settings["benchmark"] == "xversebench" and settings["pipeline"] == "tiny-flux1"


def test_recipe_options_for_xversebench(bench_dir, monkeypatch):
    parse_args = recipe.parse_args
    args = parse_args(["--benchmark", "xversebench", "--xversebench", str(bench_dir), "--score-only", "x", "--output-dir", "o",
                       "--shard", "1/3"])
    assert (args.height, args.width, args.ref_size, args.seed, args.shard) == (768, 768, 256, 42, (1, 3))
    defaults = parse_args(["--score-only", "x", "--output-dir", "o"])
    assert (defaults.height, defaults.ref_size, defaults.seed) == (512, 512, 0)
    monkeypatch.delenv("MOSAIC_XVERSEBENCH", raising=False)
    with pytest.raises(SystemExit):
        parse_args(["--benchmark", "xversebench", "--score-only", "x", "--output-dir", "o"])
    with pytest.raises(SystemExit):
        parse_args(["--benchmark", "xversebench", "--xversebench", "b", "--score-only", "x", "--output-dir", "o", "--shard", "3/3"])
