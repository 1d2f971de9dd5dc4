"""mosaic_kit.data.dreambench and recipes/fetch_dreambench.py: the DreamBench photos fetched from a
local folder or archive laid out as google/dreambooth (no network), where every default finds them."""

from __future__ import annotations

import json
import tarfile
import zipfile
from pathlib import Path

import pytest
from helpers import DREAMBENCH_SUBSET, load_script
from PIL import Image

from mosaic_kit.data import (
    DREAMBENCH_FETCH_COMMAND,
    DREAMBENCH_MULTI_CASES,
    DREAMBOOTH_COMMIT,
    DreamBenchNotFoundError,
    default_dreambench_dir,
    dreambench_root,
    fetch_dreambench,
    find_dreambench,
)
from mosaic_kit.data.dreambench import parse_prompts_and_classes
from mosaic_kit.dataset_builder import STAGES
from mosaic_kit.eval import DreamBench

SUBJECTS = ["dog", "cat", "backpack"]


@pytest.fixture
def repository(tmp_path) -> Path:
    """A google/dreambooth checkout in miniature: LICENSE.md at the top, dataset/ with the class
    and prompt list, the attribution file and three subjects, one photo of them large, one a
    PNG turned by its EXIF orientation, one grey."""
    root = tmp_path / "dreambooth"
    dataset = root / "dataset"
    dataset.mkdir(parents=True)
    (root / "LICENSE.md").write_bytes((DREAMBENCH_SUBSET / "LICENSE.md").read_bytes())
    (dataset / "prompts_and_classes.txt").write_bytes((DREAMBENCH_SUBSET / "prompts_and_classes.original.txt").read_bytes())
    (dataset / "references_and_licenses.txt").write_bytes((DREAMBENCH_SUBSET / "references_and_licenses.txt").read_bytes())
    for name in SUBJECTS:
        (dataset / name).mkdir()
        for photo in sorted((DREAMBENCH_SUBSET / name).glob("*.jpg"))[:2]:
            (dataset / name / photo.name).write_bytes(photo.read_bytes())
    Image.open(DREAMBENCH_SUBSET / "dog" / "00.jpg").resize((600, 400)).save(dataset / "dog" / "02.jpg", quality=95)
    turned = Image.new("RGB", (90, 30), "red")
    turned.paste((0, 0, 255), (0, 0, 30, 30))  # blue on the left; stored sideways, EXIF says "rotate 90°"
    exif = Image.Exif()
    exif[0x0112] = 6
    turned.save(dataset / "cat" / "02.png", exif=exif)
    Image.new("L", (40, 20), 128).save(dataset / "backpack" / "02.jpg")
    (dataset / "cat" / ".hidden.jpg").write_bytes(b"not a photo")  # hidden files are not photos
    return root


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_fetch_from_a_folder_downscales_and_keeps_attribution_and_licence(repository, tmp_path):
    out = fetch_dreambench(repository, tmp_path / "copy", max_side=128, progress=False, subjects=SUBJECTS)
    bench = DreamBench.load(out)
    assert list(bench.subjects) == ["backpack", "cat", "dog"]  # the source's class-list order
    assert [bench.subjects[n].kind for n in ("backpack", "cat", "dog")] == ["object", "live", "live"]
    assert len(bench.prompts["object"]) == len(bench.prompts["live"]) == 25
    assert list(bench.pairs) == [case for case in DREAMBENCH_MULTI_CASES if set(case["subjects"]) <= set(SUBJECTS)]
    assert [case["subjects"] for case in bench.pairs] == [["dog", "backpack"]]
    for name in SUBJECTS:
        assert [p.name for p in bench.subjects[name].image_paths] == ["00.jpg", "01.jpg", "02.jpg"]
        for path in bench.subjects[name].image_paths:
            with Image.open(path) as photo:
                assert photo.format == "JPEG" and photo.mode == "RGB" and not photo.getexif()
                assert max(photo.size) <= 128
    with Image.open(out / "dog" / "02.jpg") as large:
        assert large.size == (128, 85)  # 600×400, the longer side to 128
    with Image.open(out / "cat" / "02.jpg") as turned:
        assert turned.size == (30, 90)  # upright: the EXIF orientation applied
        assert turned.getpixel((15, 5))[2] > 200 and turned.getpixel((15, 80))[0] > 200
    with Image.open(out / "backpack" / "02.jpg") as grey:
        assert grey.mode == "RGB" and grey.size == (40, 20)
    assert (out / "LICENSE.md").read_bytes() == (repository / "LICENSE.md").read_bytes()
    for name, original in (("references_and_licenses.txt", "references_and_licenses.txt"),
                           ("prompts_and_classes.original.txt", "prompts_and_classes.txt")):
        assert (out / name).read_bytes() == (repository / "dataset" / original).read_bytes()
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance == {"source": "Prepared from a local folder (dreambooth).", "commit": None, "max_side": 128,
                          "quality": 90, "photos_per_subject": None, "subjects": 3, "photos": 9,
                          "multi_subject_cases": 1}
    readme = (out / "README.md").read_text()
    assert "at most 128 px" in readme and "CC BY 4.0" in readme and "references_and_licenses.txt" in readme


