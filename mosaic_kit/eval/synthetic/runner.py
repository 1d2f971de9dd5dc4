"""The model runner of the synthetic-world evaluation: teacher-forced attention and denoising
scores and free generation on held-out subjects, for K = 1…6.

It sees the model only through the model boundary (`mosaic_kit.models.ModelFamily`): the family
encodes a batch, runs the forward with a capture and decodes; generation goes through the
family's inference pipeline. The scores themselves are in `.scores`, the tables and figures in
`.report`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch

from ...attention import PointAttentionRows
from ...utils.checks import check_int, check_real, check_shape
from ..localisation import attention_hit_rate
from .scores import (
    DEFAULT_TEMPLATE_SCALES,
    attention_log_probability,
    attention_overlap,
    masked_mse,
    reference_attention_maps,
    subject_attention_mass,
    subject_fidelity,
    target_token_masks,
)

if TYPE_CHECKING:
    from ...data import MosaicBatch, MultiSubjectSample
    from ...models import ModelFamily, ModelInputs
    from ...pipelines import MosaicFluxPipeline

__all__ = [
    "SyntheticEvalConfig",
    "SyntheticEvalResult",
    "evaluate_denoising",
    "evaluate_generation",
    "evaluate_synthetic",
    "fidelity_baselines",
    "held_out_world",
]

# ----------------------------------------------------------------------------- evaluation driver
@dataclass(frozen=True)
class SyntheticEvalConfig:
    """What `evaluate_synthetic` measures, on which held-out samples.

    Args:
        num_refs: the K values evaluated. Defaults to 1…6.
        attention_samples: held-out samples per K for the attention and denoising scores.
        sigmas: noise levels of the teacher-forced scores, in (0, 1).
        generation_samples: held-out samples per K generated with the pipeline (0: none).
        inference_steps: denoising steps per generated image.
        guidance_scale: guidance embedded for text and target when generating (training uses 1).
        target_size: target side in pixels (multiple of 16).
        ref_size: reference side in pixels (multiple of 16).
        world_seed: seed of the held-out world (held-out identities).
        noise_seed: seed of the evaluation noise and of the generation noise.
        scales: see `locate_subject`.
        palette_sigma: see `palette_affinity`.
        max_sequence_length: T5 tokens of the prompts when generating (the teacher-forced scores
            encode with the family's own setting, e.g. the trainer's).
        batch_size: samples per model call of the teacher-forced scores.

    Example:
        >>> SyntheticEvalConfig(num_refs=(1, 2), attention_samples=2).num_refs
        (1, 2)
        >>> SyntheticEvalConfig(sigmas=(1.5,))
        Traceback (most recent call last):
        ...
        ValueError: Expected `sigmas[0]` in [0.0, 1.0), but got 1.5.
    """

    num_refs: tuple[int, ...] = (1, 2, 3, 4, 5, 6)
    attention_samples: int = 16
    sigmas: tuple[float, ...] = (0.25, 0.5, 0.75)
    generation_samples: int = 4
    inference_steps: int = 16
    guidance_scale: float = 1.0
    target_size: int = 64
    ref_size: int = 32
    world_seed: int = 1000
    noise_seed: int = 0
    scales: tuple[float, ...] = DEFAULT_TEMPLATE_SCALES
    palette_sigma: float = 0.12
    max_sequence_length: int = 32
    batch_size: int = 8

    def __post_init__(self) -> None:
        def put(name: str, value: object) -> None:
            object.__setattr__(self, name, value)

        for name in ("num_refs", "sigmas", "scales"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
                raise ValueError(f"Expected `{name}` to be a non-empty list, but got {value!r}.")
            put(name, tuple(value))
        put("num_refs", tuple(check_int(f"num_refs[{i}]", k, minimum=1) for i, k in enumerate(self.num_refs)))
        if max(self.num_refs) > 8:
            raise ValueError(f"Expected `num_refs` at most 8 (the pipeline's limit), but got {max(self.num_refs)}.")
        for i, sigma in enumerate(self.sigmas):
            check_real(f"sigmas[{i}]", sigma, 0.0, 1.0, high_inclusive=False)
        for i, scale in enumerate(self.scales):
            if check_real(f"scales[{i}]", scale, 0.0, math.inf) <= 0:
                raise ValueError(f"Expected `scales[{i}]` > 0, but got {scale}.")
        check_int("attention_samples", self.attention_samples, minimum=1)
        check_int("generation_samples", self.generation_samples, minimum=0)
        check_int("inference_steps", self.inference_steps, minimum=1)
        check_int("batch_size", self.batch_size, minimum=1)
        check_int("world_seed", self.world_seed, minimum=0)
        check_int("noise_seed", self.noise_seed, minimum=0)
        check_int("max_sequence_length", self.max_sequence_length, minimum=1)
        for name in ("target_size", "ref_size"):
            value = check_int(name, getattr(self, name), minimum=16)
            if value % 16:
                raise ValueError(f"Expected `{name}` to be a multiple of 16, but got {value}.")
        check_real("guidance_scale", self.guidance_scale, 0.0, math.inf)
        if check_real("palette_sigma", self.palette_sigma, 0.0, math.inf) <= 0:
            raise ValueError(f"Expected `palette_sigma` > 0, but got {self.palette_sigma}.")


def held_out_world(config: SyntheticEvalConfig):
    """The held-out `SyntheticWorld` of an evaluation: `HELD_OUT_IDENTITIES`, ``world_seed``,
    the config's sizes, up to ``max(num_refs)`` subjects.

    Example:
        >>> world = held_out_world(SyntheticEvalConfig(num_refs=(1, 5)))
        >>> world.config.max_refs, world.config.identity_range[0] >= 1_000_000
        (5, True)
    """
    from ...data import HELD_OUT_IDENTITIES, SyntheticWorld, SyntheticWorldConfig

    if not isinstance(config, SyntheticEvalConfig):
        raise ValueError(f"Expected `config` to be a SyntheticEvalConfig, but got {type(config).__name__}.")
    return SyntheticWorld(SyntheticWorldConfig(
        image_size=config.target_size, ref_size=config.ref_size, min_refs=1, max_refs=max(config.num_refs),
        identity_range=HELD_OUT_IDENTITIES, seed=config.world_seed,
    ))


@torch.no_grad()
def evaluate_denoising(
    family: ModelFamily,
    batch: MosaicBatch,
    sigma: float,
    noise: torch.Tensor,
    guidance: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Teacher-forced scores of one batch at one noise level: a model call with the true target
    noised to ``σ`` (``x_σ = (1 - σ)·x + σ·ε``, as in training), capturing the annotated points'
    attention rows, and a second call in which sample b gets the references of sample b - 1 of
    the batch (other subjects; same caption, noise and target).

    The one-step estimate is ``x̂0 = x_σ - σ·v̂``. With ``e_right`` and ``e_wrong`` the
    `masked_mse` of ``x̂0`` inside the subjects' visible regions (mean over subjects) with the
    right and the other sample's references, ``ref_gain = (e_wrong - e_right) / e_wrong``: the
    share of the subject-region error that the right references remove (0 when the model ignores
    its references).

    Args:
        family: the model scored, behind the model boundary (`mosaic_kit.models.ModelFamily`, e.g.
            ``pipe.family`` of a `MosaicFluxPipeline`): it encodes the batch, runs the forward
            with the capture and decodes the estimate.
        batch: a `MosaicBatch` (`collate_samples`) with target masks.
        sigma: the noise level in (0, 1).
        noise: ``(B, N_tgt, C)`` the noise ε, same shape as the packed target.
        guidance: guidance embedded for text and target (training uses 1).

    Returns:
        Per sample (``(B,)`` float32 unless noted): ``hit_rate``, ``log_prob``, ``overlap``,
        ``own_mass``, ``other_mass``, ``denoise_mse`` (``e_right``), ``ref_gain`` (NaN when
        B = 1), and ``maps`` ``(B, K, N_tgt)``, ``valid`` ``(B, K)``, ``estimate``
        ``(B, 3, H, W)`` (the one-step ``x̂0`` with the right references, as an image).

    Example:
        >>> from mosaic_kit.data import collate_samples
        >>> from mosaic_kit.pipelines import MosaicFluxPipeline
        >>> from mosaic_kit.pipelines.tiny import tiny_flux_components
        >>> pipe = MosaicFluxPipeline(**tiny_flux_components(pixel_space=2))
        >>> pipe.family.add_lora(rank=2)
        >>> world = held_out_world(SyntheticEvalConfig(num_refs=(2,)))
        >>> batch = collate_samples([world.sample(i, num_refs=2) for i in range(2)], 64, 32, vae_scale_factor=2)
        >>> noise = torch.randn(2, 256, 48, generator=torch.Generator().manual_seed(0))
        >>> scores = evaluate_denoising(pipe.family, batch, 0.5, noise)
        >>> hits = scores["hit_rate"]
        >>> scores["maps"].shape, bool(((hits >= 0) & (hits <= 1)).all()), scores["ref_gain"].shape
        (torch.Size([2, 2, 256]), True, torch.Size([2]))
    """
    sigma = check_real("sigma", sigma, 0.0, 1.0, high_inclusive=False)
    height, width = batch.targets.shape[-2:]
    bsz = batch.batch_size
    inputs = family.encode_batch(batch)
    latents = inputs.target.float()
    check_shape("noise", noise, list(latents.shape), "(B, N_tgt, C)")
    sigmas = torch.full((bsz,), sigma, device=latents.device, dtype=latents.dtype)
    noisy = family.noise(latents, noise.to(latents.device, latents.dtype), sigmas)

    def estimate_of(inputs: ModelInputs, capture: list | None) -> torch.Tensor:
        velocity = family.forward(inputs, noisy, sigmas, capture=capture, guidance=float(guidance)).float()
        return family.decode(noisy - sigma * velocity, height, width).cpu()

    corr = batch.corr.to(latents.device)
    rows = PointAttentionRows(corr)
    estimate = estimate_of(inputs, [rows])
    attention = rows.result()
    hits = attention_hit_rate(attention, corr, batch.target_grid, radius=1, reduction="none").float()
    logp = attention_log_probability(attention, corr, reduction="none")
    points = corr.point_mask.float()
    count = points.sum((1, 2))

    def per_sample(values: torch.Tensor) -> torch.Tensor:
        return torch.where(count > 0, (values * points).sum((1, 2)) / count.clamp_min(1), torch.full_like(count, float("nan")))

    maps, valid = reference_attention_maps(attention, corr)
    token_masks = target_token_masks(batch.target_masks.to(latents.device), batch.target_grid)
    mass = subject_attention_mass(maps, valid, token_masks)
    wrong = None
    if bsz > 1:
        swapped = replace(batch, references=batch.references.roll(1, 0))
        wrong = estimate_of(family.encode_batch(swapped), None)
    right_mse, gains = [], []
    for b in range(bsz):
        regions = batch.target_masks[b][batch.target_mask_present[b] & batch.target_masks[b].any((1, 2))]
        if not len(regions):
            right_mse.append(float("nan"))
            gains.append(float("nan"))
            continue
        error = float(masked_mse(estimate[b], batch.targets[b], regions).nanmean())
        right_mse.append(error)
        if wrong is None:
            gains.append(float("nan"))
        else:
            error_wrong = float(masked_mse(wrong[b], batch.targets[b], regions).nanmean())
            gains.append((error_wrong - error) / error_wrong if error_wrong > 0 else float("nan"))
    return {
        "hit_rate": per_sample(hits).cpu(),
        "log_prob": per_sample(logp).cpu(),
        "overlap": attention_overlap(maps, valid).cpu(),
        "own_mass": mass.own.nanmean(1).cpu(),
        "other_mass": mass.other.nanmean(1).cpu(),
        "denoise_mse": torch.tensor(right_mse),
        "ref_gain": torch.tensor(gains),
        "maps": maps.cpu(),
        "valid": valid.cpu(),
        "estimate": estimate,
    }


