"""The data-building pipeline end to end (DatasetBuilder and recipes/build_dataset.py): files written,
resume, shards, one stage rerun, from-files inputs, tiny models for every stage, and training on the
manifest it writes."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import torch
from helpers import dreambench_for_tests
from PIL import Image

from mosaic_kit.correspondence import TokenGrid
from mosaic_kit.data import ManifestDataset, read_manifest
from mosaic_kit.data._images import load_mask
from mosaic_kit.dataset_builder import (
    STAGES,
    DatasetBuilder,
    dataset_config_from_dict,
    dreambench_root,
    in_shard,
    tensor_to_pil,
)

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("build_dataset", ROOT / "recipes" / "build_dataset.py")
recipe = importlib.util.module_from_spec(spec)
sys.modules["build_dataset"] = recipe
spec.loader.exec_module(recipe)

NAMES = ["dog", "cat", "teapot", "clock", "owl"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (tests/conftest.py)


def textured(seed: int, size: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, size // 8, size // 8, generator=generator)
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)[0].clamp(0, 1)


@pytest.fixture
def photos(tmp_path):
    """Five identities with two photos each, and a prompt file of 8 multi-subject prompts."""
    root = tmp_path / "photos"
    for i, name in enumerate(NAMES):
        (root / name).mkdir(parents=True)
        base = textured(i, 96)
        for j in range(2):  # the second photo: the first shifted (another "view")
            tensor_to_pil(torch.roll(base, shifts=(4 * j, 6 * j), dims=(1, 2))).save(root / name / f"{j:02d}.png")
    prompts = [{"subjects": [NAMES[i % 5], NAMES[(i + 1 + i // 5) % 5]] + ([NAMES[(i + 3) % 5]] if i % 3 == 0 else []),
                "prompt": "{%s} and {%s}" % (NAMES[i % 5], NAMES[(i + 1 + i // 5) % 5])
                          + (" and {%s}" % NAMES[(i + 3) % 5] if i % 3 == 0 else "")} for i in range(8)]
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    return tmp_path


def config_for(base: Path, out: Path, **sections) -> dict:
    values = {
        "output_dir": str(out), "seed": 0, "sheets": 2,
        "prompts": {"source": "file", "file": str(base / "prompts.json"), "count": 8},
        "images": {"source": "photo_composites", "root": str(base / "photos"), "canvas_size": 128,
                   "scale_range": [0.3, 0.5]},
        "subjects": {"source": "files", "segmenter": None},
        "filter": {"quality": "sharpness", "min_subject_area": 0.1},
        "references": {"source": "other_views", "size": 64},
        "correspondences": {"extractors": ["sift:patch_size=16"], "grid": 16, "target_size": 64, "ref_size": 32,
                            "min_pairs": 1},
    }
    for key, value in sections.items():
        values[key] = {**values.get(key, {}), **value} if isinstance(value, dict) else value
    return values


def build(values: dict, shard=(0, 1), stages=None, **kwargs) -> tuple[DatasetBuilder, dict]:
    builder = DatasetBuilder(dataset_config_from_dict(values), shard, progress=False, **kwargs)
    builder.run(stages)
    return builder, builder.finish()


def test_builds_a_manifest_with_pairs_inside_masks(photos):
    out = photos / "out"
    builder, summary = build(config_for(photos, out))
    assert summary["items"] == 8 and summary["accepted"] >= 3
    assert summary["accepted"] + summary["rejected_items"] == 8  # every item accepted or rejected with reasons
    assert sum(summary["rejected"].values()) >= summary["rejected_items"] >= 1
    assert summary["stages"]["filter"]["rejected"].get("subject_too_small", 0) >= 1
    for stage in STAGES:
        assert (out / stage).is_dir()
    entries = read_manifest(out / "manifest.jsonl")
    assert len(entries) == summary["accepted"]
    data = ManifestDataset(out / "manifest.jsonl")
    grid = TokenGrid(64, 64)
    for index, entry in enumerate(entries):
        sample = data[index]
        assert sample.target.shape == (3, 64, 64) and all(r.shape == (3, 32, 32) for r in sample.references)
        assert entry.subjects and len(entry.subjects) == sample.num_refs
        provenance = entry.meta["provenance"]
        assert set(provenance) == set(STAGES) and provenance["correspondences"]["eq2_disjoint"]
        claimed = []
        for k, pairs in enumerate(sample.pairs):
            mask = sample.target_masks[k]
            assert bool(mask[pairs[:, 3].long(), pairs[:, 2].long()].all())  # inside the subject's mask
            claimed.append(set(grid.pixel_to_token(pairs[:, 2:]).tolist()))
        assert sum(map(len, claimed)) == len(set().union(*claimed))  # eq. 2 across references
    for record in (out / "filter").glob("*.json"):
        record = json.loads(record.read_text())
        assert {"quality", "clip", "areas", "counts"} - {"clip"} <= set(record["scores"])
        assert record["kept"] == (not record["reasons"])  # a rejected item keeps its scores and reasons
    assert sorted(p.name for p in (out / "sheets").glob("*.png")) == ["accepted.png", "rejected.png"]


def test_resume_skips_finished_items_and_one_stage_reruns(photos):
    out = photos / "out"
    values = config_for(photos, out)
    _, first = build(values)
    manifest = (out / "manifest.jsonl").read_text()
    # a killed run: the correspondences of two items and the references of one are missing
    done = sorted(p.stem for p in (out / "correspondences").glob("*.json"))
    for item in done[:2]:
        (out / "correspondences" / f"{item}.json").unlink()
    (out / "references" / f"{done[0]}.json").unlink()
    stamps = {p: p.stat().st_mtime_ns for p in (out / "images").glob("*.json")}
    builder, second = build(values)
    assert builder.timings["images"]["items"] == 0 and builder.timings["prompts"]["items"] == 0
    assert builder.timings["references"]["items"] == 1 and builder.timings["correspondences"]["items"] == 2
    assert {p: p.stat().st_mtime_ns for p in (out / "images").glob("*.json")} == stamps
    assert (out / "manifest.jsonl").read_text() == manifest and second["accepted"] == first["accepted"]
    # rerun the filter alone with a stricter threshold: every item is decided again
    stricter = config_for(photos, out, filter={"min_subject_area": 0.9})
    builder, third = build(stricter, stages=["filter"], overwrite=True)
    assert builder.timings["filter"]["items"] == 8
    assert third["stages"]["filter"]["kept"] == 0
    # the later records of items the filter now rejects no longer count (they made a stale manifest)
    assert third["stages"]["references"]["done"] == 0 and third["accepted"] == 0 and third["rejected_items"] == 8
    assert (out / "manifest.jsonl").read_text() == "" and third["sheets"] == ["sheets/rejected.png"]
    assert not (out / "sheets" / "accepted.png").exists()  # the old sheet showed items no longer accepted


def snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_resume_with_a_changed_configuration_is_refused_naming_the_keys(photos):
    out = photos / "out"
    values = config_for(photos, out)
    _, first = build(values)
    before = snapshot(out)
    changed = config_for(photos, out, images={"canvas_size": 96}, filter={"min_quality": 5.0})
    keys = r"\(filter\.min_quality: null -> 5; images\.canvas_size: 128 -> 96\)"
    with pytest.raises(ValueError, match=keys + r".* in images \(8 items\), subjects \(8 items\), filter \(8 items\), "
                                          r"references .*--overwrite --stage images --stage subjects --stage filter"):
        build(changed)
    assert snapshot(out) == before  # nothing written, nothing lost
    with pytest.raises(ValueError, match=keys + r".* in subjects \(8 items\), filter .*--overwrite --stage subjects"):
        build(changed, stages=["images"], overwrite=True)  # overwriting the images alone would keep the later records
    assert snapshot(out) == before
    # keys that change no record: the folder's name, the sheets, the prompt count, the batch size
    moved = photos / "moved"
    out.rename(moved)
    neutral = config_for(photos, moved, sheets=1, prompts={"count": 6}, images={"batch_size": 4, "scale_range": (0.3, 0.5)},
                         correspondences={"cycle_radius": 1})  # the same values spelt 1 for 1.0, a tuple for a list
    builder, summary = build(neutral)
    assert all(t["items"] == 0 for t in builder.timings.values()) and summary["items"] == 6
    moved.rename(out)
    # a filter threshold: only the filter's records are stale; its rerun alone is enough
    with pytest.raises(ValueError, match=r"\(filter\.min_subject_area: 0\.1 -> 0\.2\); .* in filter \(8 items\), which"):
        build(config_for(photos, out, filter={"min_subject_area": 0.2}))
    builder, summary = build(config_for(photos, out, filter={"min_subject_area": 0.2}), stages=["filter"], overwrite=True)
    assert builder.timings["filter"]["items"] == 8 and summary["accepted"] <= first["accepted"]
    # overwrite with every stage concerned redoes them; the next resume redoes nothing
    builder, summary = build(changed, overwrite=True)
    assert all(builder.timings[s]["items"] == 8 for s in ("images", "subjects", "filter"))
    builder, again = build(changed)
    assert all(t["items"] == 0 for t in builder.timings.values()) and again["accepted"] == summary["accepted"]
    # a record left over from the old settings (a killed overwrite run) still blocks; deleting
    # its stage's folder is a rerun of that stage, which also redoes the later stale records
    (out / "images" / "p000002.json").write_bytes(before["images/p000002.json"])
    with pytest.raises(ValueError, match=r"canvas_size: 128 -> 96.* in images \(1 items\)"):
        build(changed)
    for path in (out / "images").glob("*.json"):
        path.unlink()
    builder, summary = build(values)  # back to the first settings: every stage is redone, nothing refused
    assert all(builder.timings[s]["items"] == 8 for s in ("images", "subjects"))
    assert (out / "manifest.jsonl").read_text() == before["manifest.jsonl"].decode()


def test_other_shards_stale_records_are_left_out_of_the_manifest(photos):
    out = photos / "out"
    for shard in range(2):
        build(config_for(photos, out), shard=(shard, 2))
    changed = config_for(photos, out, correspondences={"min_pairs": 2})
    builder, summary = build(changed, shard=(0, 2), overwrite=True, stages=["correspondences"])  # shard 1 not redone
    theirs = [p.stem for p in (out / "correspondences").glob("*.json") if in_shard(p.stem, 1, 2)]
    mine = [p.stem for p in (out / "references").glob("*.json")
            if in_shard(p.stem, 0, 2) and json.loads(p.read_text()).get("kept", True)]
    assert builder.timings["correspondences"]["items"] == len(mine) > 0
    assert summary["stale"] == {"correspondences": len(theirs)} and len(theirs) > 0
    ids = [json.loads(line)["id"] for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert ids and all(in_shard(i, 0, 2) for i in ids) and summary["accepted"] == len(ids)


def test_shards_cover_every_item_once(photos):
    whole = photos / "whole"
    build(config_for(photos, whole))
    out = photos / "sharded"
    counts = []
    for shard in range(3):
        builder, _ = build(config_for(photos, out), shard=(shard, 3))
        counts.append(builder.timings["prompts"]["items"])
    assert sum(counts) == 8 and all(c < 8 for c in counts)
    builder = DatasetBuilder(dataset_config_from_dict(config_for(photos, out)), (0, 1), progress=False)
    builder.finish()
    assert (out / "manifest.jsonl").read_text().replace("/sharded/", "/whole/") == (whole / "manifest.jsonl").read_text()


def test_inputs_from_files(photos):
    """Prompts from a list, images from a folder, boxes and masks from JSON/PNG, references from a JSON."""
    images, boxes = photos / "mine" / "images", photos / "mine" / "boxes"
    images.mkdir(parents=True)
    boxes.mkdir()
    references = {}
    for item, (a, b) in enumerate([(0, 1), (2, 3)]):
        canvas = torch.full((3, 64, 96), 0.5)
        canvas[:, 8:56, 4:44] = textured(a, 96)[:, :48, :40]
        canvas[:, 8:56, 52:92] = textured(b, 96)[:, :48, :40]
        tensor_to_pil(canvas).save(images / f"p00000{item}.png")
        mask = torch.zeros(64, 96, dtype=torch.uint8)
        mask[8:56, 4:44] = 255
        Image.fromarray(mask.numpy()).save(boxes / f"p00000{item}_a.png")
        (boxes / f"p00000{item}.json").write_text(json.dumps({"subjects": [
            {"name": NAMES[a], "box": [4, 8, 44, 56], "mask": f"p00000{item}_a.png"},
            {"name": NAMES[b], "box": [52, 8, 92, 56]}]}))
        references[f"p00000{item}"] = [str(photos / "photos" / NAMES[a] / "01.png"), str(photos / "photos" / NAMES[b] / "01.png")]
    (photos / "mine" / "refs.json").write_text(json.dumps(references))
    (photos / "mine" / "prompts.jsonl").write_text("".join(
        json.dumps({"prompt": f"a {NAMES[a]} and a {NAMES[b]}", "subjects": [NAMES[a], NAMES[b]]}) + "\n"
        for a, b in [(0, 1), (2, 3)]))
    out = photos / "out"
    values = config_for(photos, out, prompts={"file": str(photos / "mine" / "prompts.jsonl"), "count": 2},
                        images={"source": "folder", "folder": str(images)},
                        subjects={"source": "files", "folder": str(boxes)}, filter={"min_subject_area": None},
                        references={"source": "files", "files": str(photos / "mine" / "refs.json")})
    _, summary = build(values)
    assert summary["accepted"] == 2
    record = json.loads((out / "subjects" / "p000000.json").read_text())
    assert record["mask_scores"] == [1.0, 0.0]  # a mask file, and a box without one (its box mask)
    mask = load_mask(out / record["masks"][1])
    assert int(mask.sum()) == 48 * 40
    line = json.loads((out / "manifest.jsonl").read_text().splitlines()[0])
    assert line["meta"]["provenance"]["references"]["references"][0]["from"].endswith("dog/01.png")


def test_missing_inputs_are_rejected_with_reasons(photos):
    out = photos / "out"
    empty = photos / "empty"
    empty.mkdir()
    Image.new("RGB", (64, 64)).save(empty / "p000001.png")
    values = config_for(photos, out, images={"source": "folder", "folder": str(empty)})
    _, summary = build(values, stages=["prompts", "images"])
    assert summary["stages"]["images"]["rejected"] == {"image_error": 7} and summary["stages"]["images"]["kept"] == 1
    record = json.loads((out / "images" / "p000000.json").read_text())
    assert not record["kept"] and "p000000" in record["reasons"][0]
    with pytest.raises(ValueError, match="box files"):  # files named for the subjects stage, but none there
        build(values, stages=["subjects"])
    boxes = photos / "boxes"
    boxes.mkdir()
    _, summary = build(config_for(photos, out, images={"source": "folder", "folder": str(empty)},
                                  subjects={"folder": str(boxes)}), stages=["subjects"])
    assert summary["stages"]["subjects"]["rejected"] == {"subjects_error": 1}  # no box file for the one image
    with pytest.raises(ValueError, match="images.folder"):
        dataset_config_from_dict({"images": {"source": "folder"}})
    with pytest.raises(ValueError, match="unknown"):
        dataset_config_from_dict(config_for(photos, out, filter={"min_clipp": 3}))
    with pytest.raises(ValueError, match="not a file"):
        build(config_for(photos, out, prompts={"file": str(photos / "none.json")}))
    with pytest.raises(ValueError, match="prompts.templates"):
        build(config_for(photos, out, prompts={"source": "templates", "templates": {"categories": {"a": ["dog"]},
                                                                                     "scene": ["x"]}}))


def test_a_decompression_bomb_is_that_items_error_not_the_runs(photos, monkeypatch):
    """PIL refuses images above 2 × Image.MAX_IMAGE_PIXELS (lowered here instead of writing a huge
    file): in images.folder and in references.files such an image fails its item only."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20000)  # the 128² canvases and 96² photos stay below 2×
    folder = photos / "folder"
    folder.mkdir()
    for i in range(8):
        Image.new("RGB", (300, 300) if i == 3 else (64, 64), "grey").save(folder / f"p00000{i}.png")
    out = photos / "out"
    _, summary = build(config_for(photos, out, images={"source": "folder", "folder": str(folder)}),
                       stages=["prompts", "images"])
    assert summary["stages"]["images"]["rejected"] == {"image_error": 1} and summary["stages"]["images"]["kept"] == 7
    reason, = json.loads((out / "images" / "p000003.json").read_text())["reasons"]
    assert "p000003.png" in reason and "MAX_IMAGE_PIXELS" in reason
    bomb = photos / "bomb.png"
    Image.new("RGB", (300, 300)).save(bomb)
    prompts = json.loads((photos / "prompts.json").read_text())
    files = {f"p00000{i}": [str(bomb if i == 5 and k == 1 else photos / "photos" / name / "01.png")
                            for k, name in enumerate(p["subjects"])] for i, p in enumerate(prompts)}
    (photos / "refs.json").write_text(json.dumps(files))
    out = photos / "out2"
    _, summary = build(config_for(photos, out, filter={"min_subject_area": None},
                                  references={"source": "files", "files": str(photos / "refs.json")}))
    assert summary["stages"]["filter"]["kept"] == 8
    assert summary["stages"]["references"]["rejected"] == {"reference_error": 1} and summary["accepted"] == 7
    reason, = json.loads((out / "references" / "p000005.json").read_text())["reasons"]
    assert "bomb.png" in reason


