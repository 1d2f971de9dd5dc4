"""Memory-efficient reference → target attention capture (eq. 8).

- `RefTargetCapture`: fed once per chosen block with post-RoPE reference queries and
  target keys; yields the pair log-probabilities and per-reference attention rows that SCAL and
  MDL need, without materialising attention maps.
- `PointAttentionRows`: dense rows of the annotated points only, without gradients (for the
  alignment hit-rate).
- `dense_ref_target_attention`: the dense twin (materialises A), for tests and small inputs.

Nothing here knows FLUX: the caller chooses which blocks feed the capture.
"""

from .capture import (
    AGGREGATES,
    BACKENDS,
    CaptureResult,
    RefTargetCapture,
    dense_ref_target_attention,
)
from .points import PointAttentionRows

__all__ = ["AGGREGATES", "BACKENDS", "CaptureResult", "PointAttentionRows", "RefTargetCapture", "dense_ref_target_attention"]
