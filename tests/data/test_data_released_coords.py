"""ReleasedDataset: the uid rule, the coordinate files, the kept pairs and every kind of bad data."""

import hashlib
import io
from pathlib import Path

import numpy
import pytest
import torch
from PIL import Image

from mosaic_kit.correspondence import TokenGrid
from mosaic_kit.data import (
    BadDataTally,
    BadSample,
    ReleasedDataset,
    check_released_coords,
    collate_samples,
    iter_released_rows,
    load_released_coords,
    make_released_fixture,
    mask_to_grid,
    released_coord_path,
    released_pixel_pairs,
    skip_bad,
    split_panels,
)

pq = pytest.importorskip("pyarrow.parquet")
pa = pytest.importorskip("pyarrow")

SUBJECTS = [("dog", "a dog on the grass"), ("cat", "a cat on a sofa"), ("teapot", "a teapot on a table")]


@pytest.fixture
def released(tmp_path) -> tuple[Path, list[str]]:
    root = tmp_path / "data"
    uids = make_released_fixture(root, SUBJECTS, rows_per_shard=2)  # two shards: rows (0, 1) and (2,)
    return root, uids


def _uid_by_hand(item: str, caption: str, image_bytes: bytes) -> str:
    with Image.open(io.BytesIO(image_bytes)) as image:
        target = image.convert("RGB").crop((8, 8, 520, 520))
    png = io.BytesIO()
    target.save(png, format="PNG")
    short = hashlib.sha256(png.getvalue()).hexdigest()[:8]
    return hashlib.sha256(f"{item}_{caption}_{short}".encode()).hexdigest()


def test_uid_rule_finds_the_mask_and_coordinate_files(released):
    root, uids = released
    assert sorted(p.name for p in root.glob("*.parquet")) == ["train-00000.parquet", "train-00001.parquet"]
    by_hand = [
        _uid_by_hand(row.description["item"], row.description["description_0"], row.image["bytes"])
        for row in iter_released_rows(root)
    ]
    assert by_hand == uids
    data = ReleasedDataset(root)
    assert len(data) == 3
    for index, uid in enumerate(uids):
        assert (root / "mask" / f"{uid}.png").is_file()
        for method in ("dift", "geoaware"):
            assert released_coord_path(root, method, uid) == root / "coord" / method / f"{uid}_ref0.pt"
            assert released_coord_path(root, method, uid).is_file()
        sample = data[index]
        assert sample.sample_id == uid == sample.meta["uid"]
        assert sample.caption == SUBJECTS[index][1] and sample.meta["subjects"] == [SUBJECTS[index][0]]
    assert data.locate(2) == (root / "train-00001.parquet", 0)


def _expected_pairs(mask: torch.Tensor, target_scale: float, ref_scale: float) -> torch.Tensor:
    """The fixture's documented rule, computed cell by cell."""
    rows = []
    for ty in range(64):
        for tx in range(64):
            ref_col = 63 - tx
            agrees = (ty + 2 * tx) % 7 != 0
            inside = bool(mask[8 * ty + 4, 8 * tx + 4])
            if agrees and inside:
                rows.append([(ref_col * 8 + 4) * ref_scale, (ty * 8 + 4) * ref_scale,
                             (tx * 8 + 4) * target_scale, (ty * 8 + 4) * target_scale])
    return torch.tensor(rows, dtype=torch.float32)


def test_kept_pairs_follow_agreement_and_mask_at_the_configured_sizes(released):
    root, uids = released
    data = ReleasedDataset(root, target_size=256, ref_size=128)
    for index, uid in enumerate(uids):
        sample = data[index]
        with Image.open(root / "mask" / f"{uid}.png") as image:
            mask = torch.from_numpy(numpy.array(image)) > 0
        expected = _expected_pairs(mask, 0.5, 0.25)
        assert sample.pairs[0].dtype == torch.float32
        assert torch.equal(sample.pairs[0], expected)
        assert tuple(sample.target.shape) == (3, 256, 256) and tuple(sample.references[0].shape) == (3, 128, 128)
        assert tuple(sample.target_masks[0].shape) == (256, 256)
        # The target mask is the file's mask read at pixel centres: pixel i of 256 reads pixel 2i + 1 of 512.
        assert torch.equal(sample.target_masks[0], mask[1::2, 1::2])
    # The reference panel is the target mirrored (up to one pixel: cell centres mirror to 508 - x, not
    # 507 - x): kept pairs show the same colour on both panels, except on a few edge pixels.
    sample = ReleasedDataset(root)[0]
    ref_xy, tgt_xy = sample.pairs[0][:, :2].long(), sample.pairs[0][:, 2:].long()
    ref_colours = sample.references[0][:, ref_xy[:, 1], ref_xy[:, 0]]
    tgt_colours = sample.target[:, tgt_xy[:, 1], tgt_xy[:, 0]]
    same = ((ref_colours - tgt_colours).abs() <= 1 / 255).all(0)
    assert float(same.float().mean()) > 0.95