@pytest.mark.parametrize("key, value, expected", [
    ("prompts.count", -1, ">= 1"), ("prompts.count", 0, ">= 1"), ("prompts.count", 2.5, "integer"),
    ("prompts.count", True, "integer"), ("prompts.count", "8", "integer"), ("seed", 1.5, "integer"),
    ("sheets", -1, ">= 0"), ("images.height", 0, ">= 1"), ("images.width", -64, ">= 1"), ("images.steps", 0, ">= 1"),
    ("images.batch_size", 0, ">= 1"), ("images.canvas_size", 100, "multiple of 16"), ("references.size", 0, ">= 1"),
    ("references.steps", 0, ">= 1"), ("correspondences.grid", 0, ">= 1"), ("correspondences.max_points", -1, ">= 0"),
    ("correspondences.min_pairs", -2, ">= 0"), ("correspondences.min_pairs", 1.0, "integer"),
    ("prompts.templates.max_subjects", 0, "max_subjects"),
])
def test_config_refuses_counts_that_make_no_sense_naming_the_key(key, value, expected):
    """Checked when the config is read, not after a run (prompts.count -1 silently dropped the last item)."""
    base = Path("unused")
    values = config_for(base, base / "out", images={"source": "diffusers", "model": "tiny"},
                        prompts={"source": "templates", "templates": {"categories": {"animal": ["dog"], "toy": ["car"]}}})
    *parents, name = key.split(".")
    section = values
    for parent in parents:
        section = section[parent]
    section[name] = value
    named = "prompts.templates" if key.startswith("prompts.templates.") else key
    with pytest.raises(ValueError, match=re.escape(f"`{named}`") + ".*" + re.escape(expected)):
        dataset_config_from_dict(values)
    section[name] = {"correspondences.max_points": 0, "correspondences.min_pairs": 0, "sheets": 0,
                     "prompts.templates.max_subjects": 2}.get(key, 16)
    dataset_config_from_dict(values)  # the same config with a sensible value


