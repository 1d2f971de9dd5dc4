"""``model.family_options`` end to end: a tiny Kontext run from recipes/configs/tiny_kontext_cpu.yaml
with ``{reference_method: index}`` trains with it and writes a LoRA that records it, which
recipes/flux_mosaic_infer.py then runs with; bad options stop both recipes with one line (exit 2)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from helpers import load_script, train_in_process

pytest.importorskip("diffusers")

from mosaic_kit.models.options import recorded_family_options  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "recipes" / "configs" / "tiny_kontext_cpu.yaml"


def _one_line_exit_2(capsys, main, argv) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert stopped.value.code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.slow  # about 10 s on one CPU thread (the trainer set-up, 2 steps, three inference runs)
def test_tiny_kontext_run_with_index_method_writes_a_lora_that_inference_runs_with_index(tmp_path, capsys):
    raw = yaml.safe_load(CONFIG.read_text())
    raw.update(output_dir=str(tmp_path / "run"), max_steps=2, checkpoint_every=2, log_every=1, validation_samples=0)
    raw["model"]["family_options"] = {"reference_method": "index"}
    raw["data"].update(target_size=32, ref_size=16, synthetic_refs=[2, 2])
    trainer = train_in_process(raw)
    assert trainer.family.reference_method == "index"
    ids = trainer.family.encode(torch.rand(1, 3, 32, 32), ["a"], torch.rand(1, 2, 3, 16, 16)).conditioning["reference_ids"]
    assert ids[:, 0].unique().tolist() == [1.0, 2.0] and ids[:, 1:].abs().sum() == 0  # index k, no offset
    assert recorded_family_options(tmp_path / "run") == {"reference_method": "index"}
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["model"]["family_options"] == {"reference_method": "index"}

    infer = load_script("recipes/flux_mosaic_infer.py", "flux_mosaic_infer")
    out = tmp_path / "out.png"
    common = ["--family", "kontext", "--lora", str(tmp_path / "run"), "--steps", "1", "--output", str(out)]
    summary = infer.main(common)  # the recorded option, with no flag
    assert summary["family_options"] == {"reference_method": "index"} and out.is_file()
    assert infer.main([*common, "--reference-method", "index"])["family_options"] == {"reference_method": "index"}
    err = _one_line_exit_2(capsys, infer.main, [*common, "--family-option", "reference_method=uxo"])
    assert "trained with it" in err and "'uxo'" in err


def test_bad_family_options_stop_the_recipes_with_one_line(tmp_path, capsys):
    infer = load_script("recipes/flux_mosaic_infer.py", "flux_mosaic_infer")
    err = _one_line_exit_2(capsys, infer.main, ["--family", "kontext", "--family-option", "methd=index"])
    assert "Unknown family option 'methd' for model family 'kontext'; expected among ['reference_method']" in err
    err = _one_line_exit_2(capsys, infer.main, ["--family", "flux2", "--reference-method", "index"])
    assert "'reference_method' for model family 'flux2'; it takes none" in err
    err = _one_line_exit_2(capsys, infer.main, ["--family", "kontext", "--family-option", "reference_method"])
    assert "KEY=VALUE" in err
    err = _one_line_exit_2(capsys, infer.main, ["--family", "kontext", "--reference-method", "side"])
    assert "one of ['offset', 'index', 'uxo'], but got 'side'" in err
    train = load_script("recipes/flux_mosaic_train.py", "flux_mosaic_train")
    err = _one_line_exit_2(capsys, train.main, ["--config", str(CONFIG), f"output_dir={tmp_path}",
                                                "model.family_options={method: index}"])
    assert "`model.family_options`: Unknown family option 'method'" in err
