"""Batch reduction shared by the losses (private)."""

from __future__ import annotations

import math

import torch


def batch_mean(per_sample: torch.Tensor, contributes: torch.Tensor) -> torch.Tensor:
    """Mean of ``per_sample`` ``(B,)`` over the samples that contribute; 0 (still in the graph)
    when none does. ``per_sample`` must be finite where ``contributes`` is False."""
    weight = contributes.to(per_sample.dtype)
    return (per_sample * weight).sum() / weight.sum().clamp_min(1.0)


def check_eps(name: str, eps: object) -> float:
    """A finite eps >= 0 as a float."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"Expected `{name}` to be a finite number >= 0, but got {eps!r}.")
    return float(eps)
