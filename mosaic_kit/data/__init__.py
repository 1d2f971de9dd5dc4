"""Data readers.

- `mosaic_kit.data.released`: the released SemAlign-MS-Subjects200K layout (parquet shards of
  side-by-side target/reference images, masks, sample ids). Needs pyarrow (``mosaic_kit[data]``).
"""

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

__all__ = [
    "REFERENCE_BOX",
    "TARGET_BOX",
    "ReleasedRow",
    "ReleasedSample",
    "count_released_rows",
    "decode_released_row",
    "iter_released_rows",
    "iter_released_samples",
    "released_shards",
    "released_uid",
    "split_panels",
]
