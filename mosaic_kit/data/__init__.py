"""Data: readers, a multi-subject composer, collate with padding, and deterministic bad-data skipping.

Every dataset yields `MultiSubjectSample` (pixel pairs, not token indices, so that resizing and
composition carry them exactly); `collate_samples` turns a list of them into a `MosaicBatch`.

- `mosaic_kit.data.released`: the released SemAlign-MS-Subjects200K layout (parquet shards of
  side-by-side target/reference images, masks, sample ids). Needs pyarrow (``mosaic_kit[data]``).
- `mosaic_kit.data.released_dataset`: the released coordinate files and `ReleasedDataset`.
- `mosaic_kit.data.manifest`: a JSONL manifest for your own data (`read_manifest`,
  `ManifestDataset`).
- `mosaic_kit.data.composer`: K-subject composites of single-subject samples
  (`compose_samples`, `ComposedDataset`).
- `mosaic_kit.data.collate`: `collate_samples`, `MosaicBatch`, `apply_condition_dropout`.
- `mosaic_kit.data.bad` and `mosaic_kit.data.loader`: `BadSample`, `BadDataTally`, `skip_bad`,
  `ResumableSampler`, `SkippingLoader` (exact resume).
- `mosaic_kit.data.dreambench`: where the DreamBench photos are (`dreambench_root`:
  ``$MOSAIC_DREAMBENCH``, else a cache folder) and `fetch_dreambench`, which puts them there
  (``python recipes/fetch_dreambench.py``).
- `mosaic_kit.data.fixtures`: tiny data sets written on the fly (tests, examples).
- Image files: `open_image` (refuses more than `MAX_IMAGE_PIXELS` pixels from the header),
  `to_rgb` (16-bit, palette, CMYK and alpha images to RGB, alpha on `ALPHA_BACKGROUND`), masks
  (`load_mask`, `resize_mask`).
- `mosaic_kit.data.synthetic_world`: a procedural multi-subject world with exact correspondences
  (`SyntheticWorld`, `SyntheticDataset`), for CPU training and the ablation.

The SemAlign-MS data-building pipeline, which generates, scores and annotates images with models,
sits above this package, in `mosaic_kit.dataset_builder`.
"""

from ._images import ALPHA_BACKGROUND, MAX_IMAGE_PIXELS, load_mask, open_image, resize_mask, to_rgb
from .bad import BAD_SAMPLE_KINDS, BadDataTally, BadSample, skip_bad
from .collate import (
    COLLATE_DISJOINT_POLICIES,
    MosaicBatch,
    apply_condition_dropout,
    collate_samples,
)
from .composer import (
    COMPOSE_DISJOINT_POLICIES,
    PASTE_MODES,
    ComposedDataset,
    compose_caption,
    compose_samples,
    join_subjects,
)
from .dreambench import (
    DREAMBENCH_ENV,
    DREAMBENCH_FETCH_COMMAND,
    DREAMBENCH_MULTI_CASES,
    DREAMBOOTH_ARCHIVE_URL,
    DREAMBOOTH_COMMIT,
    DreamBenchNotFoundError,
    default_dreambench_dir,
    dreambench_root,
    fetch_dreambench,
    find_dreambench,
    is_dreambench_copy,
)
from .fixtures import make_manifest_fixture, make_released_fixture
from .loader import ResumableSampler, SkippingLoader
from .manifest import (
    MANIFEST_KEYS,
    ManifestDataset,
    ManifestEntry,
    load_pairs_file,
    read_manifest,
)
from .released import (
    REFERENCE_BOX,
    TARGET_BOX,
    ReleasedRow,
    ReleasedSample,
    count_released_rows,
    decode_released_row,
    iter_released_rows,
    iter_released_samples,
    released_shards,
    released_uid,
    split_panels,
)
from .released_dataset import (
    COORD_LAYOUTS,
    PANEL_SIZE,
    RELEASED_COORD_METHODS,
    ReleasedDataset,
    check_released_coords,
    load_released_coords,
    mask_to_grid,
    released_coord_path,
    released_pixel_pairs,
)
from .sample import MultiSubjectSample
from .synthetic_world import (
    BACKGROUNDS,
    WORLD_LAYOUTS,
    HELD_OUT_IDENTITIES,
    MAX_SUBJECTS,
    SHAPE_FAMILIES,
    SUBJECT_COLOURS,
    SUBJECT_STYLES,
    SYNTHETIC_PRESETS,
    TEXTURES,
    TRAIN_IDENTITIES,
    SubjectDescriptor,
    SyntheticDataset,
    SyntheticWorld,
    SyntheticWorldConfig,
    render_subject,
    save_example_sheet,
    subject_descriptor,
)

__all__ = [
    "resize_mask",
    "load_mask",
    "BAD_SAMPLE_KINDS",
    "COLLATE_DISJOINT_POLICIES",
    "COMPOSE_DISJOINT_POLICIES",
    "COORD_LAYOUTS",
    "DREAMBENCH_ENV",
    "DREAMBENCH_FETCH_COMMAND",
    "DREAMBENCH_MULTI_CASES",
    "DREAMBOOTH_ARCHIVE_URL",
    "DREAMBOOTH_COMMIT",
    "HELD_OUT_IDENTITIES",
    "MANIFEST_KEYS",
    "MAX_SUBJECTS",
    "PANEL_SIZE",
    "PASTE_MODES",
    "REFERENCE_BOX",
    "RELEASED_COORD_METHODS",
    "SHAPE_FAMILIES",
    "SUBJECT_COLOURS",
    "SUBJECT_STYLES",
    "SYNTHETIC_PRESETS",
    "TARGET_BOX",
    "TEXTURES",
    "TRAIN_IDENTITIES",
    "ALPHA_BACKGROUND",
    "MAX_IMAGE_PIXELS",
    "BadDataTally",
    "BadSample",
    "ComposedDataset",
    "DreamBenchNotFoundError",
    "ManifestDataset",
    "ManifestEntry",
    "MosaicBatch",
    "MultiSubjectSample",
    "ReleasedDataset",
    "ReleasedRow",
    "ReleasedSample",
    "ResumableSampler",
    "SkippingLoader",
    "SubjectDescriptor",
    "SyntheticDataset",
    "SyntheticWorld",
    "SyntheticWorldConfig",
    "apply_condition_dropout",
    "check_released_coords",
    "collate_samples",
    "compose_caption",
    "compose_samples",
    "count_released_rows",
    "decode_released_row",
    "default_dreambench_dir",
    "dreambench_root",
    "fetch_dreambench",
    "find_dreambench",
    "iter_released_rows",
    "is_dreambench_copy",
    "iter_released_samples",
    "join_subjects",
    "load_pairs_file",
    "load_released_coords",
    "make_manifest_fixture",
    "make_released_fixture",
    "open_image",
    "mask_to_grid",
    "read_manifest",
    "released_coord_path",
    "released_pixel_pairs",
    "released_shards",
    "released_uid",
    "render_subject",
    "save_example_sheet",
    "skip_bad",
    "split_panels",
    "subject_descriptor",
    "to_rgb",
]