def test_pairs_map_to_tokens_first_pair_per_reference_token(released):
    root, _ = released
    sample = ReleasedDataset(root, target_size=256, ref_size=256)[1]
    batch = collate_samples([sample], target_size=256, ref_size=256)
    corr = batch.corr
    grid = TokenGrid(256, 256)
    keep = corr.point_mask[0, 0]
    u, v = corr.ref_index[0, 0][keep], corr.tgt_index[0, 0][keep]
    assert len(set(u.tolist())) == len(u)  # one pair per reference token
    # First pair per reference token, in row-major order of the target cells.
    first: dict[int, int] = {}
    pairs = sample.pairs[0]
    for ref_token, tgt_token in zip(grid.pixel_to_token(pairs[:, :2]).tolist(), grid.pixel_to_token(pairs[:, 2:]).tolist()):
        first.setdefault(ref_token, tgt_token)
    assert dict(zip(u.tolist(), v.tolist())) == first
    # Mirrored panels: reference token column = 15 - target token column.
    assert torch.equal(u % 16, 15 - v % 16) and torch.equal(u // 16, v // 16)


def test_released_pixel_pairs_and_mask_to_grid():
    ty, tx = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    coords = torch.stack((ty, tx), -1)
    everything = released_pixel_pairs([coords])
    assert everything.shape == (64, 4) and everything[9].tolist() == [96.0, 96.0, 96.0, 96.0]  # cell (1, 1) of 8 over 512 px
    other = coords.clone()
    other[0, :, 1] = (other[0, :, 1] + 1) % 8  # disagree on the first row
    mask = torch.ones(8, 8, dtype=torch.bool)
    mask[:, 0] = False
    kept = released_pixel_pairs([coords, other], mask, panel_size=512)
    assert kept.shape == (7 * 7, 4) and bool((kept[:, 2] > 64).all()) and bool((kept[:, 3] > 64).all())
    big = torch.zeros(100, 60, dtype=torch.bool)
    big[50:, :] = True
    assert mask_to_grid(big, (4, 3)).tolist() == [[False] * 3, [False] * 3, [True] * 3, [True] * 3]
    with pytest.raises(ValueError, match="non-empty list"):
        released_pixel_pairs([])
    with pytest.raises(ValueError, match=r"target_mask_grid` of shape \(8, 8\)"):
        released_pixel_pairs([coords], torch.ones(4, 4, dtype=torch.bool))


def test_coordinate_validation_names_what_is_wrong(tmp_path):
    good = torch.zeros(64, 64, 2, dtype=torch.int64)
    assert torch.equal(check_released_coords(good.float()), good)
    assert torch.equal(check_released_coords(good.permute(2, 0, 1), layout="2hw"), good)
    for bad, message in (
        (torch.zeros(64, 64), r"of shape \(64, 64, 2\) \(layout 'hw2'\), but got \(64, 64\)"),
        (torch.zeros(2, 64, 64), r"but got \(2, 64, 64\)"),
        (torch.full((64, 64, 2), 0.5), r"whole cell indices, but got values \[0.5, 0.5, 0.5\]"),
        (torch.full((64, 64, 2), float("nan")), "whole cell indices"),
        (torch.full((64, 64, 2), 64), r"values in \[0, 64\)"),
        (torch.full((64, 64, 2), -1), r"values in \[0, 64\)"),
        (torch.zeros(64, 64, 2, dtype=torch.bool), "integer dtype"),
        ({"coords": good}, "to be a tensor"),
    ):
        with pytest.raises(ValueError, match=message):
            check_released_coords(bad)
    with pytest.raises(ValueError, match="layout"):
        check_released_coords(good, layout="xy")
    path = tmp_path / "c.pt"
    path.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="c.pt` to be a torch file"):
        load_released_coords(path)
    with pytest.raises(FileNotFoundError):
        load_released_coords(tmp_path / "missing.pt")


def _append_shard(root: Path, records: list[dict]) -> None:
    pq.write_table(pa.Table.from_pylist(records), root / "train-00009.parquet")


