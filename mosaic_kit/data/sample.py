"""The sample type every dataset in `mosaic_kit.data` yields.

Correspondences travel as pixel pairs, not token indices, so that resizing, cropping and the
multi-subject composer carry them exactly; they become token indices only in the collate
(`Correspondences.from_pixel_pairs`) once the batch's token grids are known.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class MultiSubjectSample:
    """One training or evaluation sample: a target image, K references and their correspondences.

    Attributes:
        sample_id: a stable identifier (used in logs and in the bad-data tally).
        target: ``(3, H, W)`` float image in ``[0, 1]``.
        references: K images ``(3, h_k, w_k)`` in ``[0, 1]``, one per subject, in slot order.
        caption: the target's caption.
        pairs: per reference, a ``(P_k, 4)`` float tensor of pixel pairs
            ``(ref_x, ref_y, tgt_x, tgt_y)``: ``(ref_x, ref_y)`` in the reference's pixel frame and
            ``(tgt_x, tgt_y)`` in the target's, pixel centres at ``+0.5``.
        target_masks: per reference, an optional ``(H, W)`` bool mask of the subject in the target.
        reference_masks: per reference, an optional ``(h_k, w_k)`` bool mask of the subject.
        meta: free-form extra information (source rows, layout boxes, ...).
    """

    sample_id: str
    target: torch.Tensor
    references: list[torch.Tensor]
    caption: str
    pairs: list[torch.Tensor]
    target_masks: list[torch.Tensor | None] = field(default_factory=list)
    reference_masks: list[torch.Tensor | None] = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.target, torch.Tensor) or self.target.ndim != 3 or self.target.shape[0] != 3:
            shape = tuple(self.target.shape) if isinstance(self.target, torch.Tensor) else type(self.target).__name__
            raise ValueError(f"Expected `target` of shape (3, H, W), but got {shape}.")
        if len(self.pairs) != len(self.references):
            raise ValueError(
                f"Expected one pair tensor per reference ({len(self.references)}), but got {len(self.pairs)}."
            )
        for k, (ref, pairs) in enumerate(zip(self.references, self.pairs)):
            if not isinstance(ref, torch.Tensor) or ref.ndim != 3 or ref.shape[0] != 3:
                raise ValueError(f"Expected `references[{k}]` of shape (3, h, w), but got {getattr(ref, 'shape', ref)}.")
            if not isinstance(pairs, torch.Tensor) or pairs.ndim != 2 or pairs.shape[1] != 4:
                raise ValueError(f"Expected `pairs[{k}]` of shape (P, 4), but got {getattr(pairs, 'shape', pairs)}.")
        for name in ("target_masks", "reference_masks"):
            masks = getattr(self, name)
            if masks and len(masks) != len(self.references):
                raise ValueError(
                    f"Expected `{name}` empty or with one entry per reference ({len(self.references)}), "
                    f"but got {len(masks)}."
                )

    @property
    def num_refs(self) -> int:
        """K, the number of references."""
        return len(self.references)
