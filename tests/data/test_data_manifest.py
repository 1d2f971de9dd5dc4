"""The JSONL manifest: validation with line numbers, ManifestDataset, bad data, and the recipe's use of it."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from mosaic_kit.data import (
    BadDataTally,
    BadSample,
    ManifestDataset,
    SkippingLoader,
    collate_samples,
    load_pairs_file,
    make_manifest_fixture,
    read_manifest,
)
from mosaic_kit.data.loader import ResumableSampler

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def manifest(tmp_path) -> Path:
    return make_manifest_fixture(tmp_path, ["dog", "cat", "teapot"], size=128)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _write(path: Path, rows: list) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_read_manifest_resolves_paths_and_reads_inline_and_file_pairs(manifest):
    entries = read_manifest(manifest)
    assert [e.id for e in entries] == ["dog", "cat", "teapot"] and [e.line for e in entries] == [1, 2, 3]
    dog, cat = entries[0], entries[1]
    assert dog.target == manifest.parent / "images" / "dog_target.png" and dog.target.is_file()
    assert dog.caption == "a photo of dog" and dog.subjects == ["dog"]
    assert isinstance(dog.correspondences, list) and dog.correspondences[0].shape == (3, 4)
    assert cat.correspondences == manifest.parent / "pairs" / "cat.json"
    assert torch.equal(load_pairs_file(cat.correspondences, 1)[0], dog.correspondences[0])
    assert dog.target_masks == [manifest.parent / "masks" / "dog_target.png"]


def test_manifest_dataset_scales_pairs_and_masks(manifest):
    native = ManifestDataset(manifest)
    sample = native[0]
    assert tuple(sample.target.shape) == (3, 128, 128) and tuple(sample.references[0].shape) == (3, 64, 64)
    assert sample.pairs[0].tolist() == [[32.0, 32.0, 64.0, 64.0], [40.0, 32.0, 48.0, 64.0], [32.0, 40.0, 64.0, 80.0]]
    resized = ManifestDataset(manifest, target_size=(64, 256), ref_size=32)[0]
    expected = native[0].pairs[0] * torch.tensor([0.5, 0.5, 2.0, 0.5])
    assert torch.equal(resized.pairs[0], expected)
    assert tuple(resized.target_masks[0].shape) == (64, 256) and tuple(resized.reference_masks[0].shape) == (32, 32)
    assert resized.meta == {"line": 1, "subjects": ["dog"]}
    # The mirrored reference: a pair sits on the subject in both masks.
    for pair in native[2].pairs[0]:
        rx, ry, tx, ty = pair.long().tolist()
        assert bool(native[2].reference_masks[0][ry, rx]) and bool(native[2].target_masks[0][ty, tx])
    batch = collate_samples([native[0], native[1]], target_size=128, ref_size=64)
    assert batch.corr.num_points.tolist() == [[1], [1]]  # the three reference points share one 16-pixel token
    every = collate_samples([native[0], native[1]], target_size=128, ref_size=64, first_per_ref_token=False)
    assert every.corr.num_points.tolist() == [[3], [3]]


def test_entries_without_correspondences_or_masks(tmp_path, manifest):
    rows = _rows(manifest)
    rows[0] = {"id": "plain", "target": rows[0]["target"], "references": rows[0]["references"] * 2,
               "target_mask": "masks/dog_target.png"}
    data = ManifestDataset(_write(tmp_path / "m.jsonl", rows[:1]))
    sample = data[0]
    assert sample.num_refs == 2 and [p.shape for p in sample.pairs] == [(0, 4), (0, 4)]
    assert sample.caption == "" and sample.reference_masks == [None, None]
    assert all(torch.equal(m, sample.target_masks[0]) for m in sample.target_masks)  # target_mask for every reference


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json", "1: expected a JSON object, but the line is not JSON"),
        ("[1, 2]", "1: expected a JSON object, but got list"),
        ({"id": "a", "target": "t.png"}, r"1: missing \['references'\]"),
        ({"id": "a", "target": "t.png", "references": ["r.png"], "correspondence": []}, r"unknown keys \['correspondence'\]"),
        ({"id": "a b", "target": "t.png", "references": ["r.png"]}, "`id` must be a string of letters"),
        ({"id": 3, "target": "t.png", "references": ["r.png"]}, "`id` must be"),
        ({"id": "a", "target": None, "references": ["r.png"]}, "`target` must be a path, but got None"),
        ({"id": "a", "target": "t.png", "references": "r.png"}, "`references` must be a non-empty list of paths"),
        ({"id": "a", "target": "t.png", "references": ["r.png"], "caption": 3}, "`caption` must be a string"),
        ({"id": "a", "target": "t.png", "references": ["r.png"], "subjects": ["x", "y"]}, r"`subjects` must have one name per reference \(1\)"),
        ({"id": "a", "target": "t.png", "references": ["r.png"], "target_mask": 1}, "`target_mask` must be a path or null"),
        ({"id": "a", "target": "t.png", "references": ["r.png"], "target_masks": []}, r"`target_masks` must have one path \(or null\) per reference"),
        ({"id": "a", "target": "t.png", "references": ["r.png"], "reference_masks": [3]}, "`reference_masks` must have one path"),
        ({"id": "a", "target": "t.png", "references": ["r.png"], "meta": [1]}, "`meta` must be an object"),
        ({"id": "a", "target": "t.png", "references": ["r.png"], "correspondences": "pairs.txt"}, "a .json/.pt path"),
        ({"id": "a", "target": "t.png", "references": ["r.png"], "correspondences": []}, r"one list of \[ref_x, ref_y, tgt_x, tgt_y\] pairs per reference \(1\), but got a list of 0"),
        ({"id": "a", "target": "t.png", "references": ["r.png"], "correspondences": [[[1, 2, 3]]]}, r"`correspondences`\[0\]\[0\] must be \[ref_x, ref_y, tgt_x, tgt_y\]"),
        ({"id": "a", "target": "t.png", "references": ["r.png"], "correspondences": [[[1, 2, 3, -4]]]}, "non-negative"),
        ({"id": "a", "target": "t.png", "references": ["r.png"], "correspondences": [[[1, 2, 3, float("nan")]]]}, "finite"),
    ],
)
def test_read_manifest_names_the_line_and_the_problem(tmp_path, line, message):
    good = json.dumps({"id": "ok", "target": "t.png", "references": ["r.png"]})
    path = tmp_path / "bad.jsonl"
    text = line if isinstance(line, str) else json.dumps(line)
    path.write_text(text + "\n\n" + good + "\n")
    with pytest.raises(ValueError, match=message):
        read_manifest(path)
    path.write_text(good + "\n\n" + text + "\n")  # blank lines count in the numbering
    with pytest.raises(ValueError, match=r"bad.jsonl:3: "):
        read_manifest(path)


def test_duplicate_ids_and_missing_manifest(tmp_path):
    row = {"id": "a", "target": "t.png", "references": ["r.png"]}
    with pytest.raises(ValueError, match=r"dup.jsonl:2: `id` must be unique, but 'a' is also on line 1"):
        read_manifest(_write(tmp_path / "dup.jsonl", [row, row]))
    with pytest.raises(ValueError, match="is not a file"):
        read_manifest(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="`manifest`"):
        ManifestDataset(3)


def _bad_dataset(tmp_path: Path, manifest: Path) -> tuple[ManifestDataset, dict[str, str]]:
    """One good line and one line per kind of bad data."""
    base = manifest.parent
    (base / "images" / "corrupt.png").write_bytes(b"not a png")
    Image.new("L", (128, 128), 0).save(base / "masks" / "empty.png")
    (base / "pairs" / "broken.json").write_text("{")
    torch.save([torch.zeros(3, 3)], base / "pairs" / "shape.pt")
    template = _rows(manifest)[0]
    cases = {
        "good": {},
        "no_target": {"target": "images/missing.png"},
        "corrupt_reference": {"references": ["images/corrupt.png"]},
        "no_mask": {"target_masks": ["masks/missing.png"]},
        "empty_mask": {"reference_masks": ["masks/empty.png"]},
        "no_pairs_file": {"correspondences": "pairs/missing.json"},
        "broken_pairs": {"correspondences": "pairs/broken.json"},
        "pairs_shape": {"correspondences": "pairs/shape.pt"},
        "pair_outside": {"correspondences": [[[10.0, 10.0, 128.0, 5.0]]]},
    }
    kinds = {
        "no_target": "unreadable_image", "corrupt_reference": "unreadable_image", "no_mask": "missing_mask",
        "empty_mask": "empty_mask", "no_pairs_file": "missing_coordinates", "broken_pairs": "malformed_coordinates",
        "pairs_shape": "malformed_coordinates", "pair_outside": "malformed_coordinates",
    }
    rows = [dict(template, id=name, **change) for name, change in cases.items()]
    return ManifestDataset(_write(base / "bad.jsonl", rows)), kinds


def test_each_kind_of_bad_data_raises_bad_sample(tmp_path, manifest):
    data, kinds = _bad_dataset(tmp_path, manifest)
    assert data[0].sample_id == "good"
    for index, (name, kind) in enumerate(kinds.items(), start=1):
        with pytest.raises(BadSample) as bad:
            data[index]
        assert (bad.value.kind, bad.value.sample_id) == (kind, name), bad.value
    with pytest.raises(BadSample, match=r"outside the reference \(64×64\) or the target \(128×128\)"):
        data[len(kinds)]


def test_skipping_loader_over_bad_lines_is_deterministic(tmp_path, manifest, caplog):
    data, kinds = _bad_dataset(tmp_path, manifest)
    runs = []
    for _ in range(2):
        loader = SkippingLoader(data, batch_size=1, sampler=ResumableSampler(len(data), seed=5), max_epochs=2)
        with caplog.at_level("WARNING", logger="mosaic_kit.data"):
            runs.append([batch[0].sample_id for batch in loader])
        assert loader.tally.total == 2 * len(kinds)
        assert sorted(set(loader.tally.ids["malformed_coordinates"])) == ["broken_pairs", "pair_outside", "pairs_shape"]
    assert runs[0] == runs[1] == ["good", "good"]
    assert "no_target (unreadable_image)" in caplog.text
    tally = BadDataTally.from_state_dict(loader.tally.state_dict())
    assert "malformed_coordinates: 6" in tally.summary()


def test_recipe_reads_the_manifest_with_the_library(tmp_path, manifest):
    spec = importlib.util.spec_from_file_location("build_correspondences_manifest", ROOT / "recipes" / "build_correspondences.py")
    recipe = importlib.util.module_from_spec(spec)
    sys.modules["build_correspondences_manifest"] = recipe
    spec.loader.exec_module(recipe)
    samples = recipe.read_manifest(manifest)
    assert [s["id"] for s in samples] == ["dog", "cat", "teapot"]
    assert samples[0]["target_mask"] == [manifest.parent / "masks" / "dog_target.png"]  # union of per-reference masks
    assert recipe.load_mask(samples[0]["target_mask"], 32).shape == (1, 32, 32)
    rows = _rows(manifest)
    rows[1]["id"] = "settings"
    with pytest.raises(ValueError, match=r"m.jsonl:2: `id` must be none of the names this recipe writes"):
        recipe.read_manifest(_write(tmp_path / "m.jsonl", rows))
