"""Moved to `mosaic_kit.utils.checks` (kept so that old imports keep working)."""

from ..utils.checks import (  # noqa: F401
    check_floating,
    check_int,
    check_int_list,
    check_int_pair,
    check_option,
    check_real,
    check_shape,
    compute_dtype,
    shape_str,
)

__all__ = [
    "check_floating", "check_int", "check_int_list", "check_int_pair", "check_option", "check_real", "check_shape",
    "compute_dtype", "shape_str",
]
