"""Input checks shared by every package: one owner for "bad input raises `ValueError` naming the
argument, what was expected and what arrived".

These were three copies (``correspondence/_checks.py``, ``features/_checks.py`` and the private
integer check of ``data/synthetic_world/``); they live here, in the lowest layer, so that every
package may use them (`docs/architecture.md`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence

import torch

__all__ = [
    "IMAGE_RANGE_SLACK",
    "check_floating",
    "check_images",
    "check_int",
    "check_int_list",
    "check_int_pair",
    "check_option",
    "check_real",
    "check_shape",
    "check_size",
    "compute_dtype",
    "shape_str",
]

IMAGE_RANGE_SLACK = 1e-3
"""How far an image may leave [0, 1] in `check_images` (rounding of a resize or a colour conversion)."""


def shape_str(shape: Iterable[object]) -> str:
    """Formats a shape as ``(2, 8, 64)``.

    Example:
        >>> shape_str(torch.zeros(2, 3).shape)
        '(2, 3)'
    """
    return "(" + ", ".join(str(s) for s in shape) + ")"


def check_option(name: str, value: object, allowed: Sequence[object]) -> None:
    """Raises unless ``value`` is one of ``allowed``.

    Example:
        >>> check_option("reduction", "max", ("mean", "sum"))
        Traceback (most recent call last):
        ...
        ValueError: Expected `reduction` to be one of ['mean', 'sum'], but got 'max'.
    """
    if value not in allowed:
        raise ValueError(f"Expected `{name}` to be one of {list(allowed)}, but got {value!r}.")


def check_int(name: str, value: object, minimum: int | None = None, maximum: int | None = None) -> int:
    """Returns ``value`` as an int; raises unless it is an integer (not a bool; a 0-dim integer
    tensor counts) in ``[minimum, maximum]``.

    Example:
        >>> check_int("steps", torch.tensor(3), minimum=1)
        3
        >>> check_int("steps", 2.0)
        Traceback (most recent call last):
        ...
        ValueError: Expected `steps` to be an integer, but got 2.0.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if isinstance(value, torch.Tensor) and value.ndim == 0 and not value.is_floating_point() \
                and value.dtype != torch.bool:
            value = int(value)
        else:
            raise ValueError(f"Expected `{name}` to be an integer, but got {value!r}.")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"Expected `{name}` >= {minimum}, but got {value}.")
    if maximum is not None and value > maximum:
        raise ValueError(f"Expected `{name}` <= {maximum}, but got {value}.")
    return value


def check_int_pair(name: str, value: object) -> tuple[int, int]:
    """Returns ``value`` as a pair of positive ints; raises unless it is a 2-sequence of them.

    Example:
        >>> check_int_pair("grid", [4, 6])
        (4, 6)
    """
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise ValueError(f"Expected `{name}` to be a pair of integers, but got {value!r}.")
    return check_int(f"{name}[0]", value[0], minimum=1), check_int(f"{name}[1]", value[1], minimum=1)


def check_int_list(name: str, value: object, minimum: int | None = None) -> list[int]:
    """Returns ``value`` as a list of ints; raises unless it is a sequence of integers.

    Example:
        >>> check_int_list("ref_tokens", (4, 9), minimum=1)
        [4, 9]
    """
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"Expected `{name}` to be a list of integers, but got {value!r}.")
    return [check_int(f"{name}[{i}]", v, minimum=minimum) for i, v in enumerate(value)]


def check_size(name: str, value: object) -> tuple[int, int]:
    """Returns an int or a pair of ints (all >= 1) as ``(height, width)``.

    Example:
        >>> check_size("size", 32), check_size("size", (16, 24))
        ((32, 32), (16, 24))
    """
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        size = check_int(name, value, minimum=1)
        return size, size
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise ValueError(f"Expected `{name}` to be an integer or a pair of integers (height, width), but got {value!r}.")
    return check_int(f"{name}[0]", value[0], minimum=1), check_int(f"{name}[1]", value[1], minimum=1)


def check_real(name: str, value: object, low: float, high: float, high_inclusive: bool = True) -> float:
    """A finite real in ``[low, high]`` (``[low, high)`` when not ``high_inclusive``), as a float.

    Example:
        >>> check_real("sigma", 0.5, 0.0, 1.0, high_inclusive=False)
        0.5
        >>> check_real("sigma", 1.0, 0.0, 1.0, high_inclusive=False)
        Traceback (most recent call last):
        ...
        ValueError: Expected `sigma` in [0.0, 1.0), but got 1.0.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"Expected `{name}` to be a finite number, but got {value!r}.")
    above = value > high if high_inclusive else value >= high
    if value < low or above:
        bracket = "]" if high_inclusive else ")"
        raise ValueError(f"Expected `{name}` in [{low}, {high}{bracket}, but got {value!r}.")
    return float(value)


def check_shape(name: str, tensor: object, expected: Sequence[int | None], dims: str) -> None:
    """Raises unless ``tensor`` is a tensor whose shape matches ``expected``.

    Args:
        name: argument name used in the message.
        tensor: the value to check.
        expected: one entry per dimension; ``None`` accepts any size.
        dims: the symbolic layout, e.g. ``"(B, H, N_ref_total, D)"``.

    Example:
        >>> check_shape("query", torch.zeros(2, 5), [2, None], "(B, D)")
        >>> check_shape("query", torch.zeros(3, 5), [2, None], "(B, D)")
        Traceback (most recent call last):
        ...
        ValueError: Expected `query` of shape (B, D) = (2, ?), but got (3, 5).
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
    """Raises unless ``tensor`` has a floating dtype.

    Example:
        >>> check_floating("x", torch.zeros(2, dtype=torch.long))
        Traceback (most recent call last):
        ...
        ValueError: Expected `x` to have a floating dtype, but got torch.int64.
    """
    if not tensor.is_floating_point():
        raise ValueError(f"Expected `{name}` to have a floating dtype, but got {tensor.dtype}.")


def check_images(images: object, name: str = "images") -> torch.Tensor:
    """Raises unless ``images`` is a float tensor ``(B, 3, H, W)`` with B, H, W >= 1 and values in
    [0, 1] (within `IMAGE_RANGE_SLACK`; NaN fails); returns it.

    Example:
        >>> check_images(torch.full((1, 3, 4, 4), 2.0))
        Traceback (most recent call last):
        ...
        ValueError: Expected `images` with values in [0, 1], but got values in [2, 2].
    """
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"Expected `{name}` to be a torch.Tensor of shape (B, 3, H, W), but got {type(images).__name__}.")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"Expected `{name}` of shape (B, 3, H, W), but got {shape_str(images.shape)}.")
    if min(images.shape) < 1:
        raise ValueError(f"Expected `{name}` of shape (B, 3, H, W) with B, H, W >= 1, but got {shape_str(images.shape)}.")
    if not images.is_floating_point():
        raise ValueError(f"Expected `{name}` with a floating dtype (values in [0, 1]), but got {images.dtype}.")
    low, high = images.aminmax()
    # Written so that NaN fails too.
    if not (bool(low >= -IMAGE_RANGE_SLACK) and bool(high <= 1 + IMAGE_RANGE_SLACK)):
        raise ValueError(
            f"Expected `{name}` with values in [0, 1], but got values in [{float(low):.4g}, {float(high):.4g}]."
        )
    return images


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype loss math runs in: float64 for float64 inputs, float32 otherwise.

    Example:
        >>> compute_dtype(torch.bfloat16), compute_dtype(torch.float64)
        (torch.float32, torch.float64)
    """
    return torch.float64 if dtype == torch.float64 else torch.float32
