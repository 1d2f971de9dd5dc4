"""Hardening of the trainer: the bad-data tally reaches the summary, non-finite losses stop the run
with the step and the term, and the first steps run with the non-finite checks on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("accelerate")

from mosaic_kit.training import MosaicTrainer, load_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "recipes" / "configs" / "tiny_cpu.yaml"
FAST = ["data.target_size=64", "data.ref_size=32", "data.batch_size=2", "validation_samples=0", "log_every=1",
        "model.lora_rank=4", "data.synthetic_refs=[1,3]", "validate_every=0", "tracker=null", "cpu_threads=1"]


def tiny_config(out: Path, *overrides: str):
    return load_config([TINY], [f"output_dir={out}", *FAST, *overrides])


def test_bad_samples_of_a_manifest_reach_the_printed_tally_and_the_summary(tmp_path, capsys, caplog):
    from mosaic_kit.data import make_manifest_fixture

    manifest = make_manifest_fixture(tmp_path / "data", ["dog", "cat", "owl", "fox"], size=64)
    (tmp_path / "data" / "images" / "cat_ref.png").write_bytes(b"not a png")  # unreadable
    (tmp_path / "data" / "images" / "owl_target.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    config = tiny_config(tmp_path / "run", "max_steps=3", "checkpoint_every=3", "data.kind=manifest",
                         f"data.root={manifest}", "data.batch_size=1")
    with caplog.at_level("WARNING", logger="mosaic_kit.data"):
        summary = MosaicTrainer(config).train()
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping bad sample")]
    # 3 steps of batch 1 over 4-sample epochs with 2 bad samples: both bad ones are met at least once
    assert len(logged) >= 2
    bad = summary["bad_samples"]
    assert sum(bad["counts"].values()) == len(logged)  # every logged skip is counted, none more
    assert bad["counts"] == {"unreadable_image": len(bad["ids"]["unreadable_image"])}
    assert sorted(set(bad["ids"]["unreadable_image"])) == ["cat", "owl"]
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["bad_samples"] == bad
    printed = capsys.readouterr().out
    assert f"bad data skipped: {sum(bad['counts'].values())}" in printed and "cat" in printed and "owl" in printed