def _palettes(sample) -> torch.Tensor:
    from ...data import subject_descriptor

    return torch.stack([subject_descriptor(identity).palette for identity in sample.meta["identities"]])


def _fidelity_record(image: torch.Tensor, sample, config: SyntheticEvalConfig) -> dict[str, float]:
    scores = subject_fidelity(image, sample.references, sample.reference_masks, _palettes(sample), config.scales,
                              config.palette_sigma)
    leakage = scores.leakage.nanmean() if sample.num_refs > 1 else torch.tensor(float("nan"))
    return {"sample_ncc": float(scores.ncc.mean()), "sample_colour": float(scores.colour.mean()),
            "sample_leakage": float(leakage)}


@torch.no_grad()
def evaluate_generation(
    pipe: MosaicFluxPipeline, sample: MultiSubjectSample, config: SyntheticEvalConfig, seed: int
) -> tuple[dict[str, float], torch.Tensor]:
    """Generates one image from a held-out sample's caption and references with the pipeline and
    scores it with `subject_fidelity`.

    Args:
        pipe: the `MosaicFluxPipeline`.
        sample: a `MultiSubjectSample` of the synthetic world (its ``meta`` names the identities).
        config: sizes, steps, guidance and the fidelity settings.
        seed: seed of the initial noise.

    Returns:
        ``(scores, image)``: ``sample_ncc``, ``sample_colour``, ``sample_leakage`` (means over the
        subjects; leakage NaN for K = 1) and the ``(3, H, W)`` image in [0, 1].

    Example:
        >>> from mosaic_kit.pipelines import MosaicFluxPipeline
        >>> from mosaic_kit.pipelines.tiny import tiny_flux_components
        >>> from mosaic_kit.models import add_reference_lora
        >>> pipe = MosaicFluxPipeline(**tiny_flux_components(pixel_space=2))
        >>> add_reference_lora(pipe.transformer, rank=2)
        >>> config = SyntheticEvalConfig(num_refs=(2,), inference_steps=2)
        >>> scores, image = evaluate_generation(pipe, held_out_world(config).sample(0, num_refs=2), config, seed=0)
        >>> sorted(scores), image.shape
        (['sample_colour', 'sample_leakage', 'sample_ncc'], torch.Size([3, 64, 64]))
    """
    if not isinstance(config, SyntheticEvalConfig):
        raise ValueError(f"Expected `config` to be a SyntheticEvalConfig, but got {type(config).__name__}.")
    out = pipe(
        sample.caption, list(sample.references), height=config.target_size, width=config.target_size,
        ref_size=config.ref_size, num_inference_steps=config.inference_steps, guidance_scale=config.guidance_scale,
        generator=torch.Generator().manual_seed(check_int("seed", seed, minimum=0)), output_type="pt",
        max_sequence_length=config.max_sequence_length, progress=False,
    )
    image = out.images[0].float().cpu().clamp(0, 1)
    return _fidelity_record(image, sample, config), image


