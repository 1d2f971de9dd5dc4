"""mosaic_kit: multi-subject personalised generation with MOSAIC.

Subpackages (import what you need):

- `correspondence`: token grids, correspondence batches, disjointness, sampling.
- `attention`: memory-efficient reference → target attention capture.
- `losses`: SCAL, MDL and the combined MOSAIC objective.
"""

__version__ = "0.1.0"
