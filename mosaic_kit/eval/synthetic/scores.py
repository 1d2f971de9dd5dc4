"""Scores of the synthetic multi-subject world, one function each (no model in here).

- **attention alignment** (per annotated point, from `mosaic_kit.attention.PointAttentionRows`):
  the hit-rate (`mosaic_kit.eval.attention_hit_rate`) and the mean log-probability at the true
  target token, `attention_log_probability`;
- **interference** between references: `reference_attention_maps` (each reference's mean row,
  the quantity MDL works on), `attention_overlap` (Bhattacharyya coefficient or histogram
  intersection between references' maps) and `subject_attention_mass` (how much of a
  reference's map falls on its own subject, and how much on the others);
- **images**: `masked_mse` inside each subject's visible region, and for generated samples
  `subject_fidelity`, which finds each reference's best-matching window (`locate_subject`,
  masked normalised cross-correlation `masked_ncc` over positions and scales) and measures its
  own palette there (`palette_affinity`) and the other subjects' palettes (attribute leakage).

`METRICS` names the keys of an evaluation record. The model runs in `.runner`; tables and
figures are in `.report`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ...correspondence import Correspondences, TokenGrid
from ...utils.checks import check_floating, check_option, check_real, check_shape

__all__ = [
    "DEFAULT_TEMPLATE_SCALES",
    "METRICS",
    "OVERLAP_MEASURES",
    "ReferenceAttentionMaps",
    "SubjectAttentionMass",
    "SubjectFidelity",
    "SubjectMatch",
    "attention_log_probability",
    "attention_overlap",
    "locate_subject",
    "masked_mse",
    "masked_ncc",
    "palette_affinity",
    "presence_threshold",
    "reference_attention_maps",
    "subject_attention_mass",
    "subject_fidelity",
    "subject_presence",
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
    "sample_presence": ("sample presence ↑", "share of subjects whose best-window colour passes the threshold "
                        "halfway between ground truth and chance (`presence_threshold`)"),
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


# ----------------------------------------------------------------------------- presence
def _finite_scores(name: str, values: object) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        tensor = values.detach().float().reshape(-1).cpu()
    elif isinstance(values, Sequence) and not isinstance(values, (str, bytes)):
        try:
            tensor = torch.tensor([float(v) for v in values], dtype=torch.float32)
        except (TypeError, ValueError) as error:
            raise TypeError(f"Expected `{name}` to hold numbers, but got {values!r}.") from error
    else:
        raise TypeError(f"Expected `{name}` to be a sequence or tensor of scores, but got {type(values).__name__}.")
    tensor = tensor[torch.isfinite(tensor)]
    if not len(tensor):
        raise ValueError(f"Expected `{name}` to hold at least one finite score, but got {values!r}.")
    return tensor


def presence_threshold(ground_truth: Sequence[float] | torch.Tensor, chance: Sequence[float] | torch.Tensor) -> float:
    """The colour score above which a subject counts as present: halfway between the mean
    per-subject ``colour`` of the ground truth (each true target scored against its own
    references) and of chance (another sample's target, other subjects, scored against them).

    A generated subject passes it when its best window holds its own colours more like the real
    image than like an image of other subjects. The threshold depends only on the evaluated
    world (not on any model), so every run of one evaluation shares it.

    Args:
        ground_truth: per-subject colour scores of the ground-truth rows (NaNs skipped).
        chance: per-subject colour scores of the chance rows (NaNs skipped).

    Returns:
        The threshold ``(mean(ground_truth) + mean(chance)) / 2``.

    Raises:
        TypeError: scores that are not a sequence or tensor of numbers.
        ValueError: no finite score in one of them, or a ground-truth mean not above chance
            (the colour score does not separate them, so no threshold can).

    Example:
        >>> presence_threshold([0.9, 1.0], [0.2, 0.4])
        0.625
    """
    truth = float(_finite_scores("ground_truth", ground_truth).mean())
    other = float(_finite_scores("chance", chance).mean())
    if truth <= other:
        raise ValueError(f"Expected the ground-truth colour score above chance to place a presence threshold, but "
                         f"got ground truth {truth:.3f} and chance {other:.3f}.")
    return (truth + other) / 2


def subject_presence(colour: torch.Tensor, threshold: float) -> torch.Tensor:
    """Which subjects are present: their `subject_fidelity` ``colour`` score is at least
    ``threshold`` (`presence_threshold`).

    Args:
        colour: ``(K,)`` per-subject colour scores (``SubjectFidelity.colour``).
        threshold: from `presence_threshold`, in ``[0, 1]``.

    Returns:
        ``(K,)`` float32, 1 for a present subject and 0 otherwise (its mean is the presence
        share); NaN where the score is NaN.

    Raises:
        ValueError: ``colour`` not a 1-D floating tensor, or ``threshold`` outside ``[0, 1]``.

    Example:
        >>> subject_presence(torch.tensor([0.9, 0.5, 0.7]), 0.6).tolist()
        [1.0, 0.0, 1.0]
    """
    if not isinstance(colour, torch.Tensor) or colour.ndim != 1 or not colour.is_floating_point():
        got = f"{tuple(colour.shape)} {colour.dtype}" if isinstance(colour, torch.Tensor) else type(colour).__name__
        raise ValueError(f"Expected `colour` to be a 1-D floating tensor (K,), but got {got}.")
    threshold = check_real("threshold", threshold, 0.0, 1.0)
    present = (colour >= threshold).float()
    return torch.where(torch.isnan(colour), torch.full_like(present, float("nan")), present)