def test_every_stage_runs_with_tiny_models(tmp_path):
    """Templates, a tiny instruction model, tiny FLUX, tiny Grounding DINO + SAM, tiny CLIP, tiny
    Kontext: the plumbing (their outputs are random, so the count criterion is off)."""
    values = {
        "output_dir": str(tmp_path / "out"), "seed": 1, "sheets": 1,
        "prompts": {"source": "templates", "count": 2, "rewriter": {"model": "tiny", "max_new_tokens": 4},
                    "templates": {"categories": {"animal": ["dog", "cat"], "object": ["teapot", "clock"]}}},
        "images": {"source": "diffusers", "model": "tiny", "height": 64, "width": 64, "steps": 2, "batch_size": 2,
                   "extra": {"max_sequence_length": 16}},
        "subjects": {"source": "models", "detector": "tiny", "segmenter": "tiny", "box_threshold": 0.0,
                     "text_threshold": 0.0},
        "filter": {"clip": "tiny", "quality": "clip_iqa", "min_clip": -100.0, "min_quality": 0.0, "exactly_once": False},
        "references": {"source": "editor", "editor": "tiny", "size": 32, "steps": 2},
        "correspondences": {"extractors": ["sift:patch_size=16"], "grid": 16, "target_size": 64, "ref_size": 32,
                            "min_pairs": 0},
    }
    builder, summary = build(values)
    assert [summary["stages"][s]["done"] for s in STAGES] == [2] * 6
    prompt = json.loads((tmp_path / "out" / "prompts" / "p000000.json").read_text())
    assert "rewrite" in prompt["provenance"] and prompt["rewritten"] is False
    image = json.loads((tmp_path / "out" / "images" / "p000000.json").read_text())
    assert image["provenance"]["model"] == "tiny" and image["seed"] is not None
    references = json.loads((tmp_path / "out" / "references" / "p000000.json").read_text())["references"]
    assert all(r["source"] == "editor" for r in references)
    assert summary["accepted"] == 2 and len(read_manifest(tmp_path / "out" / "manifest.jsonl")) == 2


