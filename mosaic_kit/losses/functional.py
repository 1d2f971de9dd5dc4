"""Functional forms of the MOSAIC losses.

Each takes ``x`` as a `CaptureResult` or a dense
``(B, N_ref_total, N_tgt)`` tensor holding A, and the
`Correspondences`:

- `scal` (eq. 10), `mdl` (eq. 11-14), `flow_matching_loss`.
"""

from ._mdl import mdl
from ._scal import scal
from .objective import flow_matching_loss

__all__ = ["flow_matching_loss", "mdl", "scal"]
