"""Moved to `mosaic_kit.utils.finite` (kept so that old imports keep working)."""

from ..utils.finite import check_finite, finite_checks, finite_checks_enabled

__all__ = ["check_finite", "finite_checks", "finite_checks_enabled"]