def test_recipe_on_dreambench_trains_the_tiny_model(tmp_path, monkeypatch):
    """The recipe's default config on real photos (the full copy, or the repository's subset)."""
    monkeypatch.setenv("MOSAIC_DREAMBENCH", str(dreambench_for_tests()))
    assert dreambench_root() == dreambench_for_tests()
    from mosaic_kit.training import MosaicTrainer, load_config

    out = tmp_path / "dataset"
    summary = recipe.main(["--no-progress", "--output-dir", str(out), "prompts.count=4", "correspondences.target_size=64",
                           "correspondences.ref_size=32", "correspondences.grid=16"])
    assert summary["items"] == 4 and summary["accepted"] >= 1
    assert (out / "config-0of1.json").is_file() and (out / "summary.json").is_file()
    overrides = [f"output_dir={tmp_path / 'run'}", "max_steps=2", "checkpoint_every=2", "validate_every=0", "tracker=null",
                 "validation_samples=0", "log_every=1", "model.lora_rank=4", "data.kind=manifest",
                 f"data.root={out / 'manifest.jsonl'}", "data.target_size=64", "data.ref_size=32", "data.batch_size=1"]
    config = load_config([ROOT / "recipes" / "configs" / "tiny_cpu.yaml"], overrides)
    result = MosaicTrainer(config).train()
    assert result["steps"] == 2
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)


