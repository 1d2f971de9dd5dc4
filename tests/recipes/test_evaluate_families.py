"""DreamBench generation (recipes/evaluate.py --generate) with any model family of the registry:
each image one ``family.sample`` through `FamilySampler`, the photos fitted on white at
``--ref-size`` as `MosaicFluxPipeline` fits them; a FLUX.1 and an in-sequence family on tiny
random components, family options from the command line or the LoRA file."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import DREAMBENCH_SUBSET, load_script
from PIL import Image

pytest.importorskip("diffusers")

from mosaic_kit.eval import DreamBench, GenerationSettings, generate_case_images, list_cases  # noqa: E402
from mosaic_kit.eval.xversebench import FamilySampler  # noqa: E402
from mosaic_kit.pipelines import build_family  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ["--setting", "multi", "--max-multi", "1", "--images-per-prompt", "1", "--height", "32", "--width", "32",
         "--steps", "1", "--tiny-metrics", "--no-progress", "--no-sheets", "--device", "cpu"]


def test_family_sampler_generates_what_the_mosaic_pipeline_generates(tmp_path):
    """The FLUX.1 family through `FamilySampler` equals the harness calling its MosaicFluxPipeline
    directly (the path before): same references (fitted on white), same seeds, same pixels."""
    bench = DreamBench.load(DREAMBENCH_SUBSET)
    case = list_cases(bench, settings=["multi"], max_multi=1, images_per_prompt=1, seed=0)[0]
    family = build_family("flux1", seed=0)
    settings = dict(height=32, width=32, num_inference_steps=2, reference_size=32)
    ours = generate_case_images(FamilySampler(family), bench, case, tmp_path / "family", GenerationSettings(**settings))
    direct = generate_case_images(family.pipe, bench, case, tmp_path / "pipe", GenerationSettings(
        **settings, pipeline_kwargs={"max_sequence_length": family.max_sequence_length, "progress": False}))
    assert np.array_equal(np.asarray(Image.open(ours[0])), np.asarray(Image.open(direct[0])))


@pytest.mark.parametrize("family, ref_size", [("flux1", 32), ("kontext", 32)])
def test_generate_runs_the_family(tmp_path, family, ref_size):
    evaluate = load_script("recipes/evaluate.py", "evaluate_recipe_families")
    out = tmp_path / family
    summary = evaluate.main(["--generate", "--tiny", "--family", family, "--ref-size", str(ref_size), "--output-dir",
                             str(out), "--dreambench", str(DREAMBENCH_SUBSET), *SMALL])
    assert summary["scored_cases"] == 1
    assert [Image.open(p).size for p in (out / "images").rglob("*.png")] == [(32, 32)]
    settings = json.loads((out / "settings.json").read_text())
    assert settings["family"] == family and settings["pipeline"] == "tiny"


def test_generate_takes_family_options_from_the_command_line_and_the_lora(tmp_path, capsys):
    evaluate = load_script("recipes/evaluate.py", "evaluate_recipe_families")
    trained = build_family("kontext", seed=0, family_options={"reference_method": "uxo"})
    trained.add_lora(rank=2)
    lora = trained.save_lora(tmp_path / "lora")
    common = ["--generate", "--tiny", "--family", "kontext", "--ref-size", "32", "--dreambench", str(DREAMBENCH_SUBSET),
              "--lora", str(lora), *SMALL]
    evaluate.main([*common, "--output-dir", str(tmp_path / "run")])
    settings = json.loads((tmp_path / "run" / "settings.json").read_text())
    assert settings["family_options"] == {"reference_method": "uxo"}  # what the LoRA records
    for bad, message in ((["--family-option", "reference_method=index"], "was trained with it"),
                         (["--family-option", "methd=index"], "Unknown family option 'methd'")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as stopped:
            evaluate.main([*common, "--output-dir", str(tmp_path / "bad"), *bad])
        err = capsys.readouterr().err.strip()
        assert stopped.value.code == 2 and len(err.splitlines()) == 1 and message in err, err
    capsys.readouterr()
    with pytest.raises(SystemExit):
        evaluate.main(["--generate", "--family", "flux2", "--lora", str(lora), "--output-dir", str(tmp_path / "x")])
    assert "--generate needs --base" in capsys.readouterr().err