def _bad_row_records() -> list[dict]:
    return [
        {"image": {"bytes": b"not an image", "path": None},
         "description": {"item": "broken", "description_0": "x", "description_1": "y"}},
        {"image": {"bytes": b"", "path": None}, "description": {"description_0": "no item"}},
    ]


def test_each_kind_of_bad_data_is_counted_logged_and_skipped(released, caplog):
    root, uids = released
    (root / "mask" / f"{uids[0]}.png").unlink()  # missing mask
    Image.new("L", (512, 512), 0).save(root / "mask" / f"{uids[1]}.png")  # empty mask
    _append_shard(root, _bad_row_records())  # unreadable image, malformed description
    data = ReleasedDataset(root)
    assert len(data) == 5
    tally = BadDataTally()
    with caplog.at_level("WARNING", logger="mosaic_kit.data"):
        good = list(skip_bad(data, range(len(data)), tally))
    assert [index for index, _ in good] == [2]
    assert tally.counts == {"missing_mask": 1, "empty_mask": 1, "unreadable_image": 1, "malformed_row": 1}
    assert tally.ids["missing_mask"] == [uids[0]] and tally.ids["empty_mask"] == [uids[1]]
    assert tally.ids["unreadable_image"] == ["train-00009.parquet:0"]
    assert tally.ids["malformed_row"] == ["train-00009.parquet:1"]
    assert uids[0] in caplog.text and "train-00009.parquet:0" in caplog.text
    summary = tally.summary()
    assert summary.startswith("bad data skipped: 4") and "missing_mask: 1" in summary


def test_missing_and_malformed_coordinates(released):
    root, uids = released
    released_coord_path(root, "geoaware", uids[0]).unlink()
    torch.save(torch.zeros(32, 32, 2, dtype=torch.int64), released_coord_path(root, "dift", uids[1]))
    released_coord_path(root, "dift", uids[2]).write_bytes(b"garbage")
    data = ReleasedDataset(root)
    with pytest.raises(BadSample) as missing:
        data[0]
    assert (missing.value.kind, missing.value.sample_id) == ("missing_coordinates", uids[0])
    assert "geoaware" in missing.value.reason
    for index in (1, 2):
        with pytest.raises(BadSample) as malformed:
            data[index]
        assert (malformed.value.kind, malformed.value.sample_id) == ("malformed_coordinates", uids[index])
    with pytest.raises(BadSample, match=r"shape \(64, 64, 2\)"):
        data[1]
    # A single extractor still works where the other one is missing.
    assert ReleasedDataset(root, methods=["dift"])[0].sample_id == uids[0]


def test_unreadable_mask_and_argument_errors(released):
    root, uids = released
    (root / "mask" / f"{uids[2]}.png").write_bytes(b"not a png")
    with pytest.raises(BadSample) as bad:
        ReleasedDataset(root)[2]
    assert bad.value.kind == "unreadable_image" and "mask" in bad.value.reason
    with pytest.raises(ValueError, match="`methods`"):
        ReleasedDataset(root, methods="dift")
    with pytest.raises(ValueError, match="`layout`"):
        ReleasedDataset(root, layout="yx")
    with pytest.raises(ValueError, match="`target_size`"):
        ReleasedDataset(root, target_size=0)
    with pytest.raises(IndexError):
        ReleasedDataset(root)[3]
    with pytest.raises(ValueError, match="`kind`"):
        BadSample("typo", "x", "y")


def test_dataset_pickles_for_workers_and_reads_the_same(released):
    import pickle

    root, _ = released
    data = ReleasedDataset(root, target_size=128, ref_size=128)
    first = data[0]
    copy = pickle.loads(pickle.dumps(data))
    again = copy[0]
    assert torch.equal(first.target, again.target) and torch.equal(first.pairs[0], again.pairs[0])
    assert split_panels(Image.new("RGB", (1048, 528)))[0].size == (512, 512)


def test_worker_processes_read_the_same_samples_in_the_same_order(released):
    from mosaic_kit.data import ResumableSampler, SkippingLoader

    root, uids = released
    (root / "mask" / f"{uids[1]}.png").unlink()
    data = ReleasedDataset(root, target_size=64, ref_size=64)
    data[0]  # files opened in this process before the workers fork
    runs = []
    for workers in (0, 2):
        loader = SkippingLoader(data, batch_size=1, sampler=ResumableSampler(3, seed=1), num_workers=workers, max_epochs=2)
        runs.append(([b[0].sample_id for b in loader], loader.tally.state_dict()))
    assert runs[0] == runs[1]
    assert sorted(set(runs[0][0])) == sorted([uids[0], uids[2]]) and runs[0][1]["ids"] == {"missing_mask": [uids[1]] * 2}
