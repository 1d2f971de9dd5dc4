"""Correspondences between reference and target tokens.

- `TokenGrid`: pixel ↔ latent ↔ packed token index for one image size.
- `Correspondences`: batched, padded point pairs per sample and reference, with masks
  for padded points and absent references and the global rows of eq. 9.
- `enforce_disjoint` and friends: eq. 2 (no target token claimed by two references).
- `subsample`: at most P points per reference, random or farthest-point.
- `match_features` and its filters (`mutual_nearest`, `cycle_consistent`, `consensus`,
  `filter_by_mask`, `filter_by_score`), and `matches_to_correspondences`: dense matching of
  feature maps into correspondences, as the released data was built.
- `save_correspondences` / `load_correspondences` (the project's format),
  `save_released_dicts` / `load_released_dicts` (the released JSON format), `draw_matches`.
- `random_homographies`, `warp_images`, `transform_points`, `inside`, `pck`: exact synthetic
  ground truth for measuring matching quality on real photos (kornia warps).

This subpackage imports only torch (and einops/kornia); it knows nothing of FLUX.
"""

from .batch import Correspondences
from .disjoint import (
    DISJOINT_POLICIES,
    contested_tokens,
    enforce_disjoint,
    find_conflicts,
    is_disjoint,
)
from .drawing import draw_matches
from .grid import TokenGrid
from .io import (
    FORMAT_VERSION,
    load_correspondences,
    load_released_dicts,
    save_correspondences,
    save_released_dicts,
)
from .matching import (
    MATCH_DIRECTIONS,
    MATCH_FILTERS,
    DenseMatches,
    consensus,
    correspondences_from_features,
    cycle_consistent,
    filter_by_mask,
    filter_by_score,
    match_features,
    matches_to_correspondences,
    mutual_nearest,
)
from .sampling import SUBSAMPLE_METHODS, subsample
from .synthetic import (
    PhotometricJitter,
    colour_jitter,
    inside,
    pck,
    random_homographies,
    transform_points,
    warp_images,
)

__all__ = [
    "MATCH_DIRECTIONS",
    "MATCH_FILTERS",
    "PhotometricJitter",
    "colour_jitter",
    "Correspondences",
    "DenseMatches",
    "FORMAT_VERSION",
    "DISJOINT_POLICIES",
    "SUBSAMPLE_METHODS",
    "TokenGrid",
    "consensus",
    "contested_tokens",
    "correspondences_from_features",
    "cycle_consistent",
    "draw_matches",
    "enforce_disjoint",
    "filter_by_mask",
    "filter_by_score",
    "find_conflicts",
    "inside",
    "is_disjoint",
    "load_correspondences",
    "load_released_dicts",
    "match_features",
    "matches_to_correspondences",
    "mutual_nearest",
    "pck",
    "random_homographies",
    "save_correspondences",
    "save_released_dicts",
    "subsample",
    "transform_points",
    "warp_images",
]
