"""The MOSAIC losses: SCAL (eq. 10), MDL (eq. 11-14) and the objective of eq. 15.

Every loss exists as a function (`functional`) and as an ``nn.Module``
whose ``forward`` calls it. Nothing here knows FLUX.
"""

from . import functional
from ._mdl import MDL, MDL_DIVERGENCES, mdl
from ._scal import SCAL, SCAL_REDUCTIONS, scal
from .objective import (
    OBJECTIVE_PRESETS,
    ConstantSchedule,
    LinearRampSchedule,
    MosaicObjective,
    ObjectiveOutput,
    flow_matching_loss,
)

__all__ = [
    "MDL",
    "MDL_DIVERGENCES",
    "OBJECTIVE_PRESETS",
    "SCAL",
    "SCAL_REDUCTIONS",
    "ConstantSchedule",
    "LinearRampSchedule",
    "MosaicObjective",
    "ObjectiveOutput",
    "flow_matching_loss",
    "functional",
    "mdl",
    "scal",
]
