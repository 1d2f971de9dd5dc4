"""Validation sheets of a training run, through the model boundary only.

`Validator` writes ``samples/step-N.png``: per validation item, the references, the ground truth
and a sample from the family's own pipeline (``family.sample``, EMA weights when enabled), then
where each reference's annotated points attend in the target (red) beside the true target region
(green), as in the paper's Fig. 6. It knows nothing of the family it drives.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..attention import PointAttentionRows
from ..models import ModelFamily
from ..reporting.training import attention_panels, validation_sheet
from ..utils.images import tensor_to_pil

log = logging.getLogger("mosaic_kit.training")

__all__ = ["ATTENTION_SIGMA", "Validator"]

ATTENTION_SIGMA = 0.5
"""The noise level of the validation attention panels."""


@dataclass
class Validator:
    """Validation sheets of a run (what `mosaic_kit.training.MosaicTrainer.validate` writes).

    Attributes:
        accelerator: the run's ``accelerate.Accelerator``.
        family: the model family.
        model: the module the accelerator wraps (a ``TrainingForward``).
        dataset: ``() -> data set`` of the held-out validation samples (built on first use).
        output_dir: the run folder (sheets go to ``output_dir/samples``).
        samples: validation items per sheet.
        steps: denoising steps of each sample.
        target_size: the target side in pixels.
        ref_size: the reference side in pixels.
        guidance: the guidance embedded in the attention forward (the training guidance).
        ema: the EMA of the trainable parameters, or None.
        trainable_parameters: the parameters the EMA holds.
        fsdp: whether the model is sharded with FSDP2 (every process then runs the forwards).
        sample_guidance: the guidance of the samples (``family.sample``'s ``guidance_scale``);
            None: the family's default.
    """

    accelerator: Any
    family: ModelFamily
    model: Any
    dataset: Callable[[], Any]
    output_dir: Path
    samples: int
    steps: int
    target_size: int
    ref_size: int
    guidance: float
    ema: Any = None
    trainable_parameters: list | None = None
    fsdp: bool = False
    sample_guidance: float | None = None

    def _active(self) -> bool:
        acc = self.accelerator
        if not self.family.has_encoders:  # cached conditioning: no prompt encoder or VAE to sample with
            if self.samples >= 1 and acc.is_main_process and not getattr(self, "_skip_logged", False):
                log.warning("validation sheets skipped: the run reads cached conditioning (data.cache_dir) and never "
                            "loads the text encoders or the VAE they need; sample the saved LoRA with "
                            "recipes/flux_mosaic_infer.py instead")
                self._skip_logged = True
            return False
        if self.samples < 1 or not (acc.is_main_process or self.fsdp):
            acc.wait_for_everyone()  # FSDP: every process runs the forwards (the weights are sharded)
            return False
        return True

    def validate(self, step: int) -> Path | None:
        """Writes ``samples/step-N.png`` (see the module docstring); returns its path on the main
        process."""
        if not self._active():
            return None
        from ..eval.sheets import SheetRow

        acc = self.accelerator
        rows = []
        if self.ema is not None:
            self.ema.store(self.trainable_parameters)
            self.ema.copy_to(self.trainable_parameters)
        was_training = self.model.training
        self.model.eval()
        try:
            for index in self._root_weights_gathered(range(self.samples)):
                sample = self.dataset()[index]
                refs = [tensor_to_pil(r) for r in sample.references]
                image = self.family.sample(sample.caption, refs, self.target_size, self.target_size, self.steps,
                                           generator=torch.Generator().manual_seed(index),
                                           guidance_scale=self.sample_guidance)
                rows.append(SheetRow(sample.caption, refs, [tensor_to_pil(sample.target), image]))
                rows.extend(self.attention_rows(index))
        finally:
            if self.ema is not None:
                self.ema.restore(self.trainable_parameters)
            self.model.train(was_training)
        path = None
        if acc.is_main_process:
            path = validation_sheet(rows, self.output_dir / "samples" / f"step-{step:07d}.png",
                                    title=f"step {step}: references | ground truth | sample")
        acc.wait_for_everyone()
        return path

    def _root_weights_gathered(self, items):
        """Yields ``items`` with, under FSDP, the root unit's own weights (norms) gathered on every
        process, so that the pipeline can call the transformer's submodules (each linear layer
        gathers its own weights); resharded at the end."""
        if not self.fsdp:
            yield from items
            return
        root = self.accelerator.unwrap_model(self.model)
        root.unshard()
        try:
            yield from items
        finally:
            root.reshard()

    @torch.no_grad()
    def attention_rows(self, index: int) -> list:
        """The captured attention of validation item ``index`` (paper Fig. 6): one `SheetRow` whose
        outputs are, per reference with annotated points, the mean attention of those points over
        the target tokens (red on the dimmed ground truth; `mosaic_kit.reporting.attention_panels`)
        and the true target region (green), at noise level `ATTENTION_SIGMA` with seeded noise.
        Uses no training generator, so it never changes the run."""
        from ..data import collate_samples
        from ..eval.sheets import SheetRow

        device = self.accelerator.device
        sample = self.dataset()[index]
        batch = collate_samples([sample], target_size=self.target_size, ref_size=self.ref_size,
                                vae_scale_factor=self.family.vae_scale_factor)
        if not bool(batch.corr.point_mask.any()):
            return []
        inputs = self.family.encode_batch(batch)
        latents = inputs.target
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(index)).to(device)
        sigma = torch.full((1,), ATTENTION_SIGMA, device=device)
        point_rows = PointAttentionRows(batch.corr.to(device))
        guidance = torch.full((1,), self.guidance, device=device)
        model_inputs = self.family.model_kwargs(inputs, self.family.noise(latents, noise, sigma), sigma, guidance=guidance)
        with self.accelerator.autocast():
            self.accelerator.unwrap_model(self.model)(model_inputs, None, [point_rows])
        panels = attention_panels(point_rows.result(), batch.corr, batch.target_grid, batch.targets[0])
        return [SheetRow(f"attention of each reference's points (red) | true target region (green), "
                         f"sigma {ATTENTION_SIGMA}", [], [image for pair in panels for image in pair])]

    def attention_sheet(self, step: int) -> Path | None:
        """Writes ``samples/attention-step-N.png``: the attention rows of every validation item
        alone (no sampling; the trainer writes it before the first step, to compare with the last
        sheet)."""
        if not self._active():
            return None
        acc = self.accelerator
        was_training = self.model.training
        self.model.eval()
        try:
            rows = [row for index in range(self.samples) for row in self.attention_rows(index)]
        finally:
            self.model.train(was_training)
        path = None
        if rows and acc.is_main_process:
            path = validation_sheet(rows, self.output_dir / "samples" / f"attention-step-{step:07d}.png",
                                    title=f"step {step}: where each reference's points attend")
        acc.wait_for_everyone()
        return path
