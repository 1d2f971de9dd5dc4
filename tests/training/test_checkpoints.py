"""Checkpoints that cannot lie (mosaic_kit.training.checkpoint_folders): digest, verification, fallback,
pruning and clean-up, on hand-made folders; the trainer's use of them on a tiny run."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mosaic_kit.training.checkpoint_folders import (
    DIGEST_FILE,
    CheckpointError,
    clean_stale_checkpoints,
    latest_intact_checkpoint,
    list_checkpoints,
    publish_checkpoint,
    remove_checkpoint,
    verify_checkpoint,
    write_checkpoint_digest,
)

FILES = {"trainer_state.json": b'{"step": 4}', "optimizer.bin": bytes(range(256)) * 3,
         "sub/extra.bin": b"\x00" * 17, "lora.safetensors": b"weights" * 11}


def make_checkpoint(root: Path, step: int, files: dict[str, bytes] = FILES) -> Path:
    folder = root / f"step-{step:07d}"
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    write_checkpoint_digest(folder)
    return folder


def test_digest_lists_every_file_with_size_and_sha256(tmp_path):
    import hashlib

    folder = make_checkpoint(tmp_path, 4)
    digest = json.loads((folder / DIGEST_FILE).read_text())
    assert digest["format"] == 1 and set(digest["files"]) == set(FILES)
    for name, data in FILES.items():
        assert digest["files"][name] == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    assert set(verify_checkpoint(folder, required=("trainer_state.json",))) == set(FILES)
    assert not [p for p in folder.iterdir() if p.name.startswith(".tmp-")]  # the digest's temporary name is gone


@given(which=st.sampled_from(sorted(FILES)), offset=st.integers(0, 10_000), mask=st.integers(1, 255))
def test_any_flipped_byte_is_found_and_named(tmp_path_factory, which, offset, mask):
    folder = make_checkpoint(tmp_path_factory.mktemp("c"), 2)
    data = bytearray(FILES[which])
    data[offset % len(data)] ^= mask
    (folder / which).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="SHA-256 differs") as caught:
        verify_checkpoint(folder)
    assert caught.value.file == which and caught.value.folder == folder
    assert str(folder) in str(caught.value) and repr(which) in str(caught.value)


@given(which=st.sampled_from(sorted(FILES)), keep=st.integers(0, 100))
def test_a_truncated_file_is_found_and_named(tmp_path_factory, which, keep):
    folder = make_checkpoint(tmp_path_factory.mktemp("c"), 2)
    data = FILES[which]
    (folder / which).write_bytes(data[: min(keep, len(data) - 1)])
    with pytest.raises(CheckpointError, match="truncated") as caught:
        verify_checkpoint(folder)
    assert caught.value.file == which


def test_missing_file_digest_or_required_entry_and_a_broken_digest_are_named(tmp_path):
    folder = make_checkpoint(tmp_path, 2)
    (folder / "optimizer.bin").unlink()
    with pytest.raises(CheckpointError, match="'optimizer.bin': missing"):
        verify_checkpoint(folder)
    folder = make_checkpoint(tmp_path / "b", 2)
    with pytest.raises(CheckpointError, match="'ema.pt': not listed"):
        verify_checkpoint(folder, required=("trainer_state.json", "ema.pt"))
    (folder / DIGEST_FILE).write_text('{"format": 1, "files": {"a": {"sha256": "00"}}}')  # no size
    with pytest.raises(CheckpointError, match=f"'{DIGEST_FILE}': unreadable digest"):
        verify_checkpoint(folder)
    (folder / DIGEST_FILE).write_bytes(b"\xff\xfe not json")
    with pytest.raises(CheckpointError, match=f"'{DIGEST_FILE}': unreadable digest"):
        verify_checkpoint(folder)
    (folder / DIGEST_FILE).unlink()
    with pytest.raises(CheckpointError, match=f"'{DIGEST_FILE}': missing"):
        verify_checkpoint(folder)
    with pytest.raises(CheckpointError, match="no such folder"):
        verify_checkpoint(tmp_path / "nowhere")


def test_latest_intact_falls_back_with_a_warning_naming_folder_and_file(tmp_path):
    for step in (2, 4, 6, 8):
        make_checkpoint(tmp_path, step)
    (tmp_path / "step-0000008" / DIGEST_FILE).unlink()  # incomplete
    with open(tmp_path / "step-0000006" / "optimizer.bin", "r+b") as handle:  # damaged
        handle.seek(5)
        handle.write(b"\x99")
    (tmp_path / ".tmp-step-0000010").mkdir()  # a killed write: never a candidate
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert latest_intact_checkpoint(tmp_path).name == "step-0000004"
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2
    assert f"{tmp_path / 'step-0000008'}, file '{DIGEST_FILE}'" in messages[0]
    assert f"{tmp_path / 'step-0000006'}, file 'optimizer.bin'" in messages[1]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000002", "step-0000004", "step-0000006"]


def test_no_intact_checkpoint_is_a_clear_error_listing_each(tmp_path):
    with pytest.raises(CheckpointError, match="found none"):
        latest_intact_checkpoint(tmp_path)
    for step in (1, 2):
        make_checkpoint(tmp_path, step)
        (tmp_path / f"step-{step:07d}" / "lora.safetensors").write_bytes(b"")
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="no intact checkpoint") as caught:
        latest_intact_checkpoint(tmp_path)
    assert "step-0000001, file 'lora.safetensors'" in str(caught.value)
    assert "step-0000002, file 'lora.safetensors'" in str(caught.value)


def test_pruning_interrupted_midway_never_leaves_a_listed_half_deleted_checkpoint(tmp_path, monkeypatch):
    old, new = make_checkpoint(tmp_path, 1), make_checkpoint(tmp_path, 2)
    real_rmtree = shutil.rmtree

    def die_after_one_file(path, *args, **kwargs):  # a kill in the middle of deleting
        victim = next(p for p in Path(path).rglob("*") if p.is_file())
        victim.unlink()
        raise KeyboardInterrupt("killed while deleting")

    monkeypatch.setattr(shutil, "rmtree", die_after_one_file)
    with pytest.raises(KeyboardInterrupt):
        remove_checkpoint(old)
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    assert list_checkpoints(tmp_path) == [new]  # the half-deleted one is under its trash name
    assert latest_intact_checkpoint(tmp_path) == new
    assert clean_stale_checkpoints(tmp_path) == [".trash-step-0000001"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-0000002"]


def test_publish_replaces_an_existing_folder_and_clean_up_removes_leftovers(tmp_path):
    damaged = make_checkpoint(tmp_path, 3)
    (damaged / "optimizer.bin").write_bytes(b"garbage")
    fresh = make_checkpoint(tmp_path / "staging", 3, {**FILES, "trainer_state.json": b'{"step": 3}'})
    tmp = tmp_path / ".tmp-step-0000003"
    os.replace(fresh, tmp)
    assert publish_checkpoint(tmp, damaged) == damaged
    verify_checkpoint(damaged)
    assert (damaged / "trainer_state.json").read_bytes() == b'{"step": 3}'
    (tmp_path / ".tmp-step-0000009").mkdir()
    (tmp_path / ".tmp-step-0000009" / "optimizer.bin").write_bytes(b"half")
    (tmp_path / ".trash-step-0000001").mkdir()
    assert clean_stale_checkpoints(tmp_path) == [".tmp-step-0000009", ".trash-step-0000001"]
    assert clean_stale_checkpoints(tmp_path / "absent") == []
    assert list_checkpoints(tmp_path) == [damaged]


# -- the trainer -------------------------------------------------------------------------------------
def test_trainer_checkpoints_carry_a_digest_and_a_damaged_one_is_refused_by_name(tmp_path):
    pytest.importorskip("diffusers")
    from test_training_hardening import tiny_config

    from mosaic_kit.training import MosaicTrainer

    out = tmp_path / "run"
    (out / "checkpoints" / ".tmp-step-0000005").mkdir(parents=True)  # left by a killed save
    (out / "checkpoints" / ".trash-step-0000001").mkdir()  # left by a killed prune
    (out / ".tmp-summary.json").write_text("{")  # left by a killed atomic write
    trainer = MosaicTrainer(tiny_config(out, "max_steps=2", "checkpoint_every=1", "keep_checkpoints=1"))
    trainer.setup()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == []  # cleaned at the start
    assert not list(out.glob(".tmp-*"))
    trainer.train()
    (only,) = trainer.checkpoints()
    files = verify_checkpoint(only)
    assert set(files) == {p.relative_to(only).as_posix() for p in only.rglob("*")
                          if p.is_file() and p.name != DIGEST_FILE}
    assert {"trainer_state.json", "lora_parameters.safetensors", "trainer_rank0.pt", "optimizer.bin"} <= set(files)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000002"]

    other_rank = MosaicTrainer(tiny_config(out, "max_steps=2", "model.lora_rank=8"))  # intact, but not this model's
    with pytest.raises(CheckpointError, match="lora_parameters.safetensors': cannot be loaded") as caught:
        other_rank.load_checkpoint(only)
    assert caught.value.folder == only

    with open(only / "lora_parameters.safetensors", "r+b") as handle:
        handle.seek(-3, os.SEEK_END)
        handle.write(b"\x00\x01\x02")
    resumed = MosaicTrainer(tiny_config(out, "max_steps=2", "checkpoint_every=1", "keep_checkpoints=1"))
    with pytest.raises(CheckpointError, match="lora_parameters.safetensors': SHA-256 differs") as caught:
        resumed.load_checkpoint(only)
    assert caught.value.folder == only
    with pytest.warns(UserWarning, match="step-0000002"), pytest.raises(CheckpointError, match="no intact"):
        resumed.load_checkpoint("latest")
