"""Scores for the synthetic multi-subject world: attention, interference, denoising and samples.

The synthetic world (`mosaic_kit.data.SyntheticWorld`) knows everything about a sample: the exact
reference → target token pairs, each subject's visible mask in the target and each subject's two
palette colours. That makes four families of scores possible, all defined on held-out subjects:

- **attention alignment** (per annotated point, from `mosaic_kit.attention.PointAttentionRows`):
  the hit-rate (`mosaic_kit.eval.attention_hit_rate`) and the mean log-probability at the true
  target token, `attention_log_probability`;
- **interference** between references: `reference_attention_maps` (each reference's mean row,
  the quantity MDL works on), `attention_overlap` (Bhattacharyya coefficient or histogram
  intersection between references' maps) and `subject_attention_mass` (how much of a
  reference's map falls on its own subject, and how much on the others);
- **denoising fidelity** (teacher-forced: the true target noised to a level σ, one model call):
  `masked_mse` of the one-step estimate ``x̂0 = x_σ - σ·v̂`` inside each subject's visible
  region, and the *reference gain*: the share of that error which disappears when the model gets
  the sample's own references rather than another sample's (how much it uses the references);
- **sample fidelity** (free generation with the pipeline from held-out references):
  `subject_fidelity` finds each reference's best-matching window (`locate_subject`, masked
  normalised cross-correlation `masked_ncc` over positions and scales), measures its own palette
  there (`palette_affinity`) and the other subjects' palettes (attribute leakage).

`evaluate_synthetic` runs all of them for K = 1…6 on a trained pipeline, `summarise_records`
and `ablation_table` aggregate runs (the recipe ``recipes/synthetic_ablation.py``), and
`plot_metric_against_k` / `plot_attention_maps` draw the figures (matplotlib, imported lazily).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F

from ..attention import PointAttentionRows
from ..correspondence import Correspondences, TokenGrid
from ..correspondence._checks import (
    check_floating,
    check_int,
    check_option,
    check_real,
    check_shape,
)
from .localisation import attention_hit_rate

if TYPE_CHECKING:
    from ..data import MosaicBatch, MultiSubjectSample
    from ..pipelines import MosaicFluxPipeline

__all__ = [
    "DEFAULT_TEMPLATE_SCALES",
    "METRICS",
    "OVERLAP_MEASURES",
    "ReferenceAttentionMaps",
    "SubjectAttentionMass",
    "SubjectFidelity",
    "SubjectMatch",
    "SyntheticEvalConfig",
    "SyntheticEvalResult",
    "ablation_table",
    "attention_log_probability",
    "attention_overlap",
    "evaluate_denoising",
    "evaluate_generation",
    "evaluate_synthetic",
    "fidelity_baselines",
    "held_out_world",
    "locate_subject",
    "masked_mse",
    "masked_ncc",
    "palette_affinity",
    "plot_attention_maps",
    "plot_metric_against_k",
    "reference_attention_maps",
    "subject_attention_mass",
    "subject_fidelity",
    "summarise_records",
    "target_token_masks",
]

OVERLAP_MEASURES = ("bhattacharyya", "intersection")
"""Measures of `attention_overlap`."""

DEFAULT_TEMPLATE_SCALES = (0.6, 0.8, 1.0, 1.4, 2.0)
"""Reference-to-image scales `locate_subject` tries by default: with targets twice the reference
size (the synthetic presets) a subject's frame spans 0.6× to 2× the reference's, from K = 6
(3 × 2 layout) to K = 1."""

METRICS: dict[str, tuple[str, str]] = {
    "hit_rate": ("hit-rate ↑", "attention argmax within one token of the true target token"),
    "log_prob": ("log-prob ↑", "mean log A[G(u), v] at the true target token (uniform: -log N_tgt)"),
    "overlap": ("overlap ↓", "mean pairwise Bhattacharyya coefficient of the references' mean rows"),
    "own_mass": ("own mass ↑", "share of a reference's mean row on its own subject's tokens"),
    "denoise_mse": ("denoise MSE ↓", "MSE of the one-step estimate x̂0 inside the subjects' regions"),
    "ref_gain": ("ref gain ↑", "share of that error removed by the sample's own references (vs another sample's)"),
    "sample_ncc": ("sample NCC ↑", "best masked NCC of each reference over the generated image"),
    "sample_colour": ("sample colour ↑", "own-palette affinity in the subject's best window"),
    "sample_leakage": ("sample leakage ↓", "other subjects' palette affinity in the subject's best window"),
}
"""The metrics of an ablation record: key → (column title with its better direction, meaning)."""


# ----------------------------------------------------------------------------- attention
def _check_rows(attention: object, corr: Correspondences) -> None:
    if not isinstance(corr, Correspondences):
        raise ValueError(f"Expected `corr` to be a Correspondences, but got {type(corr).__name__}.")
    check_shape("attention", attention, [corr.batch_size, corr.num_refs, corr.max_points, corr.tgt_tokens],
                "(B, K, P, N_tgt)")
    check_floating("attention", attention)


def attention_log_probability(
    attention: torch.Tensor, corr: Correspondences, reduction: str = "mean", eps: float = 1e-12
) -> torch.Tensor:
    """Log-probability of each annotated point's attention at its true target token.

    For a real pair ``(u, v)`` of reference k, with ``A`` the attention of eq. 8 (softmax over
    target keys, averaged over blocks and heads), the score is ``log max(A[G(u), v], eps)``; the
    SCAL loss (eq. 10) is its negative mean. A uniform row gives ``-log N_tgt``.

    Args:
        attention: ``(B, K, P, N_tgt)`` one row per point in ``corr``'s layout
            (`mosaic_kit.attention.PointAttentionRows.result()`); rows of padded points are ignored.
        corr: the annotated pairs.
        reduction: ``"mean"`` (a 0-dim float32 tensor over real points, NaN when there are none)
            or ``"none"`` (``(B, K, P)`` float32, 0 at padded points).
        eps: floor of the probability before the log, > 0.

    Returns:
        See ``reduction``.

    Example:
        >>> corr = Correspondences.from_dicts([[{0: 1}]], ref_tokens=[1], tgt_tokens=4)
        >>> rows = torch.tensor([[[[0.1, 0.7, 0.1, 0.1]]]])
        >>> round(attention_log_probability(rows, corr).item(), 4)  # log 0.7
        -0.3567
    """
    _check_rows(attention, corr)
    check_option("reduction", reduction, ("mean", "none"))
    eps = check_real("eps", eps, 0.0, 1.0)
    if eps <= 0:
        raise ValueError(f"Expected `eps` > 0, but got {eps}.")
    corr = corr.to(attention.device)
    index = torch.where(corr.point_mask, corr.tgt_index, torch.zeros_like(corr.tgt_index))
    picked = attention.float().gather(-1, index[..., None])[..., 0]
    logp = torch.where(corr.point_mask, picked.clamp_min(eps).log(), torch.zeros_like(picked))
    if reduction == "none":
        return logp
    total = corr.point_mask.sum()
    return (logp.sum() / total).cpu() if bool(total > 0) else torch.tensor(float("nan"))


class ReferenceAttentionMaps(NamedTuple):
    """Output of `reference_attention_maps`.

    Attributes:
        maps: ``(B, K, N_tgt)`` float32, each valid reference's mean row (sums to 1); zeros for
            references without points.
        valid: ``(B, K)`` bool, True for references with at least one real point.
    """

    maps: torch.Tensor
    valid: torch.Tensor


def reference_attention_maps(attention: torch.Tensor, corr: Correspondences) -> ReferenceAttentionMaps:
    """Each reference's aggregated attention over the target: the mean of its points' rows.

    ``a_k = (1 / P_k) Σ_j A[G(u_j^k), :]``, renormalised to sum to 1 (eq. 11-12: the distribution
    MDL pushes apart).

    Args:
        attention: ``(B, K, P, N_tgt)`` one row per point (padded rows ignored).
        corr: the annotated pairs.

    Returns:
        `ReferenceAttentionMaps` ``(maps, valid)``.

    Example:
        >>> corr = Correspondences.from_dicts([[{0: 0, 1: 1}, {}]], ref_tokens=[2, 2], tgt_tokens=2)
        >>> rows = torch.tensor([[[[1.0, 0.0], [0.5, 0.5]], [[0.0, 0.0], [0.0, 0.0]]]])
        >>> maps, valid = reference_attention_maps(rows, corr)
        >>> maps[0, 0].tolist(), valid.tolist()
        ([0.75, 0.25], [[True, False]])
    """
    _check_rows(attention, corr)
    corr = corr.to(attention.device)
    weights = corr.point_mask.float()[..., None]
    summed = (attention.float() * weights).sum(2)
    total = summed.sum(-1, keepdim=True)
    valid = corr.point_mask.any(-1)
    maps = torch.where(valid[..., None] & (total > 0), summed / total.clamp_min(1e-30), torch.zeros_like(summed))
    return ReferenceAttentionMaps(maps, valid & (total[..., 0] > 0))


def _check_maps(maps: object, valid: object) -> None:
    check_shape("maps", maps, [None, None, None], "(B, K, N_tgt)")
    check_floating("maps", maps)
    check_shape("valid", valid, list(maps.shape[:2]), "(B, K)")
    if valid.dtype != torch.bool:
        raise ValueError(f"Expected `valid` to be bool, but got {valid.dtype}.")


def attention_overlap(maps: torch.Tensor, valid: torch.Tensor, measure: str = "bhattacharyya") -> torch.Tensor:
    """Interference between references: mean overlap of their attention distributions.

    For every unordered pair ``i < j`` of valid references of a sample,

    - ``"bhattacharyya"``: ``BC(a_i, a_j) = Σ_t sqrt(a_i(t) · a_j(t))``,
    - ``"intersection"``: ``Σ_t min(a_i(t), a_j(t))``,

    both 1 for identical distributions and 0 for disjoint supports; the sample's score is the mean
    over its pairs.

    Args:
        maps: ``(B, K, N_tgt)`` distributions (`reference_attention_maps`).
        valid: ``(B, K)`` bool, the references that take part.
        measure: one of `OVERLAP_MEASURES`.

    Returns:
        ``(B,)`` float32, NaN for samples with fewer than two valid references.

    Example:
        >>> maps = torch.tensor([[[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]])
        >>> attention_overlap(maps, torch.tensor([[True, True, True]]))  # pairs: 1, 0, 0
        tensor([0.3333])
    """
    _check_maps(maps, valid)
    check_option("measure", measure, OVERLAP_MEASURES)
    a = maps.float().clamp_min(0)
    if measure == "bhattacharyya":
        pair = torch.einsum("bit,bjt->bij", a.sqrt(), a.sqrt())
    else:
        pair = torch.minimum(a[:, :, None], a[:, None]).sum(-1)
    refs = maps.shape[1]
    upper = torch.triu(torch.ones(refs, refs, dtype=torch.bool, device=maps.device), diagonal=1)
    use = upper & valid[:, :, None] & valid[:, None, :]
    count = use.sum((1, 2))
    total = torch.where(use, pair, torch.zeros_like(pair)).sum((1, 2))
    return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, float("nan")))


def target_token_masks(masks: torch.Tensor, tgt_grid: TokenGrid | tuple[int, int]) -> torch.Tensor:
    """Pixel masks → token masks: a token belongs to a subject when at least half its pixels do.

    Args:
        masks: ``(B, K, H, W)`` bool pixel masks (e.g. ``MosaicBatch.target_masks``).
        tgt_grid: the target's `TokenGrid` or ``(rows, cols)``; ``H`` and ``W`` must be multiples.

    Returns:
        ``(B, K, rows · cols)`` bool, row-major tokens.

    Example:
        >>> masks = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
        >>> masks[0, 0, :2, :2] = True
        >>> target_token_masks(masks, (2, 2)).tolist()
        [[[True, False, False, False]]]
    """
    check_shape("masks", masks, [None, None, None, None], "(B, K, H, W)")
    rows, cols = (tgt_grid.rows, tgt_grid.cols) if isinstance(tgt_grid, TokenGrid) else tgt_grid
    height, width = masks.shape[-2:]
    if height % rows or width % cols:
        raise ValueError(f"Expected `masks` sides to be multiples of the grid {rows} × {cols}, but got {height} × {width}.")
    b, k = masks.shape[:2]
    pooled = F.avg_pool2d(masks.float().reshape(b * k, 1, height, width), (height // rows, width // cols))
    return (pooled >= 0.5).reshape(b, k, rows * cols)


class SubjectAttentionMass(NamedTuple):
    """Output of `subject_attention_mass`: ``own`` and ``other``, each ``(B, K)`` float32 (NaN for
    invalid references)."""

    own: torch.Tensor
    other: torch.Tensor


def subject_attention_mass(maps: torch.Tensor, valid: torch.Tensor, token_masks: torch.Tensor) -> SubjectAttentionMass:
    """Where each reference's aggregated attention goes: its own subject, or the other subjects.

    ``own_k = Σ_t a_k(t) m_k(t)`` and ``other_k = Σ_t a_k(t) [t ∈ ∪_{j≠k} m_j] [t ∉ m_k]`` with
    ``m_k`` the token mask of subject k in the target; the rest of the mass is on background.

    Args:
        maps: ``(B, K, N_tgt)`` distributions (`reference_attention_maps`).
        valid: ``(B, K)`` bool.
        token_masks: ``(B, K, N_tgt)`` bool (`target_token_masks`).

    Returns:
        `SubjectAttentionMass`.

    Example:
        >>> maps = torch.tensor([[[0.6, 0.3, 0.1], [0.0, 0.5, 0.5]]])
        >>> masks = torch.tensor([[[True, False, False], [False, True, False]]])
        >>> own, other = subject_attention_mass(maps, torch.tensor([[True, True]]), masks)
        >>> own.tolist(), other.tolist()
        ([[0.6000000238418579, 0.5]], [[0.30000001192092896, 0.0]])
    """
    _check_maps(maps, valid)
    check_shape("token_masks", token_masks, list(maps.shape), "(B, K, N_tgt)")
    masks = token_masks.to(maps.device).bool()
    a = maps.float()
    others = torch.zeros_like(masks)
    for k in range(masks.shape[1]):
        others[:, k] = torch.cat((masks[:, :k], masks[:, k + 1 :]), 1).any(1) & ~masks[:, k]
    own = (a * masks).sum(-1)
    other = (a * others).sum(-1)
    nan = torch.full_like(own, float("nan"))
    return SubjectAttentionMass(torch.where(valid, own, nan), torch.where(valid, other, nan))


# ----------------------------------------------------------------------------- image scores
def _check_image(name: str, image: object, channels: int | None = 3) -> None:
    check_shape(name, image, [channels, None, None], "(3, H, W)" if channels == 3 else "(C, H, W)")
    check_floating(name, image)


def masked_mse(image: torch.Tensor, target: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Mean squared error between two images inside each mask.

    Args:
        image: ``(3, H, W)`` float, e.g. a one-step estimate ``x̂0`` in ``[0, 1]``.
        target: ``(3, H, W)`` float, the true image.
        masks: ``(K, H, W)`` bool regions.

    Returns:
        ``(K,)`` float32: ``mean over mask pixels and channels of (image - target)²``, NaN for an
        empty mask.

    Example:
        >>> masks = torch.tensor([[[True, False]], [[False, False]]])
        >>> masked_mse(torch.ones(3, 1, 2), torch.zeros(3, 1, 2), masks)
        tensor([1., nan])
    """
    _check_image("image", image)
    check_shape("target", target, list(image.shape), "(3, H, W)")
    check_shape("masks", masks, [None, *image.shape[1:]], "(K, H, W)")
    error = (image.float() - target.float()).square().mean(0)
    m = masks.to(error.device).float()
    count = m.sum((1, 2))
    total = (error * m).sum((1, 2))
    return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, float("nan")))


