"""Every recipe: one spelling of the shared options (--output-dir, --threads, --no-progress,
--shard), old spellings still read with a FutureWarning, and a bad option or override is one line
on stderr naming the key and the accepted ones, with exit code 2, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import DREAMBENCH_SUBSET, load_script

ROOT = Path(__file__).resolve().parents[2]


def usage_error(capsys, main, argv) -> str:
    """Runs ``main(argv)``; asserts exit code 2 and one line on stderr; returns that line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert stopped.value.code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def recipes():
    pytest.importorskip("diffusers")
    names = ["flux_mosaic_train", "synthetic_ablation", "build_dataset", "evaluate", "flux_mosaic_infer",
             "build_correspondences", "fetch_dreambench"]
    return {name: load_script(f"recipes/{name}.py", f"options_{name}") for name in names}


def test_train_recipe_bad_overrides_and_options(recipes, capsys):
    main = recipes["flux_mosaic_train"].main
    err = usage_error(capsys, main, ["max_stepz=3"])
    assert "Unknown settings ['max_stepz']" in err and "'max_steps'" in err and "'output_dir'" in err
    err = usage_error(capsys, main, ["optim.lr=-1"])
    assert "`optim.lr`" in err and "-1" in err
    err = usage_error(capsys, main, ["data.batchsize=2"])
    assert "Unknown settings in `data`: ['batchsize']" in err and "'batch_size'" in err
    err = usage_error(capsys, main, ["max_steps"])
    assert "key=value" in err
    err = usage_error(capsys, main, ["--output", "x"])
    assert "unrecognized arguments: --output;" in err and "did you mean --output-dir?" in err and "--threads" in err
    err = usage_error(capsys, main, ["--threads", "0"])
    assert "argument --threads: expected a positive int, but got '0'" in err
    err = usage_error(capsys, main, ["--config", "no/such.yaml"])
    assert "no/such.yaml" in err


def test_ablation_recipe_checks_every_setting_before_the_first_run(recipes, capsys, tmp_path):
    main = recipes["synthetic_ablation"].main
    err = usage_error(capsys, main, ["--smoke", "--output-dir", str(tmp_path), "ablation.bogus=1"])
    assert "Unknown settings in `ablation`: ['bogus']" in err and "'output_dir'" in err and "'threads'" in err
    # a misspelt objective setting of one ablation setting: refused before any training
    err = usage_error(capsys, main, ["--smoke", "--output-dir", str(tmp_path), "ablation.settings.scal={scal_wieght: 1}"])
    assert "['scal_wieght']" in err and "'scal_weight'" in err
    err = usage_error(capsys, main, ["--smoke", "--output-dir", str(tmp_path), "train.optim.lr=0"])
    assert "`optim.lr`" in err
    assert not (tmp_path / "runs").exists()


def test_dataset_recipe_bad_overrides(recipes, capsys, tmp_path):
    main = recipes["build_dataset"].main
    err = usage_error(capsys, main, ["--output-dir", str(tmp_path / "a"), "prompt.count=3"])
    assert "unknown ['prompt']" in err and "'prompts'" in err and "'output_dir'" in err
    err = usage_error(capsys, main, ["--output-dir", str(tmp_path / "a"), "filter.quality=psnr"])
    assert "`filter.quality`" in err and "'sharpness'" in err
    err = usage_error(capsys, main, ["--shard", "2/2"])
    assert "argument --shard" in err and "0 <= i < n" in err
    assert not (tmp_path / "a").exists()


def test_dataset_config_reads_the_old_out_key_with_a_warning():
    from mosaic_kit.dataset_builder import dataset_config_from_dict

    base = {"prompts": {"source": "file", "file": "p.json"}, "images": {"source": "folder", "folder": "i"}}
    with pytest.warns(FutureWarning, match="`out` is deprecated.*use `output_dir`"):
        assert dataset_config_from_dict({**base, "out": "runs/x"}).output_dir == "runs/x"
    with pytest.warns(FutureWarning), pytest.raises(ValueError, match="got both: output_dir='a', out='b'"):
        dataset_config_from_dict({**base, "output_dir": "a", "out": "b"})
    assert dataset_config_from_dict({**base, "output_dir": "runs/y"}).output_dir == "runs/y"


