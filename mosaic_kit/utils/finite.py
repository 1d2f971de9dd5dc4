"""The switch for non-finite checks in hot paths (public as `mosaic_kit.finite_checks`).

Checking a tensor for NaN or inf costs a device sync (``bool(tensor.isfinite().all())``). Doing
that once per transformer block in every training step would stall a GPU, so the hot paths
(capture, forward, losses) check only while the switch is on: tests turn it on for every test,
the trainer turns it on for its first steps, and a user can turn it on with the context manager
or the environment variable ``MOSAIC_CHECK_FINITE=1`` while debugging.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

import torch

__all__ = ["check_finite", "finite_checks", "finite_checks_enabled"]

_state = threading.local()


def finite_checks_enabled() -> bool:
    """Whether `check_finite` checks now (the innermost `finite_checks`, else the environment).

    Example:
        >>> with finite_checks(True):
        ...     finite_checks_enabled()
        True
    """
    enabled = getattr(_state, "enabled", None)
    if enabled is None:
        return os.environ.get("MOSAIC_CHECK_FINITE", "0") not in ("", "0", "false", "False")
    return enabled


@contextlib.contextmanager
def finite_checks(enabled: bool = True) -> Iterator[None]:
    """Turns the non-finite checks of the hot paths on (or off) inside a ``with`` block.

    Args:
        enabled: True to check (one device sync per checked tensor), False to skip.

    Example:
        >>> import torch
        >>> with finite_checks():
        ...     check_finite("query", torch.tensor([1.0, float("nan")]))
        Traceback (most recent call last):
        ...
        ValueError: Expected `query` to hold only finite values, but got 1 NaN and 0 inf of 2 entries.
    """
    if not isinstance(enabled, bool):
        raise ValueError(f"Expected `enabled` to be a bool, but got {enabled!r}.")
    previous = getattr(_state, "enabled", None)
    _state.enabled = enabled
    try:
        yield
    finally:
        _state.enabled = previous


def check_finite(name: str, tensor: torch.Tensor, force: bool = False) -> None:
    """Raises `ValueError` naming ``name`` if ``tensor`` holds NaN or inf.

    Checks only while `finite_checks_enabled` (or with ``force=True``, for cold paths such as
    loading weights, where a sync costs nothing).

    Args:
        name: the argument or tensor name used in the message.
        tensor: any tensor; integer tensors are always finite.
        force: check even when the switch is off.
    """
    if not (force or finite_checks_enabled()):
        return
    if not isinstance(tensor, torch.Tensor) or not (tensor.is_floating_point() or tensor.is_complex()):
        return
    with torch.no_grad():
        finite = torch.isfinite(tensor)
        if bool(finite.all()):
            return
        nans = int(torch.isnan(tensor).sum())
        infs = int(torch.isinf(tensor).sum())
    raise ValueError(
        f"Expected `{name}` to hold only finite values, but got {nans} NaN and {infs} inf "
        f"of {tensor.numel()} entries."
    )
