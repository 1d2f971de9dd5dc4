"""A synthetic multi-subject world whose correspondences are exact.

Every subject is drawn from an integer **identity**: its shape (a superellipse, a regular
polygon or a star), its two-tone palette and its texture (stripes, checks, dots or marbling, at
a random frequency and orientation) are fixed functions of the identity, so there are as many
subjects as integers and a model cannot memorise them. Training and held-out worlds use disjoint
identity ranges (`TRAIN_IDENTITIES`, `HELD_OUT_IDENTITIES`).

A subject lives on a **canonical frame**: normalised coordinates ``(u, v)`` in ``[-1, 1]²``,
``u`` to the right and ``v`` down; the subject fits in the disc of radius 0.95. `render_subject`
rasterises the frame as an RGBA image. A sample of `SyntheticWorld` holds

- K **references**: each subject alone on a plain background, placed by a small random
  similarity transform (rotation, scale, translation) and mildly colour-jittered with
  ``kornia.enhance``;
- one **target**: the K subjects on a procedural background, laid out on a jittered grid with
  random scale and rotation, painted in a random order so that later subjects occlude earlier
  ones;
- exact **pixel pairs** per reference: a grid of canonical points mapped through the known
  transforms into the reference and the target, kept where the point is inside the subject,
  inside both images, inside the subject's reference mask and visible in the target.

Both images are rendered from the canonical raster with ``kornia.geometry.transform.warp_affine``.
Pixel coordinates follow the project's convention: pixel ``(col, row)`` covers
``[col, col + 1) × [row, row + 1)``, its centre is ``(col + 0.5, row + 0.5)``. The transforms
in a sample's ``meta`` map canonical ``(u, v, 1)`` to pixel coordinates, so a reference point
``p`` corresponds to ``T_target @ inverse(T_reference) @ p`` in the target.

Everything is seeded: the same ``(seed, index)`` gives identical tensors, and torch's global
random state is neither used nor changed.

>>> world = SyntheticWorld(SyntheticWorldConfig(seed=3))
>>> sample = world.sample(0, num_refs=2)
>>> sample.target.shape, [tuple(ref.shape) for ref in sample.references]
(torch.Size([3, 64, 64]), [(3, 32, 32), (3, 32, 32)])

The package is split by job: ``subjects`` (identities, their descriptors and rasters) and
``world`` (composing samples, the data set, the example sheet).
"""

from .subjects import SHAPE_FAMILIES, SUBJECT_COLOURS, SUBJECT_STYLES, TEXTURES, SubjectDescriptor, render_subject, subject_descriptor
from .world import (
    BACKGROUNDS,
    WORLD_LAYOUTS,
    HELD_OUT_IDENTITIES,
    MAX_SUBJECTS,
    SYNTHETIC_PRESETS,
    TRAIN_IDENTITIES,
    SyntheticDataset,
    SyntheticWorld,
    SyntheticWorldConfig,
    save_example_sheet,
)

__all__ = [
    "BACKGROUNDS",
    "WORLD_LAYOUTS",
    "HELD_OUT_IDENTITIES",
    "MAX_SUBJECTS",
    "SHAPE_FAMILIES",
    "SUBJECT_COLOURS",
    "SUBJECT_STYLES",
    "SYNTHETIC_PRESETS",
    "TEXTURES",
    "TRAIN_IDENTITIES",
    "SubjectDescriptor",
    "SyntheticDataset",
    "SyntheticWorld",
    "SyntheticWorldConfig",
    "render_subject",
    "save_example_sheet",
    "subject_descriptor",
]