def test_fetch_from_archives_and_from_a_copy_gives_the_same_files(repository, tmp_path):
    folder = fetch_dreambench(repository, tmp_path / "from_folder", max_side=128, progress=False, subjects=SUBJECTS)
    top = f"dreambooth-{DREAMBOOTH_COMMIT}"  # as GitHub lays out the archive of a commit
    with tarfile.open(tmp_path / "dreambooth.tar.gz", "w:gz") as archive:
        archive.add(repository, arcname=top)
    with zipfile.ZipFile(tmp_path / "dreambooth.zip", "w") as archive:
        for path in sorted(repository.rglob("*")):
            archive.write(path, f"{top}/{path.relative_to(repository).as_posix()}")
    expected = {k: v for k, v in _tree(folder).items() if k not in ("provenance.json", "README.md")}
    for name in ("dreambooth.tar.gz", "dreambooth.zip"):
        out = fetch_dreambench(tmp_path / name, tmp_path / name.replace(".", "_"), max_side=128, progress=False,
                               subjects=SUBJECTS)
        got = _tree(out)
        assert {k: v for k, v in got.items() if k not in ("provenance.json", "README.md")} == expected, name
        assert json.loads(got["provenance.json"])["source"] == f"Prepared from a local archive ({name})."
    # A copy fetched again (its own subjects; photos that already fit are kept byte for byte) is the same copy.
    again = fetch_dreambench(DREAMBENCH_SUBSET, tmp_path / "again", max_side=256, progress=False)
    subset = _tree(DREAMBENCH_SUBSET)
    assert {k: v for k, v in _tree(again).items() if k not in ("provenance.json", "README.md")} == {
        k: v for k, v in subset.items() if k not in ("provenance.json", "README.md")}


def test_the_download_path_reads_the_pinned_archive(repository, tmp_path):
    """The download (here a file:// address instead of GitHub's, no network) lands where a local
    archive would, and says where it came from."""
    with tarfile.open(tmp_path / "archive.tar.gz", "w:gz") as archive:
        archive.add(repository, arcname="dreambooth-main")
    url = (tmp_path / "archive.tar.gz").as_uri()
    out = fetch_dreambench(None, tmp_path / "downloaded", max_side=64, progress=False, subjects=["dog"], url=url)
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["source"] == f"Downloaded from {url}." and provenance["commit"] == DREAMBOOTH_COMMIT
    assert sorted(p.name for p in (out / "dog").iterdir()) == ["00.jpg", "01.jpg", "02.jpg"]
    with pytest.raises(ValueError, match="without network, pass `--source`"):
        fetch_dreambench(None, tmp_path / "offline", progress=False, url=(tmp_path / "missing.tar.gz").as_uri())
    assert not (tmp_path / "offline").exists()


