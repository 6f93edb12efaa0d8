"""The wire format between pipeline stages: one shard as one Arrow row, packed and unpacked without copies."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from raycap import schema

PIXEL_SHAPE = (schema.IMAGE_SIZE, schema.IMAGE_SIZE, 3)
DATA = "data"  # meta column of encoded file bytes, present while a shard still awaits decoding on the device
META_SCHEMA = pa.schema(
    [
        (schema.IMAGE_ID, pa.string()),
        (schema.PATH, pa.string()),
        (schema.WIDTH, pa.int32()),
        (schema.HEIGHT, pa.int32()),
    ]
)

# Column names of the one-row-per-shard tables Ray Data carries between stages.
_SHARD, _META, _ERRORS, _PIXELS = "shard", "meta", "errors", "pixels"
_WIRE_SCHEMA = pa.schema(
    [
        (_SHARD, pa.int64()),
        (_META, pa.large_binary()),
        (_ERRORS, pa.large_binary()),
        (_PIXELS, pa.large_binary()),
    ]
)


def error_table(paths: list[str], stages: list[str], errors: list[str]) -> pa.Table:
    return pa.table([paths, stages, errors], schema=schema.ERRORS_SCHEMA)


EMPTY_ERRORS = error_table([], [], [])


def append_error(errors: tuple[list, list, list], path: str, stage: str, message: str) -> None:
    """Add one error row (path, stage, message on one line) to column lists for `error_table`."""
    errors[0].append(path)
    errors[1].append(stage)
    errors[2].append(" ".join(message.split())[:500])


@dataclass
class Shard:
    """One shard between the read/decode stage and the model: its images' meta, their pixels or file bytes, errors.

    `meta` lists the images still in the shard (files that failed are in `errors` instead). After the decode
    stage either `pixels` holds them decoded, or `meta` has a `data` column of their file bytes for the model
    to decode on its device.
    """

    shard: int  # index in the plan
    meta: pa.Table  # META_SCHEMA, plus DATA (large_binary) while undecoded
    errors: pa.Table = field(default_factory=lambda: EMPTY_ERRORS)  # schema.ERRORS_SCHEMA
    pixels: np.ndarray | None = None  # (N, 299, 299, 3) uint8, row i is meta row i; read-only when unpacked

    @property
    def encoded(self) -> bool:
        """Whether the images are still file bytes (meta's `data` column) awaiting decoding."""
        return DATA in self.meta.column_names


def of_files(
    shard: int,
    ids: list[str],
    paths: list[str],
    files: list[bytes],
    errors: pa.Table = EMPTY_ERRORS,
    fields: dict[str, pa.Array] | None = None,
) -> Shard:
    """A shard of file bytes awaiting decoding on the model's device (width and height: known once decoded),
    with the samples' kept `fields`."""
    unknown = [None] * len(files)
    meta = pa.table([ids, paths, unknown, unknown], schema=META_SCHEMA)
    meta = with_fields(meta, fields or {})
    meta = meta.append_column(pa.field(DATA, pa.large_binary()), pa.array(files, pa.large_binary()))
    return Shard(shard, meta, errors)


def with_fields(meta: pa.Table, fields: dict[str, pa.Array]) -> pa.Table:
    """`meta` with the samples' kept fields as further columns (carried into the output rows)."""
    for name, column in fields.items():
        meta = meta.append_column(name, column)
    return meta


def pack(shards: list[Shard]) -> pa.Table:
    """Shards -> one row each. Pixels (or file bytes, in meta) are wrapped, not copied; meta and errors become
    small Arrow IPC buffers."""
    columns = {
        _SHARD: pa.array([s.shard for s in shards], pa.int64()),
        _META: _binary([_ipc(s.meta) for s in shards]),
        _ERRORS: _binary([_ipc(s.errors) for s in shards]),
        _PIXELS: _binary([None if s.pixels is None else _pixel_buffer(s.pixels) for s in shards]),
    }
    return pa.table(columns, schema=_WIRE_SCHEMA)


def unpack(batch: pa.Table) -> list[Shard]:
    """The inverse of `pack`; pixels and tables are views of the batch's buffers (no copies)."""
    if batch.num_rows == 0:
        return []
    batch = batch.combine_chunks()
    shard_ids = batch.column(_SHARD).to_pylist()
    cells = {name: _buffers(batch.column(name).chunk(0)) for name in (_META, _ERRORS, _PIXELS)}
    out = []
    for i, shard in enumerate(shard_ids):
        meta = _from_ipc(cells[_META][i])
        pixels = cells[_PIXELS][i]
        if pixels is not None:
            pixels = np.frombuffer(pixels, dtype=np.uint8).reshape(len(meta), *PIXEL_SHAPE)
        out.append(Shard(shard=shard, meta=meta, errors=_from_ipc(cells[_ERRORS][i]), pixels=pixels))
    return out


def _ipc(table: pa.Table) -> pa.Buffer:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def _from_ipc(buffer: pa.Buffer) -> pa.Table:
    return pa.ipc.open_stream(buffer).read_all()


def _pixel_buffer(pixels: np.ndarray) -> pa.Buffer:
    if pixels.dtype != np.uint8 or pixels.shape[1:] != PIXEL_SHAPE:
        raise ValueError(f"pixels must be (N, *{PIXEL_SHAPE}) uint8, got {pixels.shape} {pixels.dtype}")
    return pa.py_buffer(np.ascontiguousarray(pixels))  # a view of the array's memory


def _binary(values: list[pa.Buffer | None]) -> pa.Array:
    """A large_binary array over existing buffers: one shard's value is usually its only one, so concatenating
    them costs a copy only when a batch holds several shards."""
    lengths = [0 if v is None else v.size for v in values]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    validity = None
    if any(v is None for v in values):
        validity = pa.array([v is not None for v in values]).buffers()[1]
    present = [v for v in values if v is not None]
    data = present[0] if len(present) == 1 else pa.py_buffer(b"".join(memoryview(v) for v in present))
    return pa.LargeBinaryArray.from_buffers(
        pa.large_binary(), len(values), [validity, pa.py_buffer(offsets), data], null_count=len(values) - len(present)
    )


def _buffers(array: pa.LargeBinaryArray) -> list[pa.Buffer | None]:
    """Each value of a large_binary array as a slice of its data buffer (pyarrow's scalar.as_buffer copies)."""
    _, offsets_buf, data = array.buffers()
    offsets = np.frombuffer(offsets_buf, dtype=np.int64)[array.offset : array.offset + len(array) + 1]
    valid = array.is_valid().to_pylist()
    return [
        data.slice(int(offsets[i]), int(offsets[i + 1] - offsets[i])) if valid[i] else None for i in range(len(array))
    ]