def test_shipped_dataset_configs_parse():
    import yaml

    for name in ("dataset_cpu", "dataset_real"):
        config = dataset_config_from_dict(yaml.safe_load((ROOT / "recipes" / "configs" / f"{name}.yaml").read_text()))
        assert config.correspondences.target_size % 16 == 0, name


def test_recipe_command_line_shards_then_manifest(photos, capsys):
    import yaml

    out = photos / "cli"
    config = photos / "config.yaml"
    config.write_text(yaml.safe_dump(config_for(photos, out)))
    for shard in ("0/2", "1/2"):
        recipe.main(["--config", str(config), "--shard", shard, "--no-progress"])
    assert sorted(p.name for p in out.glob("config-*.json")) == ["config-0of2.json", "config-1of2.json"]
    summary = recipe.main(["--config", str(config), "--stage", "manifest", "--no-progress", "sheets=1"])
    assert summary["stages"]["prompts"]["done"] == 8 and summary["accepted"] == len(read_manifest(out / "manifest.jsonl"))
    assert "seconds_per_item" in summary and summary["seconds_per_item"] == {}  # nothing ran in the last call
    with pytest.raises(SystemExit):
        recipe.main(["--config", str(config), "--shard", "2/2"])
    assert "0 <= i < n" in capsys.readouterr().err


