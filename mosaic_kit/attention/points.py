"""Dense attention rows of the annotated points only: a cheap, gradient-free diagnostic."""

from __future__ import annotations

import torch

from ..correspondence import Correspondences
from ..utils.checks import check_shape
from .capture import _in_backward_pass


class PointAttentionRows:
    """Accumulates, block by block, the attention row over target tokens of every annotated
    reference point: ``A[G(u_j^k), :]`` of eq. 8 (mean over blocks and heads), without gradients.

    It costs ``B·H·R·N_tgt`` per block for the ``R = K·P`` annotated rows, so it is affordable in
    a training step; use it for the attention alignment hit-rate
    (`mosaic_kit.eval.attention_hit_rate`). Feed it like `RefTargetCapture` (it has the same
    ``add``), e.g. alongside it: ``model(..., capture=[capture, rows])``.

    Args:
        corr: the batch's correspondences.

    Example:
        >>> corr = Correspondences.from_dicts([[{0: 1}, {1: 0}]], ref_tokens=[2, 2], tgt_tokens=3)
        >>> rows = PointAttentionRows(corr)
        >>> rows.add(torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 3, 8))  # uniform attention
        >>> rows.result().shape, rows.result()[0, 0, 0]
        (torch.Size([1, 2, 1, 3]), tensor([0.3333, 0.3333, 0.3333]))
    """

    def __init__(self, corr: Correspondences) -> None:
        if not isinstance(corr, Correspondences):
            raise ValueError(f"Expected `corr` to be a Correspondences, but got {type(corr).__name__}.")
        self.corr = corr
        self._sum: torch.Tensor | None = None
        self._blocks = 0

    @torch.no_grad()
    def add(self, query: torch.Tensor, key: torch.Tensor) -> None:
        """Feeds one block: ``query (B, H, N_ref_total, D)``, ``key (B, H, N_tgt, D)`` (post-RoPE).

        Inside a checkpointed function, the checkpoint's recomputation during backward calls it
        again: such calls are ignored, so no block counts twice.
        """
        if _in_backward_pass():
            return
        corr = self.corr
        check_shape("query", query, [corr.batch_size, None, corr.total_ref_tokens, None], "(B, H, N_ref_total, D)")
        heads, dim = query.shape[1], query.shape[3]
        check_shape("key", key, [corr.batch_size, heads, corr.tgt_tokens, dim], "(B, H, N_tgt, D)")
        rows = corr.global_rows.clamp_min(0).flatten(1).to(query.device)  # (B, R)
        picked = query.gather(2, rows[:, None, :, None].expand(-1, heads, -1, dim)).float()
        probs = (picked @ key.float().transpose(-1, -2) * dim**-0.5).softmax(-1).mean(1)  # (B, R, N_tgt)
        self._sum = probs if self._sum is None else self._sum + probs
        self._blocks += 1

    def result(self) -> torch.Tensor:
        """``(B, K, P, N_tgt)`` mean rows; rows of padded points are meaningless (mask them with
        ``corr.point_mask``)."""
        if self._sum is None:
            raise ValueError("Expected at least one block fed with `add(query, key)` before `result()`, but got none.")
        corr = self.corr
        return (self._sum / self._blocks).view(corr.batch_size, corr.num_refs, corr.max_points, corr.tgt_tokens)