def fidelity_baselines(config: SyntheticEvalConfig) -> list[dict]:
    """Sample-fidelity scores that calibrate the generated ones, per K: the **ground truth**
    (the true target scored against its own references: what a perfect generator reaches) and
    **chance** (the target of another held-out sample with the same K, i.e. other subjects,
    scored against these references).

    Args:
        config: the evaluation config (its ``generation_samples`` samples per K are used, at
            least one).

    Returns:
        Records ``{"kind": "ground_truth" | "chance", "num_refs": K, "index": i, <scores>}``.

    Example:
        >>> truth, chance = fidelity_baselines(SyntheticEvalConfig(num_refs=(2,), generation_samples=1))
        >>> truth["kind"], chance["kind"], truth["sample_ncc"] > chance["sample_ncc"]
        ('ground_truth', 'chance', True)
    """
    world = held_out_world(config)
    count = max(1, config.generation_samples)
    records = []
    for k in config.num_refs:
        for i in range(count):
            sample = world.sample(i, num_refs=k)
            other = world.sample(i + count, num_refs=k)
            for kind, image in (("ground_truth", sample.target), ("chance", other.target)):
                records.append({"kind": kind, "num_refs": k, "index": i, **_fidelity_record(image, sample, config)})
    return records


@dataclass
class SyntheticEvalResult:
    """Output of `evaluate_synthetic`.

    Attributes:
        records: one dict per (K, sample, noise level) with ``kind = "denoise"`` (``sigma`` and
            the teacher-forced scores) and per (K, sample) with ``kind = "generation"``.
        figure: the attention maps of the figure sample: ``{"num_refs", "index", "sigma",
            "maps" (K, rows, cols), "valid" (K,), "target" (3, H, W), "references" (K, 3, h, w),
            "token_masks" (K, rows, cols)}``, or None.
        images: generated images per K, ``{K: (n, 3, H, W)}``.
    """

    records: list[dict] = field(default_factory=list)
    figure: dict | None = None
    images: dict[int, torch.Tensor] = field(default_factory=dict)


