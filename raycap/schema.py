"""Every Parquet column name, pyarrow schema and on-disk layout name raycap reads or writes, in one place.

Feature tensors (64 regions x 2048 channels, float16 by default) are stored as one
``fixed_size_binary(64 * 2048 * itemsize)`` value per row, with the shape and dtype in the
field metadata. Measured in ``bench/extract.py``: a fixed-size binary column encodes and
decodes several times faster than a list-typed tensor column (Parquet writes list columns
value by value with repetition levels; fixed-size binary is one memcpy per page), which
matters at GPU rates (~2 GB/s of features). :func:`features_to_numpy` turns the column back
into a ``(N, 64, 2048)`` array without copying; pandas, DuckDB and Ray Data read it as bytes.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

NUM_REGIONS = 64  # InceptionV3's last conv block is 8 x 8
GRID = 8
FEATURE_DIM = 2048
IMAGE_SIZE = 299  # InceptionV3's input side

# Column names, shared by every job.
IMAGE_ID = "image_id"  # path relative to the input root, '/' separators: the join key
PATH = "path"  # the full URI of the source file
FEATURES = "features"
WIDTH = "width"
HEIGHT = "height"
STAGE = "stage"  # where a bad image failed: read | decode | model | write
ERROR = "error"
CAPTION = "caption"
TOKENS = "tokens"
SCORE = "score"
ATTENTION = "attention"
MODEL_ID = "model_id"

# Output layout, relative to a job's output root.
FEATURES_DIR = "features"
CAPTIONS_DIR = "captions"
ERRORS_DIR = "errors"
SHARDS_DIR = "_shards"  # one JSON commit marker per finished shard
PLAN_DIR = "_plan"  # the input listing split into shards (Parquet parts + _plan.json header), fixed on the first run
MANIFEST_FILE = "_manifest.json"  # written last: the run is complete


def feature_type(dtype: str = "float16", dim: int = FEATURE_DIM) -> pa.DataType:
    """The Arrow type of one feature tensor (64 x `dim`) stored as fixed-size bytes."""
    return pa.binary(NUM_REGIONS * dim * np.dtype(dtype).itemsize)


def features_schema(dtype: str = "float16", dim: int = FEATURE_DIM) -> pa.Schema:
    """Schema of ``features/*.parquet`` (`dim` < 2048 only for reduced synthetic features in tests and benches)."""
    meta = {"shape": json.dumps([NUM_REGIONS, dim]), "dtype": dtype}
    return pa.schema(
        [
            pa.field(IMAGE_ID, pa.string(), nullable=False),
            pa.field(PATH, pa.string(), nullable=False),
            pa.field(FEATURES, feature_type(dtype, dim), nullable=False, metadata=meta),
            pa.field(WIDTH, pa.int32(), nullable=False),
            pa.field(HEIGHT, pa.int32(), nullable=False),
        ]
    )


ERRORS_SCHEMA = pa.schema(
    [
        pa.field(PATH, pa.string(), nullable=False),
        pa.field(STAGE, pa.string(), nullable=False),
        pa.field(ERROR, pa.string(), nullable=False),
    ]
)

CAPTIONS_SCHEMA = pa.schema(
    [
        pa.field(IMAGE_ID, pa.string(), nullable=False),
        pa.field(PATH, pa.string(), nullable=False),
        pa.field(CAPTION, pa.string(), nullable=False),
        pa.field(TOKENS, pa.list_(pa.string()), nullable=False),
        pa.field(SCORE, pa.float32(), nullable=False),  # mean log-probability per generated token
        pa.field(ATTENTION, pa.list_(pa.list_(pa.float16(), NUM_REGIONS)), nullable=False),  # (T, 64)
        pa.field(WIDTH, pa.int32(), nullable=False),
        pa.field(HEIGHT, pa.int32(), nullable=False),
        pa.field(MODEL_ID, pa.string(), nullable=False),
    ]
)


def feature_layout(field: pa.Field) -> tuple[str, int]:
    """(dtype, channels) of a stored feature column, from its field metadata (float16 x 2048 when it has none)."""
    meta = field.metadata or {}
    dtype = meta.get(b"dtype", b"float16").decode()
    shape = json.loads(meta[b"shape"]) if b"shape" in meta else [NUM_REGIONS, FEATURE_DIM]
    return dtype, int(shape[1])


def features_to_numpy(column: pa.Array | pa.ChunkedArray | list[bytes], dtype: str = "float16") -> np.ndarray:
    """Turn a stored feature column into an ``(N, 64, C)`` array, C = 2048 (zero-copy for one Arrow chunk)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if isinstance(column, pa.FixedSizeBinaryArray):
        if column.null_count:
            raise ValueError("feature column has nulls")
        buf = column.buffers()[1]
        width = column.type.byte_width
        flat = np.frombuffer(buf, dtype=np.uint8, count=width * len(column), offset=column.offset * width)
    else:
        flat = np.frombuffer(b"".join(bytes(v) for v in column), dtype=np.uint8)
    return flat.view(dtype).reshape(len(column), NUM_REGIONS, -1)


def features_to_arrow(features: np.ndarray, dtype: str = "float16") -> pa.FixedSizeBinaryArray:
    """Store an ``(N, 64, C)`` array as a fixed-size binary column over the array's own memory (no copy
    when it is already contiguous in `dtype`; the column keeps the array alive)."""
    arr = np.ascontiguousarray(features.astype(dtype, copy=False)).reshape(len(features), -1)
    buf = pa.py_buffer(arr.view(np.uint8))
    return pa.FixedSizeBinaryArray.from_buffers(feature_type(dtype, features.shape[-1]), len(arr), [None, buf])
