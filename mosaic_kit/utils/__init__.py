"""Shared utilities, the lowest layer: every package may import them, they import only torch
(and PIL when an image is converted or saved).

- `checks`: input checks that raise `ValueError` naming the argument, what was expected and what
  arrived (`check_int`, `check_real`, `check_shape`, `check_option`, `check_images`, ...).
- `finite`: the switch for the hot paths' non-finite checks (`finite_checks`, `check_finite`;
  also exported at the top level).
- `atomic`: atomic, durable file writes (`atomic_write`, `write_text_atomic`,
  `write_bytes_atomic`, `save_image_atomic`, `fsync_dir`).
- `images`: tensor ↔ PIL conversion (`tensor_to_pil`, `pil_to_tensor`, `to_uint8`).
- `cli`: the recipes' command lines: the shared option spellings and one-line usage errors
  (`RecipeArgumentParser`, `usage_errors`; import them from `mosaic_kit.utils.cli`).
"""

from .atomic import TEMPORARY_PREFIX, atomic_write, fsync_dir, save_image_atomic, write_bytes_atomic, write_text_atomic
from .checks import (
    IMAGE_RANGE_SLACK,
    check_floating,
    check_images,
    check_int,
    check_int_list,
    check_int_pair,
    check_option,
    check_real,
    check_shape,
    check_size,
    compute_dtype,
    shape_str,
)
from .finite import check_finite, finite_checks, finite_checks_enabled
from .images import pil_to_tensor, tensor_to_pil, to_uint8

__all__ = [
    "IMAGE_RANGE_SLACK",
    "TEMPORARY_PREFIX",
    "atomic_write",
    "check_finite",
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
    "finite_checks",
    "finite_checks_enabled",
    "fsync_dir",
    "pil_to_tensor",
    "save_image_atomic",
    "shape_str",
    "tensor_to_pil",
    "to_uint8",
    "write_bytes_atomic",
    "write_text_atomic",
]
