"""The released SemAlign-MS layout: reader, uid, and the correspondence recipe over it."""

import hashlib
import importlib.util
import io
import json
import sys
from pathlib import Path

import pytest
from helpers import dreambench_for_tests
from PIL import Image

from mosaic_kit.correspondence import load_correspondences
from mosaic_kit.data import (
    REFERENCE_BOX,
    TARGET_BOX,
    count_released_rows,
    decode_released_row,
    iter_released_rows,
    iter_released_samples,
    released_uid,
    split_panels,
)

pq = pytest.importorskip("pyarrow.parquet")
pa = pytest.importorskip("pyarrow")
ROOT = Path(__file__).resolve().parents[2]
DREAMBENCH = dreambench_for_tests()


def _photo(name: str) -> Image.Image:
    with Image.open(DREAMBENCH / name) as photo:
        return photo.convert("RGB").resize((512, 512))


def _side_by_side(target: Image.Image, reference: Image.Image) -> bytes:
    canvas = Image.new("RGB", (1048, 528), "white")
    canvas.paste(target, TARGET_BOX[:2])
    canvas.paste(reference, REFERENCE_BOX[:2])
    buffer = io.BytesIO()
    canvas.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


@pytest.fixture
def released(tmp_path):
    rows = [
        ("dog/00.jpg", "dog/01.jpg", "dog", "a corgi on a bench"),
        ("teapot/00.jpg", "teapot/01.jpg", "teapot", "a teapot on a table"),
        ("cat/00.jpg", "cat/01.jpg", "cat", "a cat on a sofa"),
    ]
    records = [
        {"image": {"bytes": _side_by_side(_photo(t), _photo(r)), "path": None},
         "description": {"item": item, "description_0": caption, "description_1": f"{item} alone"}}
        for t, r, item, caption in rows
    ]
    records.insert(2, {"image": {"bytes": b"not an image", "path": None},
                       "description": {"item": "broken", "description_0": "x", "description_1": "y"}})
    (tmp_path / "data").mkdir()
    pq.write_table(pa.Table.from_pylist(records[:2]), tmp_path / "data" / "train-00000.parquet")
    pq.write_table(pa.Table.from_pylist(records[2:]), tmp_path / "data" / "train-00001.parquet")
    (tmp_path / "mask").mkdir()
    mask = Image.new("L", (512, 512), 0)
    mask.paste(255, (128, 128, 384, 384))
    for index, row in enumerate(iter_released_rows(tmp_path)):
        if index in (0, 1):  # dog and teapot have masks; the cat (row 3) has none
            mask.save(tmp_path / "mask" / f"{decode_released_row(row, tmp_path).uid}.png")
    return tmp_path


def test_reader_decodes_panels_captions_uid_and_masks(released):
    assert count_released_rows(released) == 4
    rows = list(iter_released_rows(released))
    assert [(r.shard.name, r.row) for r in rows] == [
        ("train-00000.parquet", 0), ("train-00000.parquet", 1), ("train-00001.parquet", 0), ("train-00001.parquet", 1)]
    dog = decode_released_row(rows[0], released)
    assert (dog.item, dog.target_caption, dog.reference_caption) == ("dog", "a corgi on a bench", "dog alone")
    assert dog.target.size == dog.reference.size == (512, 512) and dog.mask_path.exists()
    png = io.BytesIO()
    dog.target.save(png, format="PNG")
    short = hashlib.sha256(png.getvalue()).hexdigest()[:8]
    assert dog.uid == hashlib.sha256(f"dog_a corgi on a bench_{short}".encode()).hexdigest()
    assert dog.uid == released_uid("dog", "a corgi on a bench", dog.target)
    with pytest.raises(ValueError, match=r"train-00001.parquet row 0"):
        decode_released_row(rows[2], released)
    with pytest.raises(ValueError, match=r"train-00001.parquet row 0"):
        list(iter_released_samples(released))
    with pytest.raises(ValueError, match="at least 1040×520"):
        split_panels(Image.new("RGB", (512, 512)))
    with pytest.raises(ValueError, match="parquet shards under `root`"):
        count_released_rows(released / "mask")


spec = importlib.util.spec_from_file_location("build_correspondences_released", ROOT / "recipes" / "build_correspondences.py")
recipe = importlib.util.module_from_spec(spec)
sys.modules["build_correspondences_released"] = recipe
spec.loader.exec_module(recipe)


def test_recipe_over_the_released_layout_with_shards_and_resume(released, tmp_path):
    common = ["--released-root", str(released), "--target-size", "128", "--ref-size", "128", "--grid", "16"]
    ids = []
    for shard in range(2):
        out = tmp_path / f"out{shard}"
        summary = recipe.main([*common, "--output-dir", str(out), "--shard", f"{shard}/2"])
        assert summary["samples"] == 2
        ids += [p.stem for p in out.glob("*.pt")] + [f["id"] for f in summary["failures"]]
        again = recipe.main([*common, "--output-dir", str(out), "--shard", f"{shard}/2"])
        assert again["done"] == 0 and again["skipped"] == summary["done"]
    uids = [decode_released_row(r, released).uid for i, r in enumerate(iter_released_rows(released)) if i != 2]
    assert sorted(ids) == sorted(uids + ["train-00001.parquet:0"])
    written = sorted(p.stem for shard in range(2) for p in (tmp_path / f"out{shard}").glob("*.pt"))
    assert written == sorted(uids[:2])  # the cat has no mask: counted as failed, never built unmasked
    failures = json.loads((tmp_path / "out1" / "summary-1of2.json").read_text())["failures"]
    assert {f["id"]: f["reason"].split(" ")[0] for f in failures} == {uids[2]: "missing"}
    dog = load_correspondences(next((tmp_path / "out0").glob(f"{uids[0]}.pt")))
    rows, cols = dog.tgt_index[dog.point_mask] // 8, dog.tgt_index[dog.point_mask] % 8
    assert int(dog.num_points.sum()) > 0  # the dog's mask keeps target tokens in the centre [2, 6)²
    assert bool(((rows >= 2) & (rows < 6) & (cols >= 2) & (cols < 6)).all())
