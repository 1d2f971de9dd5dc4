"""Functional forms of the MOSAIC losses.

Each takes ``x`` as a :class:`~mosaic_kit.attention.CaptureResult` or a dense
``(B, N_ref_total, N_tgt)`` tensor holding A, and the
:class:`~mosaic_kit.correspondence.Correspondences`:

- :func:`scal` (eq. 10), :func:`mdl` (eq. 11-14), :func:`flow_matching_loss`.
"""

from .mdl import mdl
from .objective import flow_matching_loss
from .scal import scal

__all__ = ["flow_matching_loss", "mdl", "scal"]