def test_evaluate_recipe_bad_options_and_missing_photos(recipes, capsys, tmp_path, monkeypatch):
    main = recipes["evaluate"].main
    err = usage_error(capsys, main, ["--generate", "--tiny", "--output-dir", str(tmp_path), "--setting", "triple"])
    assert "argument --setting: invalid choice: 'triple'" in err and "'single', 'multi'" in err
    err = usage_error(capsys, main, ["--generate", "--tiny"])
    assert "required: --output-dir" in err
    err = usage_error(capsys, main, ["--score-only", str(tmp_path), "--output-dir", str(tmp_path / "run"),
                                     "--dreambench", str(DREAMBENCH_SUBSET), "--max-subjects", "0", "--tiny-metrics"])
    assert "max_subjects" in err
    monkeypatch.setenv("MOSAIC_DREAMBENCH", str(tmp_path / "nowhere"))
    err = usage_error(capsys, main, ["--score-only", str(tmp_path), "--output-dir", str(tmp_path / "run"), "--tiny-metrics"])
    assert "nowhere ($MOSAIC_DREAMBENCH)" in err and "`python recipes/fetch_dreambench.py`" in err


def test_infer_and_correspondence_and_fetch_recipes_bad_options(recipes, capsys, tmp_path):
    err = usage_error(capsys, recipes["flux_mosaic_infer"].main, ["--dtype", "fp64"])
    assert "argument --dtype: invalid choice: 'fp64'" in err and "'bf16'" in err
    manifest = tmp_path / "manifest.jsonl"
    photo = str(DREAMBENCH_SUBSET / "dog" / "00.jpg")
    manifest.write_text(json.dumps({"id": "a", "target": photo, "references": [photo]}) + "\n")
    err = usage_error(capsys, recipes["build_correspondences"].main,
                      ["--manifest", str(manifest), "--output-dir", str(tmp_path / "c"), "--extractor", "sift:patch_sise=16"])
    assert "unknown ['patch_sise']" in err and "'patch_size'" in err
    err = usage_error(capsys, recipes["build_correspondences"].main, ["--manifest", str(manifest)])
    assert "required: --output-dir" in err
    err = usage_error(capsys, recipes["fetch_dreambench"].main,
                      ["--source", str(DREAMBENCH_SUBSET), "--output-dir", str(tmp_path / "f"), "--subjects", "unicorn"])
    assert "Expected `subjects` among" in err and "'dog'" in err and "['unicorn']" in err


def test_old_spellings_still_work_with_a_warning(recipes, tmp_path):
    cases = [
        ("evaluate", ["--generate", "--tiny", "--out", str(tmp_path), "--quiet"], {"output_dir": tmp_path, "no_progress": True}),
        ("flux_mosaic_infer", ["--out", "x.png"], {"output": "x.png"}),
        ("synthetic_ablation", ["--output", "runs/a"], {"output_dir": "runs/a"}),
    ]
    for name, argv, expected in cases:
        with pytest.warns(FutureWarning, match="is deprecated .* use --"):
            args = recipes[name].parse_args(argv)
        assert {key: getattr(args, key) for key in expected} == expected, name


def test_the_shared_options_are_spelled_the_same_in_every_recipe(recipes):
    """--output-dir, --threads and --no-progress wherever a recipe writes a folder, runs torch on
    the CPU or shows progress bars; --shard where it shards."""
    parsers = {
        "flux_mosaic_train": recipes["flux_mosaic_train"].build_parser(),
        "synthetic_ablation": recipes["synthetic_ablation"].build_parser(),
        "evaluate": recipes["evaluate"].build_parser(),
    }
    for name, parser in parsers.items():
        assert {"--output-dir", "--threads", "--no-progress"} <= set(parser.accepted_options()), name
    for name in ("build_dataset", "build_correspondences"):
        source = (ROOT / "recipes" / f"{name}.py").read_text()
        assert all(f"add_{option}(parser" in source for option in ("output_dir", "threads", "progress")), name
        assert "--shard" in source, name
    for path in sorted((ROOT / "recipes").glob("*.py")):
        source = path.read_text()
        for old in ('"--out"', '"--quiet"'):
            if old in source:  # only as a deprecated alias
                assert "DeprecatedAlias" in source or "deprecated=" in source, (path.name, old)


@pytest.mark.slow  # two processes that import the model libraries (about 30 s on 2 busy cores)
def test_a_bad_override_on_the_command_line_is_one_line_not_a_traceback(tmp_path):
    """The issue's report, as a user meets it: `python recipes/build_dataset.py bogus=1`."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(ROOT / "recipes" / "build_dataset.py"), "bogus=1"], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        done.stderr.strip().splitlines()[0]] and "build_dataset.py: error: " in done.stderr and "['bogus']" in done.stderr
    minimal = subprocess.run([sys.executable, str(ROOT / "recipes" / "any_dit_minimal.py"), "--steps", "0"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert minimal.returncode == 2 and minimal.stderr.strip() == (
        "any_dit_minimal.py: error: argument --steps: expected at least 5, but got 0")
