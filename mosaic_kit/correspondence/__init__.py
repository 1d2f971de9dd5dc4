"""Correspondences between reference and target tokens.

- `TokenGrid`: pixel ↔ latent ↔ packed token index for one image size.
- `Correspondences`: batched, padded point pairs per sample and reference, with masks
  for padded points and absent references and the global rows of eq. 9.
- `enforce_disjoint` and friends: eq. 2 (no target token claimed by two references).
- `subsample`: at most P points per reference, random or farthest-point.

This subpackage imports only torch (and einops/kornia); it knows nothing of FLUX.
"""

from .batch import Correspondences
from .disjoint import DISJOINT_POLICIES, contested_tokens, enforce_disjoint, find_conflicts, is_disjoint
from .grid import TokenGrid
from .sampling import SUBSAMPLE_METHODS, subsample

__all__ = [
    "Correspondences",
    "DISJOINT_POLICIES",
    "SUBSAMPLE_METHODS",
    "TokenGrid",
    "contested_tokens",
    "enforce_disjoint",
    "find_conflicts",
    "is_disjoint",
    "subsample",
]