def masked_ncc(image: torch.Tensor, template: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked normalised cross-correlation of a template at every position where it fits.

    At the window whose top-left corner is ``(y, x)``, with ``M`` the template's mask (``n``
    pixels), ``T`` the template and ``I`` the image window, each channel centred on its mean over
    ``M``:

    $$
    \\text{NCC}(y, x) = \\frac{\\sum_c \\sum_{p \\in M} (T_c(p) - \\bar T_c)(I_c(p) - \\bar I_c)}
    {\\sqrt{\\sum_c \\sum_{p \\in M} (T_c(p) - \\bar T_c)^2 \\; \\sum_c \\sum_{p \\in M} (I_c(p) - \\bar I_c)^2}}
    $$

    in ``[-1, 1]``; 0 where the window is flat (no variation inside ``M``). Computed with three
    float32 convolutions on the image centred on its mean (NCC ignores a constant offset).

    Args:
        image: ``(C, H, W)`` float.
        template: ``(C, h, w)`` float with ``h <= H``, ``w <= W``.
        mask: ``(h, w)`` bool; the template must vary inside it.

    Returns:
        ``(H - h + 1, W - w + 1)`` float32.

    Example:
        >>> template = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(0))
        >>> image = torch.zeros(3, 8, 8); image[:, 2:6, 3:7] = template * 0.5 + 0.2  # brightness-invariant
        >>> scores = masked_ncc(image, template, torch.ones(4, 4, dtype=torch.bool))
        >>> scores.shape, divmod(int(scores.argmax()), scores.shape[1]), round(scores.max().item(), 4)
        (torch.Size([5, 5]), (2, 3), 1.0)
    """
    check_shape("image", image, [None, None, None], "(C, H, W)")
    check_floating("image", image)
    channels, height, width = image.shape
    check_shape("template", template, [channels, None, None], f"({channels}, h, w)")
    check_floating("template", template)
    h, w = template.shape[1:]
    check_shape("mask", mask, [h, w], "(h, w)")
    if h > height or w > width:
        raise ValueError(f"Expected `template` no larger than `image` ({height} × {width}), but got {h} × {w}.")
    m = mask.to(image.device).float()
    n = float(m.sum())
    if n < 1:
        raise ValueError("Expected `mask` to hold at least one pixel, but got none.")
    t = template.to(image.device).float()
    centred = (t - (t * m).sum((1, 2), keepdim=True) / n) * m
    template_energy = float(centred.square().sum())
    if template_energy <= 1e-10:
        raise ValueError("Expected `template` to vary inside `mask`, but it is flat there.")
    x = image.float()
    x = (x - x.mean((1, 2), keepdim=True))[None]
    numerator = F.conv2d(x, centred[None])[0, 0]
    squares = F.conv2d(x.square(), m[None, None].expand(1, channels, h, w).contiguous())[0, 0]
    # Σ_c Σ_M (I - Ī_c)² needs per-channel sums
    per_channel = F.conv2d(x.transpose(0, 1), m[None, None])[:, 0]  # (C, H', W')
    window_energy = (squares - per_channel.square().sum(0) / n).clamp_min(0)
    flat = window_energy <= 1e-6 * n
    ncc = numerator / (template_energy * window_energy).sqrt().clamp_min(1e-20)
    return torch.where(flat, torch.zeros_like(ncc), ncc.clamp(-1.0, 1.0)).float()


def palette_affinity(image: torch.Tensor, palette: torch.Tensor, sigma: float = 0.12) -> torch.Tensor:
    """How close every pixel is to a subject's palette: ``exp(-d² / (2σ²))`` with ``d`` the RGB
    distance from the pixel to the segment between the palette's two colours.

    Subjects mix their two colours through a smooth texture, so intermediate colours belong to
    the palette too; the segment covers them.

    Args:
        image: ``(3, H, W)`` float in ``[0, 1]``.
        palette: ``(2, 3)`` float, the two colours (`SubjectDescriptor.palette`); equal colours
            give a point.
        sigma: width of the affinity in RGB units, > 0. Defaults to 0.12.

    Returns:
        ``(H, W)`` float32 in ``[0, 1]`` (1 on the segment).

    Example:
        >>> palette = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])  # red and white
        >>> image = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.5, 0.0], [0.0, 0.5, 1.0]])[:, :, None]  # (3, 3, 1)
        >>> palette_affinity(image, palette)[:, 0].round(decimals=3)  # red, pink (a mix of the two), blue
        tensor([1., 1., 0.])
    """
    _check_image("image", image)
    check_shape("palette", palette, [2, 3], "(2, 3)")
    sigma = check_real("sigma", sigma, 0.0, math.inf)
    if sigma <= 0:
        raise ValueError(f"Expected `sigma` > 0, but got {sigma}.")
    pixels = image.float().flatten(1).T  # (N, 3)
    start, end = palette.float().to(image.device)
    direction = end - start
    length = direction.square().sum()
    if float(length) > 0:
        along = ((pixels - start) @ direction / length).clamp(0, 1)
        nearest = start + along[:, None] * direction
    else:
        nearest = start.expand_as(pixels)
    distance = (pixels - nearest).square().sum(-1)
    return torch.exp(-distance / (2 * sigma**2)).reshape(image.shape[1:])


@dataclass(frozen=True)
class SubjectMatch:
    """Where a reference's subject best matches an image (`locate_subject`).

    Attributes:
        score: the best masked NCC in ``[-1, 1]``.
        scale: the reference-to-image scale of the best match.
        top: row of the window's top-left corner.
        left: column of the window's top-left corner.
        window: ``(H, W)`` bool, the template's subject mask placed at the match.
    """

    score: float
    scale: float
    top: int
    left: int
    window: torch.Tensor


def _template(reference: torch.Tensor, mask: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    h, w = reference.shape[1:]
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    image = F.interpolate(reference[None].float(), size=size, mode="bilinear", align_corners=False,
                          antialias=scale < 1)[0]
    scaled = F.interpolate(mask[None, None].float(), size=size, mode="bilinear", align_corners=False)[0, 0] >= 0.5
    if not scaled.any():
        return None
    rows, cols = scaled.any(1).nonzero()[:, 0], scaled.any(0).nonzero()[:, 0]
    box = (slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1))
    return image[:, box[0], box[1]], scaled[box[0], box[1]]


def locate_subject(
    image: torch.Tensor,
    reference: torch.Tensor,
    reference_mask: torch.Tensor,
    scales: Sequence[float] = DEFAULT_TEMPLATE_SCALES,
) -> SubjectMatch:
    """The best-matching window of a reference's subject in an image: `masked_ncc` of the
    subject (the reference cropped to its mask's bounding box) at each scale, best over
    positions and scales. Rotation is not searched (targets rotate subjects by up to 30°), so a
    perfect copy scores below 1 when rotated; compare against the ground-truth target's score.

    Args:
        image: ``(3, H, W)`` float.
        reference: ``(3, h, w)`` float.
        reference_mask: ``(h, w)`` bool, the subject in the reference.
        scales: reference-to-image scales (> 0); scales whose template does not fit are skipped.

    Returns:
        The `SubjectMatch`.

    Example:
        >>> from mosaic_kit.data import SyntheticWorld
        >>> world = SyntheticWorld()
        >>> sample, other = world.sample(0, num_refs=2), world.sample(1, num_refs=2)
        >>> match = locate_subject(sample.target, sample.references[0], sample.reference_masks[0])
        >>> elsewhere = locate_subject(other.target, sample.references[0], sample.reference_masks[0])
        >>> match.score > elsewhere.score, match.window.shape, match.window.sum() > 100
        (True, torch.Size([64, 64]), tensor(True))
    """
    _check_image("image", image)
    _check_image("reference", reference)
    check_shape("reference_mask", reference_mask, list(reference.shape[1:]), "(h, w)")
    if isinstance(scales, (str, bytes)) or not isinstance(scales, Sequence) or not scales:
        raise ValueError(f"Expected `scales` to be a non-empty list of positive numbers, but got {scales!r}.")
    height, width = image.shape[1:]
    best: SubjectMatch | None = None
    for i, scale in enumerate(scales):
        scale = check_real(f"scales[{i}]", scale, 0.0, math.inf)
        if scale <= 0:
            raise ValueError(f"Expected `scales[{i}]` > 0, but got {scale}.")
        made = _template(reference, reference_mask.bool(), scale)
        if made is None:
            continue
        template, mask = made
        if template.shape[1] > height or template.shape[2] > width:
            continue
        scores = masked_ncc(image, template.to(image.device), mask)
        flat_index = int(scores.argmax())
        top, left = divmod(flat_index, scores.shape[1])
        score = float(scores.flatten()[flat_index])
        if best is None or score > best.score:
            window = torch.zeros(height, width, dtype=torch.bool)
            window[top : top + mask.shape[0], left : left + mask.shape[1]] = mask.cpu()
            best = SubjectMatch(score, scale, top, left, window)
    if best is None:
        raise ValueError(f"Expected a scale in `scales` at which the subject fits the {height} × {width} image, "
                         f"but got {list(scales)}.")
    return best


@dataclass(frozen=True)
class SubjectFidelity:
    """Per-subject sample scores (`subject_fidelity`).

    Attributes:
        ncc: ``(K,)`` best masked NCC of each reference over the image.
        colour: ``(K,)`` mean own-palette affinity inside the subject's best window.
        leakage: ``(K,)`` mean over the other subjects j of their exclusive palette affinity
            ``a_j (1 - a_i)`` inside subject i's best window; NaN when K = 1.
        windows: ``(K, H, W)`` bool best windows.
    """

    ncc: torch.Tensor
    colour: torch.Tensor
    leakage: torch.Tensor
    windows: torch.Tensor


def subject_fidelity(
    image: torch.Tensor,
    references: Sequence[torch.Tensor],
    reference_masks: Sequence[torch.Tensor],
    palettes: torch.Tensor,
    scales: Sequence[float] = DEFAULT_TEMPLATE_SCALES,
    sigma: float = 0.12,
) -> SubjectFidelity:
    """How well each referenced subject appears in an image, and whether others' attributes leak in.

    For subject i: the window ``W_i`` of `locate_subject` gives ``ncc_i``; inside it,
    ``colour_i = mean_{p ∈ W_i} a_i(p)`` with ``a_i`` the `palette_affinity` of subject i's palette,
    and

    $$ \\text{leakage}_i = \\frac{1}{K-1} \\sum_{j \\ne i} \\operatorname{mean}_{p \\in W_i}\\, a_j(p)\\,(1 - a_i(p)) $$

    — subject j's colours where they are not also subject i's. Shared colours, neighbours
    overlapping the window and background pixels give a floor above 0 even for a perfect image:
    score the ground-truth target the same way for reference (`fidelity_baselines`).

    Args:
        image: ``(3, H, W)`` float in ``[0, 1]``.
        references: K ``(3, h, w)`` reference images.
        reference_masks: K ``(h, w)`` bool subject masks.
        palettes: ``(K, 2, 3)`` the subjects' palette colours.
        scales: see `locate_subject`.
        sigma: see `palette_affinity`.

    Returns:
        `SubjectFidelity`.

    Example:
        >>> from mosaic_kit.data import SyntheticWorld, subject_descriptor
        >>> sample = SyntheticWorld().sample(1, num_refs=2)
        >>> palettes = torch.stack([subject_descriptor(i).palette for i in sample.meta["identities"]])
        >>> scores = subject_fidelity(sample.target, sample.references, sample.reference_masks, palettes)
        >>> scores.ncc.shape, bool((scores.colour > scores.leakage).all())
        (torch.Size([2]), True)
    """
    _check_image("image", image)
    count = len(references)
    if count < 1 or len(reference_masks) != count:
        raise ValueError(f"Expected K >= 1 references and as many masks, but got {count} and {len(reference_masks)}.")
    check_shape("palettes", palettes, [count, 2, 3], "(K, 2, 3)")
    affinities = torch.stack([palette_affinity(image, palettes[k], sigma) for k in range(count)])  # (K, H, W)
    ncc, colour, leakage, windows = [], [], [], []
    for i in range(count):
        match = locate_subject(image, references[i], reference_masks[i], scales)
        window = match.window.to(image.device)
        own = affinities[i][window]
        ncc.append(match.score)
        colour.append(float(own.mean()))
        if count > 1:
            others = [float((affinities[j][window] * (1 - own)).mean()) for j in range(count) if j != i]
            leakage.append(sum(others) / len(others))
        else:
            leakage.append(float("nan"))
        windows.append(match.window)
    return SubjectFidelity(torch.tensor(ncc), torch.tensor(colour), torch.tensor(leakage), torch.stack(windows))


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
        max_sequence_length: T5 tokens of the prompts.
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
    from ..data import HELD_OUT_IDENTITIES, SyntheticWorld, SyntheticWorldConfig

    if not isinstance(config, SyntheticEvalConfig):
        raise ValueError(f"Expected `config` to be a SyntheticEvalConfig, but got {type(config).__name__}.")
    return SyntheticWorld(SyntheticWorldConfig(
        image_size=config.target_size, ref_size=config.ref_size, min_refs=1, max_refs=max(config.num_refs),
        identity_range=HELD_OUT_IDENTITIES, seed=config.world_seed,
    ))


def _pipe_model(pipe):
    model = pipe.mosaic_transformer
    return getattr(model, "module", model)  # a DDP wrapper from accelerate


def _decode(pipe, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Packed latent tokens → ``(B, 3, H, W)`` images in [0, 1] (the pipeline's own decode)."""
    from ..models import unpack_latents

    factor = pipe.vae_scale_factor
    latents = unpack_latents(tokens, height // factor, width // factor)
    latents = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
    images = pipe.vae.decode(latents.to(pipe.vae.dtype), return_dict=False)[0]
    return ((images.float() + 1) / 2).clamp(0, 1)


@torch.no_grad()
def evaluate_denoising(
    pipe: MosaicFluxPipeline,
    encode: Callable[[MosaicBatch], dict],
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
        pipe: a `MosaicFluxPipeline` (its ``mosaic_transformer`` is the model scored; the trainer's
            pipeline carries the trained one).
        encode: ``encode(batch) -> dict`` of packed inputs with the clean target latents under
            ``"target"`` (`MosaicTrainer.encode_batch`).
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
        >>> import tempfile
        >>> from mosaic_kit.data import collate_samples
        >>> from mosaic_kit.training import MosaicTrainer, config_from_dict
        >>> trainer = MosaicTrainer(config_from_dict({"output_dir": tempfile.mkdtemp(), "tracker": None,
        ...     "mixed_precision": "no", "model": {"pixel_space": 2, "lora_rank": 2, "gradient_checkpointing": False},
        ...     "data": {"target_size": 64, "ref_size": 32}}))
        >>> trainer.setup()
        >>> world = held_out_world(SyntheticEvalConfig(num_refs=(2,)))
        >>> batch = collate_samples([world.sample(i, num_refs=2) for i in range(2)], 64, 32, vae_scale_factor=2)
        >>> noise = torch.randn(2, 256, 48, generator=torch.Generator().manual_seed(0))
        >>> scores = evaluate_denoising(trainer.pipe, trainer.encode_batch, batch, 0.5, noise)
        >>> hits = scores["hit_rate"]
        >>> scores["maps"].shape, bool(((hits >= 0) & (hits <= 1)).all()), scores["ref_gain"].shape
        (torch.Size([2, 2, 256]), True, torch.Size([2]))
    """
    sigma = check_real("sigma", sigma, 0.0, 1.0, high_inclusive=False)
    model = _pipe_model(pipe)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    height, width = batch.targets.shape[-2:]
    bsz = batch.batch_size

    def estimate_of(inputs: dict, noisy: torch.Tensor, capture: list | None) -> torch.Tensor:
        velocity = model(
            target_tokens=noisy.to(dtype),
            timestep=torch.full((bsz,), sigma, device=device, dtype=dtype),
            guidance=torch.full((bsz,), float(guidance), device=device),
            capture=capture,
            **{k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() and "ids" not in k else v
               for k, v in inputs.items()},
        ).float()
        return _decode(pipe, noisy - sigma * velocity, height, width).cpu()

    inputs = dict(encode(batch))
    latents = inputs.pop("target").float()
    check_shape("noise", noise, list(latents.shape), "(B, N_tgt, C)")
    noisy = (1 - sigma) * latents + sigma * noise.to(latents.device, latents.dtype)
    corr = batch.corr.to(device)
    rows = PointAttentionRows(corr)
    estimate = estimate_of(inputs, noisy, [rows])
    attention = rows.result()
    hits = attention_hit_rate(attention, corr, batch.target_grid, radius=1, reduction="none").float()
    logp = attention_log_probability(attention, corr, reduction="none")
    points = corr.point_mask.float()
    count = points.sum((1, 2))

    def per_sample(values: torch.Tensor) -> torch.Tensor:
        return torch.where(count > 0, (values * points).sum((1, 2)) / count.clamp_min(1), torch.full_like(count, float("nan")))

    maps, valid = reference_attention_maps(attention, corr)
    token_masks = target_token_masks(batch.target_masks.to(device), batch.target_grid)
    mass = subject_attention_mass(maps, valid, token_masks)
    wrong = None
    if bsz > 1:
        swapped = replace(batch, references=batch.references.roll(1, 0))
        wrong_inputs = dict(encode(swapped))
        wrong_inputs.pop("target")
        wrong = estimate_of(wrong_inputs, noisy, None)
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
    from ..data import subject_descriptor

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
    pipe: MosaicFluxPipeline,
    encode: Callable[[MosaicBatch], dict],
    config: SyntheticEvalConfig,
    figure_sample: tuple[int, int] | None = (3, 0),
    figure_sigma: float | None = None,
    progress: Callable[[str], None] | None = None,
) -> SyntheticEvalResult:
    """Scores a trained pipeline on held-out subjects for every K of ``config.num_refs``.

    For each K: ``attention_samples`` held-out samples (indices 0, 1, …, shared by every model
    evaluated with the same config), scored by `evaluate_denoising` at every ``sigma`` with noise
    drawn from ``(noise_seed, K, sigma)``; then the first ``generation_samples`` of them generated
    with the pipeline (noise seed ``noise_seed · 1000 + 10 · K + i``) and scored by
    `evaluate_generation`.

    Args:
        pipe: the `MosaicFluxPipeline` holding the trained model.
        encode: ``encode(batch) -> dict`` (`MosaicTrainer.encode_batch`).
        config: the `SyntheticEvalConfig`.
        figure_sample: ``(K, index)`` of the sample whose attention maps are kept for figures
            (K must be in ``num_refs`` and index below ``attention_samples``), or None.
        figure_sigma: the noise level of the figure maps; default the middle of ``sigmas``.
        progress: optional callback receiving one line per K.

    Returns:
        `SyntheticEvalResult`.

    Example:
        >>> import tempfile
        >>> from mosaic_kit.training import MosaicTrainer, config_from_dict
        >>> trainer = MosaicTrainer(config_from_dict({"output_dir": tempfile.mkdtemp(), "tracker": None,
        ...     "mixed_precision": "no", "model": {"pixel_space": 2, "lora_rank": 2, "gradient_checkpointing": False},
        ...     "data": {"target_size": 64, "ref_size": 32}}))
        >>> trainer.setup()
        >>> config = SyntheticEvalConfig(num_refs=(1, 2), attention_samples=1, sigmas=(0.5,), generation_samples=1,
        ...                              inference_steps=1)
        >>> result = evaluate_synthetic(trainer.pipe, trainer.encode_batch, config, figure_sample=(2, 0))
        >>> sorted({r["kind"] for r in result.records}), result.figure["maps"].shape
        (['denoise', 'generation'], torch.Size([2, 16, 16]))
    """
    from ..data import collate_samples

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
    world = held_out_world(config)
    model = _pipe_model(pipe)
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
                    batch = collate_samples(chunk, config.target_size, config.ref_size, vae_scale_factor=pipe.vae_scale_factor)
                    tokens = batch.target_grid.num_tokens
                    channels = pipe.transformer.config.in_channels
                    noise = torch.randn(len(chunk), tokens, channels, generator=generator)
                    scores = evaluate_denoising(pipe, encode, batch, sigma, noise, config.guidance_scale)
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
                scores, image = evaluate_generation(pipe, samples[i] if i < len(samples) else world.sample(i, num_refs=k),
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


# ----------------------------------------------------------------------------- aggregation
def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def summarise_records(records: Sequence[Mapping], by: Sequence[str] = ("num_refs",),
                      metrics: Sequence[str] | None = None) -> list[dict]:
    """Means of record metrics grouped by keys (NaN values skipped; a group with none is NaN).

    Denoising records contribute the teacher-forced metrics (averaged over their noise levels
    unless ``"sigma"`` is in ``by``), generation records the sample metrics.

    Args:
        records: dicts such as `SyntheticEvalResult.records`.
        by: the grouping keys (present in every record); ``()`` gives one overall row.
        metrics: metric keys (default: every key of `METRICS`).

    Returns:
        One dict per group, sorted by the group keys: the keys of ``by`` then each metric's mean.

    Example:
        >>> records = [{"kind": "denoise", "num_refs": 1, "hit_rate": 0.5},
        ...            {"kind": "denoise", "num_refs": 1, "hit_rate": 1.0},
        ...            {"kind": "generation", "num_refs": 1, "sample_ncc": 0.2}]
        >>> summarise_records(records, metrics=["hit_rate", "sample_ncc"])
        [{'num_refs': 1, 'hit_rate': 0.75, 'sample_ncc': 0.2}]
    """
    metrics = list(METRICS) if metrics is None else list(metrics)
    groups: dict[tuple, list[Mapping]] = {}
    for record in records:
        missing = [key for key in by if key not in record]
        if missing and record.get("kind") == "denoise":
            raise ValueError(f"Expected every record to hold the grouping keys {list(by)}, but one lacks {missing}.")
        if missing:
            continue
        groups.setdefault(tuple(record[key] for key in by), []).append(record)
    rows = []
    for key in sorted(groups, key=lambda values: tuple((0, v) if isinstance(v, (int, float)) else (1, str(v)) for v in values)):
        row = dict(zip(by, key))
        for metric in metrics:
            row[metric] = _mean([r[metric] for r in groups[key] if metric in r])
        rows.append(row)
    return rows


def _spread(values: Sequence[float]) -> tuple[float, float]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return float("nan"), float("nan")
    return sum(finite) / len(finite), (statistics.stdev(finite) if len(finite) > 1 else 0.0)


def ablation_table(per_run: Mapping[str, Sequence[Mapping]], metrics: Sequence[str] | None = None,
                   reference_rows: Mapping[str, Mapping] | None = None, digits: int = 3) -> str:
    """The markdown table of an ablation: per setting, mean ± standard deviation over seeds.

    Args:
        per_run: setting name → one summary row per seed (e.g. ``summarise_records(records, by=())[0]``).
        metrics: columns (default: every key of `METRICS`); titles from `METRICS`.
        reference_rows: extra rows without spread (e.g. ``{"ground truth": {...}}``); metrics they
            lack show as "–".
        digits: decimals.

    Returns:
        The table as markdown.

    Example:
        >>> print(ablation_table({"a": [{"hit_rate": 0.1}, {"hit_rate": 0.3}]}, metrics=["hit_rate"]))
        | setting | seeds | hit-rate ↑ |
        | --- | --- | --- |
        | a | 2 | 0.200 ± 0.141 |
    """
    metrics = list(METRICS) if metrics is None else list(metrics)
    titles = [METRICS[m][0] if m in METRICS else m for m in metrics]
    lines = ["| setting | seeds | " + " | ".join(titles) + " |", "| --- | --- | " + " | ".join("---" for _ in metrics) + " |"]
    for name, rows in per_run.items():
        cells = []
        for metric in metrics:
            mean, std = _spread([float(r.get(metric, float("nan"))) for r in rows])
            cells.append("–" if not math.isfinite(mean) else f"{mean:.{digits}f} ± {std:.{digits}f}")
        lines.append(f"| {name} | {len(rows)} | " + " | ".join(cells) + " |")
    for name, row in (reference_rows or {}).items():
        cells = []
        for metric in metrics:
            value = float(row.get(metric, float("nan")))
            cells.append("–" if not math.isfinite(value) else f"{value:.{digits}f}")
        lines.append(f"| {name} | – | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- figures
def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("The synthetic-ablation figures need matplotlib: `pip install mosaic_kit[train]`.") from error
    return plt


def plot_metric_against_k(
    curves: Mapping[str, Mapping[int, Sequence[float]]],
    path: str | Path,
    metrics: Sequence[str],
    references: Mapping[str, Mapping[str, Mapping[int, float]]] | None = None,
) -> Path:
    """Line plots of metrics against K: one panel per metric, one line per setting (mean over
    seeds, shaded ± one standard deviation), dashed reference lines (e.g. ground truth, chance).

    Args:
        curves: ``{metric: {setting: {K: [one value per seed]}}}``.
        path: the PNG to write (parent folders are created).
        metrics: the metrics to draw, in panel order (keys of ``curves``).
        references: ``{metric: {label: {K: value}}}`` dashed lines.

    Returns:
        The path.

    Example:
        >>> import tempfile
        >>> out = Path(tempfile.mkdtemp()) / "k.png"
        >>> curves = {"hit_rate": {"a": {1: [0.1, 0.2], 2: [0.2, 0.3]}}}
        >>> plot_metric_against_k(curves, out, ["hit_rate"]).stat().st_size > 0
        True
    """
    plt = _pyplot()
    for metric in metrics:
        if metric not in curves:
            raise ValueError(f"Expected every metric in `curves`, but {metric!r} is missing (got {sorted(curves)}).")
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for setting, per_k in curves[metric].items():
            ks = sorted(per_k)
            stats = [_spread(list(per_k[k])) for k in ks]
            means = [s[0] for s in stats]
            stds = [s[1] for s in stats]
            line = ax.plot(ks, means, marker="o", label=setting)[0]
            ax.fill_between(ks, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                            color=line.get_color(), alpha=0.15)
        for label, per_k in ((references or {}).get(metric) or {}).items():
            ks = sorted(per_k)
            ax.plot(ks, [per_k[k] for k in ks], linestyle="--", color="grey" if "chance" in label else "black",
                    linewidth=1, label=label)
        ax.set_title(METRICS[metric][0] if metric in METRICS else metric)
        ax.set_xlabel("K (references)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    with_references = [ax for ax, metric in zip(axes[0], metrics) if (references or {}).get(metric)]
    if with_references and with_references[0] is not axes[0][0]:
        with_references[0].legend(fontsize=8)
    fig.tight_layout()
    return _save_figure(fig, path)


_REF_COLOURS = ((0.90, 0.10, 0.10), (0.10, 0.45, 0.95), (0.10, 0.75, 0.20), (0.95, 0.60, 0.05),
                (0.65, 0.20, 0.85), (0.05, 0.80, 0.80), (0.95, 0.30, 0.70), (0.40, 0.40, 0.40))


def plot_attention_maps(figures: Mapping[str, Mapping], path: str | Path) -> Path:
    """Attention-map figure in the manner of the paper's Fig. 6: one row per setting; the
    references, the target with the subjects' outlines, then each reference's aggregated attention
    over the target (`reference_attention_maps`) with its peak marked, and all references at once
    (one colour per reference, brightness = attention).

    Args:
        figures: setting → `SyntheticEvalResult.figure` (all for the same sample).
        path: the PNG to write.

    Returns:
        The path.

    Example:
        >>> import tempfile
        >>> fig = {"num_refs": 2, "index": 0, "sigma": 0.5, "maps": torch.rand(2, 4, 4), "valid": torch.ones(2, dtype=torch.bool),
        ...        "target": torch.rand(3, 16, 16), "references": torch.rand(2, 3, 8, 8),
        ...        "token_masks": torch.rand(2, 4, 4) > 0.5}
        >>> plot_attention_maps({"a": fig}, Path(tempfile.mkdtemp()) / "maps.png").exists()
        True
    """
    plt = _pyplot()
    if not figures:
        raise ValueError("Expected at least one setting in `figures`, but got none.")
    first = next(iter(figures.values()))
    k = int(first["num_refs"])
    columns = 2 + k + 1
    fig, axes = plt.subplots(len(figures), columns, figsize=(1.9 * columns, 2.0 * len(figures) + 0.4), squeeze=False)
    for row, (setting, item) in enumerate(figures.items()):
        target = item["target"].permute(1, 2, 0).clamp(0, 1).numpy()
        height, width = target.shape[:2]
        refs = item["references"]
        strip = torch.cat([refs[j] for j in range(k)], dim=1).permute(1, 2, 0).clamp(0, 1).numpy()
        axes[row][0].imshow(strip)
        axes[row][0].set_ylabel(setting, fontsize=9)
        axes[row][1].imshow(target)
        maps = item["maps"].float()
        rows, cols = maps.shape[-2:]
        up = F.interpolate(maps[:, None], size=(height, width), mode="nearest")[:, 0]
        masks = F.interpolate(item["token_masks"].float()[:, None], size=(height, width), mode="nearest")[:, 0]
        combined = torch.zeros(height, width, 3)
        for j in range(k):
            colour = _REF_COLOURS[j % len(_REF_COLOURS)]
            axes[row][1].contour(masks[j].numpy(), levels=[0.5], colors=[colour], linewidths=1.2)
            ax = axes[row][2 + j]
            ax.imshow(target * 0.35 + 0.65)
            heat = up[j] / up[j].max().clamp_min(1e-12)
            ax.imshow(heat.numpy(), cmap="magma", alpha=0.75, vmin=0, vmax=1)
            ax.contour(masks[j].numpy(), levels=[0.5], colors=[colour], linewidths=1.2)
            peak = int(maps[j].flatten().argmax())
            scale_y, scale_x = height / rows, width / cols
            ax.plot([(peak % cols + 0.5) * scale_x - 0.5], [(peak // cols + 0.5) * scale_y - 0.5], marker="x",
                    color="white", markersize=7, mew=2)
            if row == 0:
                ax.set_title(f"ref {j + 1} → target", fontsize=9, color=colour)
            combined += heat[..., None] * torch.tensor(colour)
        axes[row][-1].imshow((combined / combined.max().clamp_min(1e-12)).numpy())
        if row == 0:
            axes[row][0].set_title("references", fontsize=9)
            axes[row][1].set_title("target (σ-noised in eval)", fontsize=9)
            axes[row][-1].set_title("all references", fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"aggregated attention of each reference over the target (K = {k}, σ = {first['sigma']})", fontsize=10)
    fig.tight_layout()
    return _save_figure(fig, path)


def _save_figure(fig, path: str | Path) -> Path:
    """Saves a matplotlib figure as PNG (creating the folder), closes it and returns the path."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
