"""mosaic_kit: multi-subject personalised generation with MOSAIC.

Subpackages (import what you need):

- `correspondence`: token grids, correspondence batches, disjointness, sampling.
- `attention`: memory-efficient reference → target attention capture.
- `losses`: SCAL, MDL and the combined MOSAIC objective.

Top-level names: `finite_checks` (a context manager that turns on the non-finite checks of the
hot paths: capture, forward, losses), `finite_checks_enabled` and `check_finite`.
"""

from .utils.finite import check_finite, finite_checks, finite_checks_enabled

__all__ = ["check_finite", "finite_checks", "finite_checks_enabled"]

__version__ = "0.1.0"
