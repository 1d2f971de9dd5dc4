"""mosaic_kit: multi-subject personalised generation with MOSAIC.

Subpackages (import what you need):

- :mod:`mosaic_kit.correspondence`: token grids, correspondence batches, disjointness, sampling.
- :mod:`mosaic_kit.attention`: memory-efficient reference → target attention capture.
- :mod:`mosaic_kit.losses`: SCAL, MDL and the combined MOSAIC objective.
"""

__version__ = "0.1.0"
