"""Input checks shared by the core subpackages (private).

Every public function of ``correspondence``, ``attention`` and ``losses`` validates its inputs
with these helpers, so that a bad input raises `ValueError` naming the argument, what was
expected and what arrived.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence

import torch

__all__ = [
    "check_floating", "check_int", "check_int_list", "check_int_pair", "check_option", "check_shape", "compute_dtype", "shape_str",
]


def shape_str(shape: Iterable[object]) -> str:
    """Formats a shape as ``(2, 8, 64)``."""
    return "(" + ", ".join(str(s) for s in shape) + ")"


def check_option(name: str, value: object, allowed: Sequence[object]) -> None:
    """Raises unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"Expected `{name}` to be one of {list(allowed)}, but got {value!r}.")


def check_int(name: str, value: object, minimum: int | None = None) -> int:
    """Returns ``value`` as an int; raises unless it is an integer (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, torch.Tensor) and value.ndim == 0 and not value.is_floating_point():
            value = int(value)
        else:
            raise ValueError(f"Expected `{name}` to be an integer, but got {value!r}.")
    if minimum is not None and value < minimum:
        raise ValueError(f"Expected `{name}` >= {minimum}, but got {value}.")
    return int(value)


def check_int_pair(name: str, value: object) -> tuple[int, int]:
    """Returns ``value`` as a pair of positive ints; raises unless it is a 2-sequence of them."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise ValueError(f"Expected `{name}` to be a pair of integers, but got {value!r}.")
    return check_int(f"{name}[0]", value[0], minimum=1), check_int(f"{name}[1]", value[1], minimum=1)


def check_int_list(name: str, value: object, minimum: int | None = None) -> list[int]:
    """Returns ``value`` as a list of ints; raises unless it is a sequence of integers."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"Expected `{name}` to be a list of integers, but got {value!r}.")
    return [check_int(f"{name}[{i}]", v, minimum=minimum) for i, v in enumerate(value)]


def check_shape(name: str, tensor: object, expected: Sequence[int | None], dims: str) -> None:
    """Raises unless ``tensor`` is a tensor whose shape matches ``expected``.

    Args:
        name: argument name used in the message.
        tensor: the value to check.
        expected: one entry per dimension; ``None`` accepts any size.
        dims: the symbolic layout, e.g. ``"(B, H, N_ref_total, D)"``.
    """
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"Expected `{name}` to be a torch.Tensor {dims}, but got {type(tensor).__name__}.")
    wanted = shape_str("?" if s is None else s for s in expected)
    if tensor.ndim != len(expected):
        raise ValueError(
            f"Expected `{name}` with {len(expected)} dims {dims} = {wanted}, "
            f"but got {tensor.ndim} dims {shape_str(tensor.shape)}."
        )
    for got, want in zip(tensor.shape, expected):
        if want is not None and got != want:
            raise ValueError(f"Expected `{name}` of shape {dims} = {wanted}, but got {shape_str(tensor.shape)}.")


def check_floating(name: str, tensor: torch.Tensor) -> None:
    """Raises unless ``tensor`` has a floating dtype."""
    if not tensor.is_floating_point():
        raise ValueError(f"Expected `{name}` to have a floating dtype, but got {tensor.dtype}.")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype loss math runs in: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_real(name: str, value: object, low: float, high: float, high_inclusive: bool = True) -> float:
    """A finite real in ``[low, high]`` (``[low, high)`` when not ``high_inclusive``), as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"Expected `{name}` to be a finite number, but got {value!r}.")
    above = value > high if high_inclusive else value >= high
    if value < low or above:
        bracket = "]" if high_inclusive else ")"
        raise ValueError(f"Expected `{name}` in [{low}, {high}{bracket}, but got {value!r}.")
    return float(value)
