"""The MOSAIC training objective (eq. 15): a diffusion loss + α·SCAL + β·MDL.

The paper trains FLUX with flow matching, and `MosaicObjective.forward` computes that loss
itself. Any other diffusion loss (epsilon, v or x0 prediction, any timestep weighting) goes
through `MosaicObjective.combine`, which takes the scalar the caller already computed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..attention import AGGREGATES, CaptureResult
from ..correspondence import Correspondences
from ..utils.checks import check_floating, check_int, check_option, check_shape, compute_dtype
from ..utils.finite import check_finite
from ._mdl import MDL_DIVERGENCES, mdl
from ._reduce import check_eps
from ._scal import SCAL_REDUCTIONS, scal

__all__ = [
    "OBJECTIVE_PRESETS",
    "ConstantSchedule",
    "LinearRampSchedule",
    "MosaicObjective",
    "ObjectiveOutput",
    "flow_matching_loss",
]


def flow_matching_loss(model_pred: torch.Tensor, noise: torch.Tensor, latents: torch.Tensor,
                       weights: torch.Tensor | None = None) -> torch.Tensor:
    """Rectified-flow loss as FLUX is trained: the model predicts the velocity ``noise - latents``.

    $$ \\mathcal{L}_{diff} = \\operatorname{mean}\\left(w_b\\,(\\hat v - (\\epsilon - x_0))^2\\right) $$

    Args:
        model_pred: ``(B, ...)`` predicted velocity.
        noise: ``(B, ...)`` the noise ε, same shape.
        latents: ``(B, ...)`` the clean latents x0, same shape.
        weights: ``(B,)`` per-sample weights ``w_b``, or None (all 1). A model that predicts the
            clean sample uses ``σ²`` (`mosaic_kit.models.ModelFamily.loss_weights`): then the
            loss is ``mean((x̂0 − x0)²)``.

    Returns:
        Scalar mean squared error in float32 (float64 for float64 inputs).

    Raises:
        ValueError: when the shapes differ, a tensor is not floating point, or (while
            `mosaic_kit.finite_checks` is on: in tests and the trainer's first steps) one holds a
            NaN or inf.

    Example:
        >>> x0, noise = torch.zeros(2, 4), torch.ones(2, 4)
        >>> flow_matching_loss(torch.ones(2, 4), noise, x0)
        tensor(0.)
    """
    check_shape("model_pred", model_pred, [None] * getattr(model_pred, "ndim", 0), "(B, ...)")
    for name, tensor in (("noise", noise), ("latents", latents)):
        check_shape(name, tensor, list(model_pred.shape), "same as model_pred " + str(tuple(model_pred.shape)))
    for name, tensor in (("model_pred", model_pred), ("noise", noise), ("latents", latents)):
        check_floating(name, tensor)
        check_finite(name, tensor)  # hot path: only while the switch is on
    dtype = torch.float64 if model_pred.dtype == torch.float64 else torch.float32
    target = noise.to(dtype) - latents.to(dtype)
    error = (model_pred.to(dtype) - target).square()
    if weights is None:
        return error.mean()
    check_shape("weights", weights, [model_pred.shape[0]], "(B,)")
    check_floating("weights", weights)
    return (error * weights.to(dtype).view(-1, *([1] * (error.ndim - 1)))).mean()


@dataclass(frozen=True)
class ConstantSchedule:
    """A loss weight that does not change with the step.

    Example:
        >>> ConstantSchedule(0.4)(123)
        0.4
    """

    value: float

    def __post_init__(self) -> None:
        if isinstance(self.value, bool) or not isinstance(self.value, (int, float)) or not math.isfinite(self.value):
            raise ValueError(f"Expected `value` to be a finite number, but got {self.value!r}.")

    def __call__(self, step: int) -> float:
        """The weight at ``step``."""
        return float(self.value)


@dataclass(frozen=True)
class LinearRampSchedule:
    """A loss weight ramping linearly from ``start_value`` at ``start_step`` to ``end_value`` at
    ``end_step``, constant before and after.

    Args:
        start_step: last step at ``start_value``.
        end_step: first step at ``end_value`` (> ``start_step``).
        start_value: weight up to ``start_step``.
        end_value: weight from ``end_step`` on.

    Example:
        >>> ramp = LinearRampSchedule(10_000, 11_000, 0.0, 1.0)  # the released MDL weight
        >>> ramp(0), ramp(10_500), ramp(20_000)
        (0.0, 0.5, 1.0)
    """

    start_step: int
    end_step: int
    start_value: float = 0.0
    end_value: float = 1.0

    def __post_init__(self) -> None:
        check_int("start_step", self.start_step, minimum=0)
        check_int("end_step", self.end_step, minimum=self.start_step + 1)
        for name in ("start_value", "end_value"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"Expected `{name}` to be a finite number, but got {value!r}.")

    def __call__(self, step: int) -> float:
        """The weight at ``step``."""
        if step <= self.start_step:
            return float(self.start_value)
        if step >= self.end_step:
            return float(self.end_value)
        frac = (step - self.start_step) / (self.end_step - self.start_step)
        return float(self.start_value + frac * (self.end_value - self.start_value))


Schedule = ConstantSchedule | LinearRampSchedule

OBJECTIVE_PRESETS: dict[str, dict[str, Any]] = {
    "paper": dict(
        scal_weight=ConstantSchedule(0.4),
        mdl_weight=ConstantSchedule(0.6),
        scal_reduction="per_ref",
        scal_eps=0.0,
        mdl_divergence="sym_kl",
        mdl_aggregate="points",
    ),
    "released": dict(
        scal_weight=ConstantSchedule(0.1),
        mdl_weight=LinearRampSchedule(10_000, 11_000, 0.0, 1.0),
        scal_reduction="pooled",
        scal_eps=1e-9,
        mdl_divergence="jsd",
        mdl_aggregate="all",
    ),
}
"""Named settings of `MosaicObjective`: the paper's and the released code's (the table "Paper vs released
settings" in docs/guide/conventions.md)."""


@dataclass(frozen=True)
class ObjectiveOutput:
    """The terms of one evaluation of `MosaicObjective`.

    Args:
        loss: scalar total, ``flow_matching + scal_weight·scal + mdl_weight·mdl``.
        flow_matching: scalar diffusion term: the flow-matching loss from
            `MosaicObjective.forward`, or the caller's loss given to `MosaicObjective.combine`
            (whatever its parameterisation; the name stays for compatibility, `diffusion` is
            the same tensor under a neutral name).
        scal: scalar SCAL value (unweighted).
        mdl: scalar MDL value (unweighted).
        scal_weight: α at this step.
        mdl_weight: β at this step.

    Example:
        >>> out = MosaicObjective(scal_weight=0.0, mdl_weight=0.0)(torch.ones(1, 2), torch.ones(1, 2), torch.zeros(1, 2), None, None)
        >>> out.loss, out.flow_matching, out.scal, (out.scal_weight, out.mdl_weight)
        (tensor(0.), tensor(0.), tensor(0.), (0.0, 0.0))
    """

    loss: torch.Tensor
    flow_matching: torch.Tensor
    scal: torch.Tensor
    mdl: torch.Tensor
    scal_weight: float
    mdl_weight: float

    @property
    def diffusion(self) -> torch.Tensor:
        """The diffusion term (the same tensor as ``flow_matching``), whatever its parameterisation."""
        return self.flow_matching


def _as_schedule(name: str, value: float | Schedule) -> Schedule:
    if isinstance(value, (ConstantSchedule, LinearRampSchedule)):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return ConstantSchedule(float(value))
    raise ValueError(f"Expected `{name}` to be a number or a schedule, but got {type(value).__name__}.")


class MosaicObjective(nn.Module):
    """The MOSAIC training objective, eq. 15: ``L = L_flow_matching + α·SCAL + β·MDL``.

    `forward` computes the flow-matching loss of FLUX-style models (velocity ``noise - latents``)
    and adds the weighted terms; `combine` adds them to any diffusion loss the caller has already
    computed (epsilon, v, flow or x0 prediction; any weighting), so the objective serves any model.

    Args:
        scal_weight: α, a number or a schedule (paper: 0.4).
        mdl_weight: β, a number or a schedule (paper: 0.6).
        scal_reduction: see `scal`.
        scal_eps: see `scal`.
        mdl_divergence: see `mdl`.
        mdl_aggregate: see `mdl`; capture with the same aggregate.
        mdl_eps: see `mdl`.

    Use `from_preset` for the ``"paper"`` and ``"released"`` settings.

    Example:
        >>> corr = Correspondences.from_dicts([[{0: 0}, {0: 1}]], ref_tokens=[1, 1], tgt_tokens=2)
        >>> objective = MosaicObjective.from_preset("paper")
        >>> A = torch.tensor([[[0.8, 0.2], [0.2, 0.8]]])
        >>> x0 = torch.zeros(1, 2, 4)
        >>> out = objective(torch.ones(1, 2, 4), torch.ones(1, 2, 4), x0, A, corr, step=0)
        >>> round(out.loss.item(), 4)  # 0 + 0.4·(-log 0.8) + 0.6·(-0.8318)
        -0.4098
    """

    def __init__(
        self,
        scal_weight: float | Schedule = 0.4,
        mdl_weight: float | Schedule = 0.6,
        scal_reduction: str = "per_ref",
        scal_eps: float = 0.0,
        mdl_divergence: str = "sym_kl",
        mdl_aggregate: str | None = "points",
        mdl_eps: float | None = None,
    ) -> None:
        super().__init__()
        check_option("scal_reduction", scal_reduction, SCAL_REDUCTIONS)
        check_option("mdl_divergence", mdl_divergence, MDL_DIVERGENCES)
        check_option("mdl_aggregate", mdl_aggregate, AGGREGATES + (None,))
        self.scal_weight = _as_schedule("scal_weight", scal_weight)
        self.mdl_weight = _as_schedule("mdl_weight", mdl_weight)
        self.scal_reduction = scal_reduction
        self.scal_eps = check_eps("scal_eps", scal_eps)
        self.mdl_divergence = mdl_divergence
        self.mdl_aggregate = mdl_aggregate
        self.mdl_eps = None if mdl_eps is None else check_eps("mdl_eps", mdl_eps)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> MosaicObjective:
        """The objective of a named preset (`OBJECTIVE_PRESETS`), with keyword overrides.

        Example:
            >>> MosaicObjective.from_preset("released").mdl_weight(10_500)
            0.5
        """
        check_option("name", name, list(OBJECTIVE_PRESETS))
        unknown = set(overrides) - set(OBJECTIVE_PRESETS[name]) - {"mdl_eps"}
        if unknown:
            raise ValueError(f"Expected overrides among {sorted(OBJECTIVE_PRESETS[name]) + ['mdl_eps']}, but got {sorted(unknown)}.")
        return cls(**{**OBJECTIVE_PRESETS[name], **overrides})

    def forward(
        self,
        model_pred: torch.Tensor,
        noise: torch.Tensor,
        latents: torch.Tensor,
        attention: CaptureResult | torch.Tensor | None,
        corr: Correspondences | None,
        step: int = 0,
        weights: torch.Tensor | None = None,
    ) -> ObjectiveOutput:
        """Evaluates eq. 15 at training ``step``.

        Args:
            model_pred: ``(B, ...)`` predicted velocity.
            noise: ``(B, ...)`` noise.
            latents: ``(B, ...)`` clean latents.
            attention: the captured attention (or dense A); may be None only when both weights
                are 0 at this step.
            corr: the correspondences; may be None only with ``attention``.
            step: the optimisation step, for the weight schedules.
            weights: ``(B,)`` per-sample weights of the flow-matching term (`flow_matching_loss`), or None.

        Returns:
            An `ObjectiveOutput` with the total and every term.
        """
        return self.combine(flow_matching_loss(model_pred, noise, latents, weights), attention, corr, step=step)

    def combine(
        self,
        diffusion_loss: torch.Tensor,
        attention: CaptureResult | torch.Tensor | None,
        corr: Correspondences | None,
        step: int = 0,
    ) -> ObjectiveOutput:
        """Eq. 15 with a diffusion loss the caller computed: ``diffusion_loss + α·SCAL + β·MDL``.

        Use it for any model and any parameterisation: compute the model's own loss (epsilon,
        v, flow or x0 prediction, with whatever timestep weighting the model is trained with),
        reduce it to a scalar, and pass it here with the captured attention. `forward` is this
        method after `flow_matching_loss`.

        Args:
            diffusion_loss: scalar (0-dim) floating tensor, the model's diffusion loss with its
                graph (e.g. ``F.mse_loss(eps_pred, noise)``).
            attention: the captured attention (`RefTargetCapture.result`) or a dense
                ``(B, N_ref_total, N_tgt)`` A; may be None only when both weights are 0 at
                ``step``.
            corr: the correspondences; may be None only with ``attention``.
            step: the optimisation step, for the weight schedules.

        Returns:
            An `ObjectiveOutput`; its ``flow_matching`` (alias ``diffusion``) is
            ``diffusion_loss`` in float32 (float64 for float64 inputs).

        Example:
            >>> # epsilon prediction, as a DDPM-trained model
            >>> import torch.nn.functional as F
            >>> corr = Correspondences.from_dicts([[{0: 0}, {0: 1}]], ref_tokens=[1, 1], tgt_tokens=2)
            >>> noise = torch.randn(1, 4, 8, 8)
            >>> eps_pred = noise + 0.1  # what the model predicted for the added noise
            >>> diffusion_loss = F.mse_loss(eps_pred, noise)
            >>> A = torch.tensor([[[0.8, 0.2], [0.2, 0.8]]])  # or capture.result()
            >>> out = MosaicObjective(scal_weight=0.4, mdl_weight=0.6).combine(diffusion_loss, A, corr, step=0)
            >>> round(out.diffusion.item(), 4), round(out.loss.item(), 4)  # 0.01 + 0.4·(-log 0.8) + 0.6·(-0.8318)
            (0.01, -0.3998)
        """
        if not isinstance(diffusion_loss, torch.Tensor) or diffusion_loss.dim() != 0 or not diffusion_loss.is_floating_point():
            got = (
                f"a {tuple(diffusion_loss.shape)} {diffusion_loss.dtype} tensor"
                if isinstance(diffusion_loss, torch.Tensor)
                else type(diffusion_loss).__name__
            )
            raise ValueError(
                f"Expected `diffusion_loss` to be a scalar (0-dim) floating tensor (reduce the per-element loss, "
                f"e.g. with .mean()), but got {got}."
            )
        check_finite("diffusion_loss", diffusion_loss)
        step = check_int("step", step, minimum=0)
        alpha, beta = self.scal_weight(step), self.mdl_weight(step)
        flow = diffusion_loss.to(compute_dtype(diffusion_loss.dtype))
        zero = flow.new_zeros(())
        if attention is None or corr is None:
            if alpha or beta:
                raise ValueError(
                    f"Expected `attention` and `corr` when a weight is non-zero (scal {alpha}, mdl {beta} at step {step}), "
                    "but got None."
                )
            return ObjectiveOutput(flow, flow, zero, zero, alpha, beta)
        scal_value = scal(attention, corr, reduction=self.scal_reduction, eps=self.scal_eps).to(flow.dtype)
        has_rows = not isinstance(attention, CaptureResult) or attention.ref_rows is not None
        if has_rows:
            mdl_value = mdl(attention, corr, self.mdl_divergence, self.mdl_aggregate, self.mdl_eps).to(flow.dtype)
        elif beta:
            raise ValueError(f"Expected `attention` captured with aggregate {self.mdl_aggregate!r} for MDL weight {beta}, but it has no rows.")
        else:
            mdl_value = zero
        total = flow + alpha * scal_value + beta * mdl_value
        return ObjectiveOutput(total, flow, scal_value, mdl_value, alpha, beta)

    def extra_repr(self) -> str:
        return (
            f"scal_weight={self.scal_weight}, mdl_weight={self.mdl_weight}, scal_reduction={self.scal_reduction!r}, "
            f"scal_eps={self.scal_eps}, mdl_divergence={self.mdl_divergence!r}, mdl_aggregate={self.mdl_aggregate!r}"
        )
