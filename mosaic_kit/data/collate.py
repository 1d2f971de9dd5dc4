"""Batches of `MultiSubjectSample`: padding to the batch's largest K, and condition dropout.

`collate_samples` resizes every target to one size and every reference to one size (scaling the
pixel pairs with them), pads the references of samples with fewer than K to black images marked
absent, and maps the pairs to token pairs with `Correspondences.from_pixel_pairs` (first pair of
each reference token kept, as in the released data). `apply_condition_dropout` then blanks
captions and references for guidance-free training, deterministically given a generator.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import torch

from ..correspondence import Correspondences, TokenGrid, enforce_disjoint
from ..utils.checks import check_int, check_option
from ._images import as_size, resize_image, resize_mask, scale_pairs
from .sample import MultiSubjectSample

__all__ = ["COLLATE_DISJOINT_POLICIES", "MosaicBatch", "apply_condition_dropout", "collate_samples"]

COLLATE_DISJOINT_POLICIES = ("drop", "first", "strict", "none")
"""Eq. 2 policies of `collate_samples` (``"none"`` leaves the pairs as they are)."""


@dataclass(eq=False)
class MosaicBatch:
    """A padded batch of B samples with up to K references each.

    Attributes:
        targets: ``(B, 3, H, W)`` float in ``[0, 1]``.
        references: ``(B, K, 3, h, w)`` float; absent references are black (zeros).
        reference_present: ``(B, K)`` bool, True for real references.
        captions: B captions (``""`` where dropped).
        sample_ids: B sample ids.
        corr: the token correspondences on ``target_grid`` / ``ref_grid`` (absent references hold
            no points).
        target_masks: ``(B, K, H, W)`` bool subject masks in the target (False where unknown).
        target_mask_present: ``(B, K)`` bool, True where a target mask was given.
        reference_masks: ``(B, K, h, w)`` bool (False where unknown).
        reference_mask_present: ``(B, K)`` bool.
        caption_dropped: ``(B,)`` bool, set by `apply_condition_dropout`.
        references_dropped: ``(B,)`` bool, set by `apply_condition_dropout`.
        target_grid: the target's token grid.
        ref_grid: the references' token grid.
        meta: the samples' ``meta`` dicts.
    """

    targets: torch.Tensor
    references: torch.Tensor
    reference_present: torch.Tensor
    captions: list[str]
    sample_ids: list[str]
    corr: Correspondences
    target_masks: torch.Tensor
    target_mask_present: torch.Tensor
    reference_masks: torch.Tensor
    reference_mask_present: torch.Tensor
    caption_dropped: torch.Tensor
    references_dropped: torch.Tensor
    target_grid: TokenGrid
    ref_grid: TokenGrid
    meta: list[dict]

    @property
    def batch_size(self) -> int:
        """B."""
        return self.targets.shape[0]

    @property
    def num_refs(self) -> int:
        """K, the padded number of reference slots."""
        return self.references.shape[1]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> MosaicBatch:
        """A copy with every tensor (and the correspondences) on ``device``.

        Args:
            device: the device.
            non_blocking: passed to `torch.Tensor.to`.

        Returns:
            The moved batch.

        Example:
            >>> image = torch.rand(3, 16, 16)
            >>> batch = collate_samples([MultiSubjectSample("a", image, [image], "", [torch.zeros(0, 4)])], 16, 16)
            >>> batch.to("cpu").references.device.type
            'cpu'
        """
        moved = {}
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, torch.Tensor):
                moved[item.name] = value.to(device, non_blocking=non_blocking)
        return replace(self, corr=self.corr.to(device), **moved)


def _size(name: str, value: object, grid_unit: int) -> tuple[int, int]:
    size = as_size(name, value)
    for side in size:
        if side % grid_unit:
            raise ValueError(f"Expected `{name}` sides to be multiples of {grid_unit}, but got {size}.")
    return size


def collate_samples(
    samples: Sequence[MultiSubjectSample],
    target_size: int | tuple[int, int] = 512,
    ref_size: int | tuple[int, int] = 512,
    *,
    max_refs: int | None = None,
    vae_scale_factor: int = 8,
    patch_size: int = 2,
    disjoint: str = "drop",
    first_per_ref_token: bool = True,
) -> MosaicBatch:
    """Pads and stacks samples into a `MosaicBatch`.

    Targets are resized to ``target_size`` and references to ``ref_size`` where they differ
    (bilinear with antialiasing; masks read at pixel centres), the pairs scaled with them. K is
    ``max_refs`` when given (fixed shapes), else the batch's largest reference count; missing
    slots hold black images with ``reference_present`` False. Pairs become token pairs with
    `Correspondences.from_pixel_pairs`; eq. 2 is then enforced on this batch's target grid with
    ``disjoint`` (it already holds for composites at the same grid; a coarser grid can break it).

    Args:
        samples: the samples.
        target_size: target side or ``(H, W)``, multiples of ``vae_scale_factor * patch_size``.
        ref_size: reference side or ``(h, w)``, likewise.
        max_refs: pad every sample to this K (a sample with more references is an error).
        vae_scale_factor: pixels per latent cell.
        patch_size: latent cells per token side.
        disjoint: one of `COLLATE_DISJOINT_POLICIES`.
        first_per_ref_token: keep only the first pair of each reference token.

    Returns:
        The batch.

    Example:
        >>> image = torch.rand(3, 64, 64)
        >>> one = MultiSubjectSample("a", image, [image], "a dog", [torch.tensor([[8.0, 8.0, 40.0, 40.0]])])
        >>> two = MultiSubjectSample("b", image, [image, image], "a dog and a cat", [torch.zeros(0, 4)] * 2)
        >>> batch = collate_samples([one, two], target_size=32, ref_size=32)
        >>> tuple(batch.references.shape), batch.reference_present.tolist()
        ((2, 2, 3, 32, 32), [[True, False], [True, True]])
        >>> batch.corr.to_dicts()  # (8, 8) → (4, 4) → token 0; (40, 40) → (20, 20) → token 3 of the 2×2 grid
        [[{0: 3}], [{}, {}]]
    """
    if isinstance(samples, MultiSubjectSample) or not isinstance(samples, Sequence) or not samples:
        raise ValueError("Expected `samples` to be a non-empty list of MultiSubjectSample.")
    for b, sample in enumerate(samples):
        if not isinstance(sample, MultiSubjectSample):
            raise ValueError(f"Expected `samples[{b}]` to be a MultiSubjectSample, but got {type(sample).__name__}.")
    vae_scale_factor = check_int("vae_scale_factor", vae_scale_factor, minimum=1)
    patch_size = check_int("patch_size", patch_size, minimum=1)
    unit = vae_scale_factor * patch_size
    tgt_h, tgt_w = _size("target_size", target_size, unit)
    ref_h, ref_w = _size("ref_size", ref_size, unit)
    check_option("disjoint", disjoint, COLLATE_DISJOINT_POLICIES)
    most = max(s.num_refs for s in samples)
    if max_refs is not None:
        max_refs = check_int("max_refs", max_refs, minimum=0)
        if most > max_refs:
            worst = next(s.sample_id for s in samples if s.num_refs == most)
            raise ValueError(f"Expected at most `max_refs` = {max_refs} references per sample, but {worst!r} has {most}.")
        most = max_refs
    batch = len(samples)
    targets = torch.empty(batch, 3, tgt_h, tgt_w)
    references = torch.zeros(batch, most, 3, ref_h, ref_w)
    reference_present = torch.zeros(batch, most, dtype=torch.bool)
    target_masks = torch.zeros(batch, most, tgt_h, tgt_w, dtype=torch.bool)
    target_mask_present = torch.zeros(batch, most, dtype=torch.bool)
    reference_masks = torch.zeros(batch, most, ref_h, ref_w, dtype=torch.bool)
    reference_mask_present = torch.zeros(batch, most, dtype=torch.bool)
    pixel_pairs = []
    for b, sample in enumerate(samples):
        frame_h, frame_w = sample.target.shape[1:]
        targets[b] = resize_image(sample.target.float(), (tgt_h, tgt_w))
        per_ref = []
        for k, (reference, pairs) in enumerate(zip(sample.references, sample.pairs)):
            references[b, k] = resize_image(reference.float(), (ref_h, ref_w))
            reference_present[b, k] = True
            source_h, source_w = reference.shape[1:]
            scaled = scale_pairs(pairs, (ref_w / source_w, ref_h / source_h), (tgt_w / frame_w, tgt_h / frame_h))
            per_ref.append((scaled[:, :2], scaled[:, 2:]))
            if sample.target_masks and sample.target_masks[k] is not None:
                target_masks[b, k] = resize_mask(sample.target_masks[k], (tgt_h, tgt_w))
                target_mask_present[b, k] = True
            if sample.reference_masks and sample.reference_masks[k] is not None:
                reference_masks[b, k] = resize_mask(sample.reference_masks[k], (ref_h, ref_w))
                reference_mask_present[b, k] = True
        pixel_pairs.append(per_ref)
    target_grid = TokenGrid(tgt_h, tgt_w, vae_scale_factor, patch_size)
    ref_grid = TokenGrid(ref_h, ref_w, vae_scale_factor, patch_size)
    if most == 0:
        empty = torch.zeros(batch, 0, 0, dtype=torch.long)
        corr = Correspondences(empty, empty.clone(), empty.bool(), torch.zeros(batch, 0, dtype=torch.bool), (),
                               target_grid.num_tokens)
    else:
        try:
            corr = Correspondences.from_pixel_pairs(
                pixel_pairs, [ref_grid] * most, target_grid, first_per_ref_token=first_per_ref_token
            )
        except ValueError as error:
            raise ValueError(f"Expected every pair inside its images (samples {[s.sample_id for s in samples]}): {error}") from None
        if disjoint != "none" and most > 1:
            corr = enforce_disjoint(corr, disjoint)
    return MosaicBatch(
        targets=targets,
        references=references,
        reference_present=reference_present,
        captions=[s.caption for s in samples],
        sample_ids=[s.sample_id for s in samples],
        corr=corr,
        target_masks=target_masks,
        target_mask_present=target_mask_present,
        reference_masks=reference_masks,
        reference_mask_present=reference_mask_present,
        caption_dropped=torch.zeros(batch, dtype=torch.bool),
        references_dropped=torch.zeros(batch, dtype=torch.bool),
        target_grid=target_grid,
        ref_grid=ref_grid,
        meta=[s.meta for s in samples],
    )


def apply_condition_dropout(
    batch: MosaicBatch,
    caption_p: float,
    image_p: float,
    generator: torch.Generator,
    empty_caption: str = "",
) -> MosaicBatch:
    """Drops captions and references at random, for guidance-free (classifier-free) training.

    Exactly ``2 * B`` numbers are drawn from ``generator`` (the captions' B first, then the
    references'), whatever the probabilities, so the stream stays aligned across settings and a
    resumed run draws the same. Sample ``b`` loses its caption (replaced by ``empty_caption``) when
    its first draw is below ``caption_p``, and all its references when its second draw is below
    ``image_p``: they become black, absent (``reference_present`` False) and lose their pairs and
    reference masks. Both can happen to one sample (probability ``caption_p * image_p``).

    Args:
        batch: from `collate_samples`.
        caption_p: caption dropout probability in ``[0, 1]``.
        image_p: reference dropout probability in ``[0, 1]``.
        generator: a CPU ``torch.Generator`` (it is advanced).
        empty_caption: what a dropped caption becomes.

    Returns:
        A new batch; ``caption_dropped`` and ``references_dropped`` mark what was dropped (on top of
        earlier drops).

    Example:
        >>> image = torch.rand(3, 32, 32)
        >>> sample = MultiSubjectSample("a", image, [image], "a dog", [torch.tensor([[8.0, 8.0, 24.0, 24.0]])])
        >>> batch = collate_samples([sample] * 4, 32, 32)
        >>> out = apply_condition_dropout(batch, 0.5, 0.5, torch.Generator().manual_seed(0))
        >>> again = apply_condition_dropout(batch, 0.5, 0.5, torch.Generator().manual_seed(0))
        >>> out.captions == again.captions and bool((out.references_dropped == again.references_dropped).all())
        True
        >>> all(out.captions[b] == "" for b in range(4) if out.caption_dropped[b])
        True
    """
    if not isinstance(batch, MosaicBatch):
        raise ValueError(f"Expected `batch` to be a MosaicBatch, but got {type(batch).__name__}.")
    for name, value in (("caption_p", caption_p), ("image_p", image_p)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ValueError(f"Expected `{name}` in [0, 1], but got {value!r}.")
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"Expected `generator` to be a torch.Generator, but got {type(generator).__name__}.")
    if not isinstance(empty_caption, str):
        raise ValueError(f"Expected `empty_caption` to be a string, but got {empty_caption!r}.")
    size = batch.batch_size
    draws = torch.rand(2 * size, generator=generator, device=generator.device).cpu()
    drop_caption = draws[:size] < caption_p
    drop_refs = (draws[size:] < image_p).to(batch.targets.device)
    captions = [empty_caption if drop else caption for caption, drop in zip(batch.captions, drop_caption.tolist())]
    keep = ~drop_refs
    keep_refs = keep.view(-1, 1)
    corr = batch.corr
    if corr.num_refs:
        keep_corr = keep.to(corr.device).view(-1, 1)
        corr = replace(corr, ref_present=corr.ref_present & keep_corr, point_mask=corr.point_mask & keep_corr[..., None])
    return replace(
        batch,
        references=batch.references * keep.view(-1, 1, 1, 1, 1).to(batch.references.dtype),
        reference_present=batch.reference_present & keep_refs,
        reference_masks=batch.reference_masks & keep.view(-1, 1, 1, 1),
        reference_mask_present=batch.reference_mask_present & keep_refs,
        captions=captions,
        corr=corr,
        caption_dropped=batch.caption_dropped | drop_caption.to(batch.caption_dropped.device),
        references_dropped=batch.references_dropped | drop_refs.to(batch.references_dropped.device),
    )