def evaluate_synthetic(
    family: ModelFamily,
    config: SyntheticEvalConfig,
    figure_sample: tuple[int, int] | None = (3, 0),
    figure_sigma: float | None = None,
    progress: Callable[[str], None] | None = None,
    pipeline: MosaicFluxPipeline | None = None,
) -> SyntheticEvalResult:
    """Scores a trained model on held-out subjects for every K of ``config.num_refs``.

    For each K: ``attention_samples`` held-out samples (indices 0, 1, …, shared by every model
    evaluated with the same config), scored by `evaluate_denoising` at every ``sigma`` with noise
    drawn from ``(noise_seed, K, sigma)``; then the first ``generation_samples`` of them generated
    with the pipeline (noise seed ``noise_seed · 1000 + 10 · K + i``) and scored by
    `evaluate_generation`.

    Args:
        family: the trained model behind the model boundary (`mosaic_kit.models.ModelFamily`;
            the trainer's ``trainer.family``, or ``pipe.family`` of a `MosaicFluxPipeline`).
        config: the `SyntheticEvalConfig`.
        figure_sample: ``(K, index)`` of the sample whose attention maps are kept for figures
            (K must be in ``num_refs`` and index below ``attention_samples``), or None.
        figure_sigma: the noise level of the figure maps; default the middle of ``sigmas``.
        progress: optional callback receiving one line per K.
        pipeline: the inference pipeline that generates the samples (called like a
            `MosaicFluxPipeline`); default the family's own, ``family.pipe``. Needed only when
            ``config.generation_samples > 0``.

    Returns:
        `SyntheticEvalResult`.

    Example:
        >>> from mosaic_kit.pipelines import MosaicFluxPipeline
        >>> from mosaic_kit.pipelines.tiny import tiny_flux_components
        >>> pipe = MosaicFluxPipeline(**tiny_flux_components(pixel_space=2))
        >>> pipe.family.add_lora(rank=2)
        >>> config = SyntheticEvalConfig(num_refs=(1, 2), attention_samples=1, sigmas=(0.5,), generation_samples=1,
        ...                              inference_steps=1)
        >>> result = evaluate_synthetic(pipe.family, config, figure_sample=(2, 0))
        >>> sorted({r["kind"] for r in result.records}), result.figure["maps"].shape
        (['denoise', 'generation'], torch.Size([2, 16, 16]))
    """
    from ...data import collate_samples

    if not isinstance(config, SyntheticEvalConfig):
        raise ValueError(f"Expected `config` to be a SyntheticEvalConfig, but got {type(config).__name__}.")
    if figure_sample is not None:
        k_fig, i_fig = figure_sample
        if k_fig not in config.num_refs or not 0 <= i_fig < config.attention_samples:
            raise ValueError(f"Expected `figure_sample` (K in {list(config.num_refs)}, index < "
                             f"{config.attention_samples}), but got {figure_sample!r}.")
    sigma_fig = config.sigmas[len(config.sigmas) // 2] if figure_sigma is None else figure_sigma
    if figure_sample is not None and sigma_fig not in config.sigmas:
        raise ValueError(f"Expected `figure_sigma` among {list(config.sigmas)}, but got {figure_sigma!r}.")
    if pipeline is None:
        pipeline = getattr(family, "pipe", None)
    if config.generation_samples and pipeline is None:
        raise ValueError(f"Expected a `pipeline` to generate {config.generation_samples} samples per K (the family "
                         f"{type(family).__name__} has no `pipe`), but got None.")
    world = held_out_world(config)
    model = family.model
    was_training = model.training
    model.eval()
    result = SyntheticEvalResult()
    try:
        for k in config.num_refs:
            samples = [world.sample(i, num_refs=k) for i in range(config.attention_samples)]
            for s_index, sigma in enumerate(config.sigmas):
                generator = torch.Generator().manual_seed(config.noise_seed * 1_000_003 + 1009 * k + s_index)
                for start in range(0, len(samples), config.batch_size):
                    chunk = samples[start : start + config.batch_size]
                    batch = collate_samples(chunk, config.target_size, config.ref_size, vae_scale_factor=family.vae_scale_factor)
                    tokens = batch.target_grid.num_tokens
                    noise = torch.randn(len(chunk), tokens, family.token_channels, generator=generator)
                    scores = evaluate_denoising(family, batch, sigma, noise, config.guidance_scale)
                    for b in range(len(chunk)):
                        index = start + b
                        result.records.append({
                            "kind": "denoise", "num_refs": k, "index": index, "sigma": sigma,
                            **{name: float(scores[name][b]) for name in
                               ("hit_rate", "log_prob", "overlap", "own_mass", "other_mass", "denoise_mse", "ref_gain")},
                        })
                        if figure_sample == (k, index) and sigma == sigma_fig:
                            grid = batch.target_grid
                            masks = target_token_masks(batch.target_masks[b : b + 1], grid)[0]
                            result.figure = {
                                "num_refs": k, "index": index, "sigma": sigma,
                                "maps": scores["maps"][b].reshape(k, grid.rows, grid.cols),
                                "valid": scores["valid"][b], "target": batch.targets[b],
                                "references": batch.references[b], "estimate": scores["estimate"][b],
                                "token_masks": masks.reshape(k, grid.rows, grid.cols),
                            }
            images = []
            for i in range(config.generation_samples):
                scores, image = evaluate_generation(pipeline, samples[i] if i < len(samples) else world.sample(i, num_refs=k),
                                                    config, seed=config.noise_seed * 1000 + 10 * k + i)
                result.records.append({"kind": "generation", "num_refs": k, "index": i, **scores})
                images.append(image)
            if images:
                result.images[k] = torch.stack(images)
            if progress is not None:
                progress(f"K={k}: {len(samples)} samples × {len(config.sigmas)} noise levels, {len(images)} generated")
    finally:
        model.train(was_training)
    return result