def test_recipe_refuses_a_changed_resume_before_writing_its_config(photos, capsys):
    import yaml

    out = photos / "cli"
    config = photos / "config.yaml"
    config.write_text(yaml.safe_dump(config_for(photos, out)))
    recipe.main(["--config", str(config), "--no-progress"])
    saved = (out / "config-0of1.json").read_bytes()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:  # one line naming the changed key and the rerun, exit code 2
        recipe.main(["--config", str(config), "--no-progress", "correspondences.grid=32"])
    error = capsys.readouterr().err.strip()
    assert exit.value.code == 2 and len(error.splitlines()) == 1
    assert re.search(r"correspondences\.grid: 16 -> 32.*--overwrite --stage correspondences\)", error)
    assert (out / "config-0of1.json").read_bytes() == saved  # the record of what the data was made with
    summary = recipe.main(["--config", str(config), "--threads", "2", "sheets=1"])  # neither changes a record
    assert summary["seconds_per_item"] == {} and summary["stale"] == {}
    summary = recipe.main(["--config", str(config), "--no-progress", "--overwrite", "--stage", "correspondences",
                           "correspondences.grid=32"])
    assert list(summary["seconds_per_item"]) == ["correspondences"] and summary["stale"] == {}
    assert json.loads((out / "config-0of1.json").read_text())["correspondences"]["grid"] == 32