def test_fetch_refuses_bad_sources_and_foreign_folders_and_keeps_or_replaces_a_copy(repository, tmp_path):
    with pytest.raises(ValueError, match=r"Expected `subjects` among \[.*'dog'.*\], but got \['unicorn'\]"):
        fetch_dreambench(repository, tmp_path / "a", subjects=["dog", "unicorn"], progress=False)
    with pytest.raises(ValueError, match=r"found none for \['can'\]"):
        fetch_dreambench(repository, tmp_path / "a", subjects=["dog", "can"], progress=False)
    with pytest.raises(ValueError, match=r"found none for \[.*'backpack_dog'"):  # all 30 by default
        fetch_dreambench(repository, tmp_path / "a", progress=False)
    with pytest.raises(ValueError, match="`max_side`"):
        fetch_dreambench(repository, tmp_path / "a", max_side=0, progress=False)
    (repository / "LICENSE.md").unlink()
    with pytest.raises(ValueError, match=r"licence and attribution files \['LICENSE.md'\]"):
        fetch_dreambench(repository, tmp_path / "a", subjects=["dog"], progress=False)
    (repository / "LICENSE.md").write_bytes((DREAMBENCH_SUBSET / "LICENSE.md").read_bytes())
    with pytest.raises(ValueError, match="prompts_and_classes.txt"):
        fetch_dreambench(repository / "dataset" / "dog", tmp_path / "a", progress=False)
    assert not (tmp_path / "a").exists()

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="holds other files; it is left as it is"):
        fetch_dreambench(repository, foreign, subjects=["dog"], progress=False, overwrite=True)
    assert _tree(foreign) == {"notes.txt": b"keep me"}

    copy = fetch_dreambench(repository, tmp_path / "copy", subjects=["dog"], max_side=64, progress=False)
    before = _tree(copy)
    assert fetch_dreambench(repository, copy, subjects=["cat"], progress=False) == copy  # kept as it is
    assert _tree(copy) == before
    fetch_dreambench(repository, copy, subjects=["cat"], max_side=64, progress=False, overwrite=True)
    assert sorted(p.name for p in copy.iterdir() if p.is_dir()) == ["cat"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no partial or old copy left


def test_the_class_and_prompt_list_of_the_source_parses():
    meta = parse_prompts_and_classes((DREAMBENCH_SUBSET / "prompts_and_classes.original.txt").read_text())
    assert len(meta["subjects"]) == 30 and len(meta["prompts"]["object"]) == len(meta["prompts"]["live"]) == 25
    assert sorted(s["name"] for s in meta["subjects"] if s["kind"] == "live") == [
        "cat", "cat2", "dog", "dog2", "dog3", "dog5", "dog6", "dog7", "dog8"]
    assert {s["name"] for s in meta["subjects"]} == {n for case in DREAMBENCH_MULTI_CASES for n in case["subjects"]}
    subset = json.loads((DREAMBENCH_SUBSET / "prompts.json").read_text())
    assert subset["prompts"] == meta["prompts"]
    assert subset["subjects"] == [s for s in meta["subjects"] if s["name"] in {e["name"] for e in subset["subjects"]}]
    with pytest.raises(ValueError, match=r"x.txt: expected the sections .* nothing for \['live'\]"):
        parse_prompts_and_classes("subject_name,class\ndog,dog\nObject Prompts\n'a {0} {1}'.format(unique_token, "
                                  "class_token)", "x.txt")


def test_every_default_finds_the_fetched_photos_and_names_the_command_when_they_are_missing(
        repository, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MOSAIC_DREAMBENCH", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert default_dreambench_dir() == tmp_path / "cache" / "mosaic_kit" / "dreambench"
    assert find_dreambench() is None
    with pytest.raises(DreamBenchNotFoundError) as missing:
        dreambench_root()
    message = str(missing.value)
    assert str(default_dreambench_dir()) in message and f"`{DREAMBENCH_FETCH_COMMAND}`" in message
    assert "MOSAIC_DREAMBENCH" in message and "\n" not in message

    recipe = load_script("recipes/fetch_dreambench.py", "fetch_dreambench_recipe")
    out = recipe.main(["--source", str(repository), "--subjects", "dog,backpack", "--max-side", "96", "--no-progress"])
    assert out == default_dreambench_dir() and dreambench_root() == out and find_dreambench() == out
    assert '"photos": 6' in capsys.readouterr().err
    assert DreamBench.load(dreambench_root()).pairs[0]["prompt"] == "a {dog} and a {backpack} on a beach"

    # $MOSAIC_DREAMBENCH overrides the default, for the fetch and for every reader.
    monkeypatch.setenv("MOSAIC_DREAMBENCH", str(tmp_path / "elsewhere"))
    with pytest.raises(DreamBenchNotFoundError, match=r"elsewhere \(\$MOSAIC_DREAMBENCH\)"):
        dreambench_root()
    recipe.main(["--source", str(repository), "--subjects", "cat", "--max-side", "64", "--no-progress"])
    assert dreambench_root() == tmp_path / "elsewhere" and list(DreamBench.load(dreambench_root()).subjects) == ["cat"]


def test_the_dataset_recipe_default_runs_on_the_fetched_photos(repository, tmp_path, monkeypatch):
    """The acceptance: after the fetch command (from a local copy), `recipes/build_dataset.py`'s
    default config runs end to end (fewer and smaller items, for time)."""
    monkeypatch.delenv("MOSAIC_DREAMBENCH", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    build = load_script("recipes/build_dataset.py", "build_dataset_after_fetch")
    with pytest.raises(SystemExit) as missing:
        build.main(["--output-dir", str(tmp_path / "none"), "--no-progress"])
    assert missing.value.code == 2 and not (tmp_path / "none").exists()
    fetch = load_script("recipes/fetch_dreambench.py", "fetch_dreambench_recipe")
    fetch.main(["--source", str(repository), "--subjects", ",".join(SUBJECTS), "--no-progress"])
    summary = build.main(["--output-dir", str(tmp_path / "dataset"), "--no-progress", "correspondences.grid=16",
                          "correspondences.target_size=64", "correspondences.ref_size=32",
                          "filter.min_quality=null", "filter.min_subject_area=null"])  # on to the last stage
    # every stage ran on the one case (dog + backpack) and decided it; the manifest lists what was kept
    assert summary["items"] == 1 and set(summary["seconds_per_item"]) == set(STAGES)
    assert summary["accepted"] + sum(summary["rejected"].values()) == 1
    manifest = (tmp_path / "dataset" / "manifest.jsonl").read_text().splitlines()
    assert len(manifest) == summary["accepted"] and (tmp_path / "dataset" / "summary.json").is_file()
