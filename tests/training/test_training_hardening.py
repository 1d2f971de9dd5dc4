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

REPO = Path(__file__).resolve().parents[2]
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


class InjectNonFinite:
    """The trainer's real objective, with one term replaced by NaN or inf at one step (fault injection)."""

    def __init__(self, objective, at_step: int, term: str | None, value: float = float("nan"), record=None):
        self.objective, self.at_step, self.term, self.value, self.record = objective, at_step, term, value, record

    def __getattr__(self, name):
        return getattr(self.objective, name)

    def __call__(self, *args, step, **kwargs):
        from dataclasses import replace

        from mosaic_kit import finite_checks_enabled

        if self.record is not None:
            self.record.append(finite_checks_enabled())
        out = self.objective(*args, step=step, **kwargs)
        if self.term is None or step + 1 != self.at_step:  # `step` counts completed steps
            return out
        if self.term == "loss":  # every term finite, the total not
            return replace(out, loss=out.loss + self.value)
        bad = {self.term: getattr(out, self.term) + self.value}
        terms = {**{k: getattr(out, k) for k in ("flow_matching", "scal", "mdl")}, **bad}
        loss = terms["flow_matching"] + out.scal_weight * terms["scal"] + out.mdl_weight * terms["mdl"]
        return replace(out, loss=loss, **bad)


def lora_values(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.family.transformer.named_parameters() if v.requires_grad}


@pytest.mark.parametrize("term,value", [("flow_matching", float("nan")), ("scal", float("inf")), ("mdl", float("nan")),
                                        ("loss", float("inf"))])
def test_a_non_finite_loss_term_stops_training_with_the_step_and_the_term(tmp_path, term, value):
    from mosaic_kit.training import NonFiniteTrainingError, verify_checkpoint

    config = tiny_config(tmp_path / "run", "max_steps=4", "checkpoint_every=2", "keep_checkpoints=2",
                         "objective.overrides={scal_weight: 0.5, mdl_weight: 0.5}")
    trainer = MosaicTrainer(config)
    trainer.setup()
    trainer.objective = InjectNonFinite(trainer.objective, at_step=3, term=term, value=value)
    before = {}
    trainer.on_step_end = lambda t, step: before.update(lora_values(t)) if step == 2 else None
    with pytest.raises(NonFiniteTrainingError, match=f"step 3: `{term}`.* is not finite on process 0") as caught:
        trainer.train()
    if term == "loss":
        assert "the weighted total; every term is finite" in str(caught.value)
    assert "No optimiser step was taken" in str(caught.value)
    assert "step-0000002 is intact (verified against its digest)" in str(caught.value)
    assert trainer.step == 2
    after = lora_values(trainer)
    assert all(torch.equal(before[k], after[k]) for k in before)  # the bad step changed nothing
    (checkpoint,) = trainer.checkpoints()
    assert checkpoint.name == "step-0000002"
    verify_checkpoint(checkpoint)
    assert not (tmp_path / "run" / "summary.json").exists()


def test_a_non_finite_gradient_with_a_finite_loss_stops_before_the_optimiser_step(tmp_path):
    from mosaic_kit.training import NonFiniteTrainingError

    trainer = MosaicTrainer(tiny_config(tmp_path / "run", "max_steps=3", "checkpoint_every=1"))
    trainer.setup()
    hooks = []

    def poison(t, step):
        if step == 1:
            hooks.append(t.lora_parameters[0].register_hook(lambda grad: grad * float("nan")))
            poison.before = lora_values(t)

    trainer.on_step_end = poison
    with pytest.raises(NonFiniteTrainingError, match="step 2: `grad_norm` is not finite"):
        trainer.train()
    hooks[0].remove()
    after = lora_values(trainer)
    assert all(torch.equal(poison.before[k], after[k]) for k in after)
    assert all(bool(torch.isfinite(p).all()) for p in trainer.ema.shadow_params)
    assert [p.name for p in trainer.checkpoints()] == ["step-0000001"]


def test_checkpoints_of_non_finite_weights_are_never_written(tmp_path):
    from mosaic_kit.training import NonFiniteTrainingError

    trainer = MosaicTrainer(tiny_config(tmp_path / "run", "max_steps=1", "checkpoint_every=1"))
    trainer.train()
    with torch.no_grad():
        trainer.lora_parameters[3].view(-1)[0] = float("nan")
    trainer.step = 2
    with pytest.raises(NonFiniteTrainingError, match="Refusing to save a checkpoint at step 2: .*lora.*1 NaN"):
        trainer.save_checkpoint()
    assert [p.name for p in trainer.checkpoints()] == ["step-0000001"]
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp-*"))


def test_the_first_steps_run_with_finite_checks_and_a_bad_tensor_there_stops_the_run(tmp_path):
    from mosaic_kit import check_finite, finite_checks
    from mosaic_kit.training import NonFiniteTrainingError

    record: list[bool] = []
    trainer = MosaicTrainer(tiny_config(tmp_path / "a", "max_steps=4", "checkpoint_every=4", "check_finite_steps=2"))
    trainer.setup()
    trainer.objective = InjectNonFinite(trainer.objective, at_step=0, term=None, record=record)
    with finite_checks(False):  # the test suite turns the checks on everywhere: off, to see the trainer's switch
        trainer.train()
    assert record == [True, True, False, False]

    class CheckPrediction(InjectNonFinite):  # the objective's input check, as the hot paths do it
        def __call__(self, prediction, *args, **kwargs):
            check_finite("prediction", prediction)
            return super().__call__(prediction, *args, **kwargs)

    trainer = MosaicTrainer(tiny_config(tmp_path / "b", "max_steps=4", "checkpoint_every=1", "check_finite_steps=3"))
    trainer.setup()
    trainer.objective = CheckPrediction(trainer.objective, at_step=0, term=None)

    def poison(t, step):
        if step == 1:
            with torch.no_grad():
                t.lora_parameters[0].view(-1)[0] = float("nan")  # a weight goes bad between steps

    trainer.on_step_end = poison
    # the first hot-path check on the way is the capture's (RefTargetCapture.add checks the
    # reference queries while the switch is on), before the prediction reaches the objective
    with finite_checks(False), pytest.raises(NonFiniteTrainingError, match=r"step 2 \(finite checks of the first 3 "
                                             r"steps\): Expected `query` to hold only finite values"):
        trainer.train()
    assert [p.name for p in trainer.checkpoints()] == ["step-0000001"]


def test_check_finite_steps_is_validated():
    from mosaic_kit.training import config_from_dict

    assert config_from_dict({}).check_finite_steps == 10
    for bad in (-1, 1.5, True, "10"):
        with pytest.raises(ValueError, match="check_finite_steps"):
            config_from_dict({"check_finite_steps": bad})
