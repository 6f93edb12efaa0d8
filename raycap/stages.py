"""The pipeline's stages as plain code: read and decode a shard, the model stage (a callable class), write a shard.

pipeline.py wires these into Ray Data; here they run on Arrow tables alone, so tests drive them without Ray.
A shard enters the model stage either as a shard row (shard, units, fields), which the actor reads (through
raycap/sources, a piece at a time) and decodes itself, or packed by a decode task in front of it
(raycap/shards.py); the model stage writes the shard's rows piece by piece, its errors and then its commit
marker, and hands on only the marker.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from raycap import attempts, markers, plan, schema, shards, sources, storage
from raycap.images import DEFAULT_MAX_PIXELS, ImageError, decode_image
from raycap.sources import PIECE_IMAGES, SourceSpec


@dataclass(frozen=True)
class ShardIO:
    """Where one job's shards come from and go to: what every stage needs, shipped to each task and actor."""

    input: str  # the input store's URI (folder, prefix or index file)
    output: str  # output root
    rows_dir: str  # schema.FEATURES_DIR or schema.CAPTIONS_DIR
    storage_options: dict[str, Any] = field(default_factory=dict)
    max_pixels: int = DEFAULT_MAX_PIXELS  # decompression-bomb guard, checked before decoding
    compression: str = "none"  # Parquet compression of the output rows
    source: SourceSpec = field(default_factory=lambda: SourceSpec("files"))  # the kind of store, from the plan
    piece: int = PIECE_IMAGES  # images of a packed shard decoded and written at a time


def read_shard(io: ShardIO, shard: int, planned: list[dict], decode: bool, workers: int = 1) -> Iterator[shards.Shard]:
    """The shard's samples in pieces (one for files and URIs, PIECE_IMAGES at a time for a tar or Parquet file),
    decoded here with Pillow (`decode`, on `workers` threads) or kept as bytes for the model to decode on its
    device. A sample that fails becomes an error row; a piece's kept fields are meta columns."""
    fs, root = storage.filesystem(io.input, io.storage_options)
    for piece in sources.read(io.source, fs, root, planned, io.piece, io.storage_options):
        errors: tuple[list, list, list] = ([], [], [])
        for path, stage, message in piece.errors:
            shards.append_error(errors, path, stage, message)
        kept = _kept_fields(piece)
        if not decode:
            samples = piece.samples
            ids, paths, files = [s.image_id for s in samples], [s.path for s in samples], [s.data for s in samples]
            yield shards.of_files(shard, ids, paths, files, shards.error_table(*errors), kept)
            continue
        pixels = np.empty((len(piece.samples), *shards.PIXEL_SHAPE), dtype=np.uint8)
        meta: dict[str, list] = {name: [] for name in shards.META_SCHEMA.names}
        taken = []
        decoded = _decode_all([s.data for s in piece.samples], io.max_pixels, workers)
        for k, (sample, result) in enumerate(zip(piece.samples, decoded)):
            if isinstance(result, ImageError):
                shards.append_error(errors, sample.path, result.stage, str(result))
                continue
            pixels[len(taken)] = result.pixels
            taken.append(k)
            for name, value in zip(meta, (sample.image_id, sample.path, result.width, result.height)):
                meta[name].append(value)
        taken_rows = pa.array(taken, pa.int64())
        fields = {name: column.take(taken_rows) for name, column in kept.items()}
        table = shards.with_fields(pa.table(meta, schema=shards.META_SCHEMA), fields)
        yield shards.Shard(shard, table, shards.error_table(*errors), pixels[: len(taken)])


def _kept_fields(piece: sources.Piece) -> dict[str, pa.Array]:
    """The samples' kept fields as columns, one value per sample: typed as the source says, else inferred (text
    where all are null)."""
    columns = {}
    for name in dict.fromkeys(name for s in piece.samples for name in s.fields):
        values = [s.fields.get(name) for s in piece.samples]
        kind = piece.types.get(name)
        if kind is None:
            kind = pa.array(values).type
            kind = pa.string() if pa.types.is_null(kind) else kind
        columns[name] = pa.array(values, kind)
    return columns


def _decode_all(files: list[bytes], max_pixels: int, workers: int) -> Iterator[Any]:
    """Each file decoded (images.Decoded) or its ImageError, in order; Pillow releases the GIL while it works."""

    def one(data: bytes) -> Any:
        try:
            return decode_image(data, max_pixels=max_pixels)
        except ImageError as e:
            return e

    if workers <= 1 or len(files) <= 1:
        return map(one, files)
    with ThreadPoolExecutor(workers) as pool:
        return iter(list(pool.map(one, files)))


def _plan_rows(batch: pa.Table) -> Iterator[tuple[int, list[dict]]]:
    """(shard, its planned units) of each shard row of a batch (plan.expand_parts yields them)."""
    for shard, units, fields in zip(*(batch.column(c).to_pylist() for c in ("shard", plan.UNITS, plan.FIELDS))):
        yield shard, plan.planned_units(units, fields)


def decode_shards(batch: pa.Table, io: ShardIO, decode: str = "cpu") -> pa.Table:
    """CPU task in front of GPU actors: read each shard row's files and decode them (decode="cpu"), or pass
    their bytes on to be decoded on the actor's device (decode="device"). Only for files and URIs, whose shard
    is one piece (the actors read a tar or Parquet file themselves, a piece at a time)."""
    rows = _plan_rows(batch)
    return shards.pack([piece for shard, units in rows for piece in read_shard(io, shard, units, decode == "cpu")])


class ShardWriter:
    """Writes one shard: its rows streamed piece by piece into one Parquet file (atomic), its errors, then its
    commit marker (last). A shard with no rows has no rows file (an earlier attempt's is removed)."""

    def __init__(self, io: ShardIO, shard: int) -> None:
        self.io, self.shard = io, shard
        self.fs, self.root = storage.filesystem(io.output, io.storage_options)
        name = markers.shard_name(shard)
        self.rows_path = storage.join(self.root, io.rows_dir, f"{name}.parquet")
        self.errors_path = storage.join(self.root, schema.ERRORS_DIR, f"{name}.parquet")
        self.rows = 0
        self.errors: list[pa.Table] = []
        self.sink: storage.ParquetSink | None = None

    def add(self, rows: pa.Table | None, errors: pa.Table) -> None:
        if rows is not None and rows.num_rows:
            if self.sink is None:
                self.sink = storage.ParquetSink(self.fs, self.rows_path, rows.schema, self.io.compression)
            self.sink.write(rows)
            self.rows += rows.num_rows
        if len(errors):
            self.errors.append(errors)

    def abort(self) -> None:
        if self.sink is not None:
            self.sink.abort()

    def commit(self) -> dict[str, int]:
        written = 0
        if self.sink is not None:
            written += self.sink.close()
        else:  # an earlier attempt of this shard may have written one (an image read then, failing now)
            storage.remove_if_present(self.fs, self.rows_path)
        errors = pa.concat_tables(self.errors) if self.errors else shards.EMPTY_ERRORS
        if len(errors):
            written += storage.write_parquet_atomic(self.fs, self.errors_path, errors, "zstd")
        else:
            storage.remove_if_present(self.fs, self.errors_path)
        marker = {"shard": self.shard, "rows": self.rows, "errors": len(errors), "bytes": written}
        path = storage.join(self.root, schema.SHARDS_DIR, markers.marker_name(self.shard, self.rows, len(errors)))
        storage.write_json_atomic(self.fs, path, marker)
        return marker


def write_shard(io: ShardIO, shard: int, rows: pa.Table | None, errors: pa.Table) -> dict[str, int]:
    """Write one shard's rows and errors atomically, then its commit marker (last); returns the marker."""
    writer = ShardWriter(io, shard)
    writer.add(rows, errors)
    return writer.commit()


class ShardModel:
    """Base of the model stage: a callable class that turns shards into written rows, one marker row each.

    Subclasses load their model in `__init__` (setting `device`) and implement `predict(pixels, meta) ->
    pa.Table` for (N, 299, 299, 3) uint8 pixels (a read-only array, or a tensor on `device` when the shard
    was decoded there) and the N images' (image_id, path, width, height).

    A call takes shard rows (shard, units, fields), whose samples this actor reads a piece at a time and
    decodes itself ("cpu": Pillow on `threads` threads; "device": on `device`), or shards a decode task packed.
    Fields a piece's meta carries beyond (image_id, path, width, height) are appended to the model's rows.
    Calls may overlap (GPU actors take two at a time): forward passes take turns on the device while another
    call reads, decodes or writes.
    """

    device: Any = "cpu"  # where predict runs; shards of file bytes are decoded there

    def __init__(self, io: ShardIO, batch_size: int, threads: int | None = None, decode: str = "cpu") -> None:
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.io, self.batch_size, self.threads, self.decode_on = io, batch_size, threads or 1, decode
        self._device_turn = threading.Lock()

    def predict(self, pixels: np.ndarray, meta: pa.Table) -> pa.Table:
        raise NotImplementedError

    def __call__(self, batch: pa.Table) -> pa.Table:
        with attempts.turn(self.io.output, self.io.storage_options, batch) as (batch, written):  # a try, or failed
            return self._process(batch, written)

    def _process(self, batch: pa.Table, written: list[dict[str, Any]]) -> pa.Table:
        for shard, pieces in self._shards(batch):
            writer = ShardWriter(self.io, shard)
            try:
                for piece in pieces:
                    writer.add(*self._rows(piece))
            except BaseException:
                writer.abort()
                raise
            written.append(writer.commit())
        return pa.Table.from_pylist(written)

    def _rows(self, piece: shards.Shard) -> tuple[pa.Table | None, pa.Table]:
        """One piece's output rows (the model's, then the piece's kept fields) and its error rows."""
        if piece.encoded:
            piece = self.decode(piece)
        if not len(piece.meta):
            return None, piece.errors
        with self._device_turn:
            rows = self.predict(piece.pixels, piece.meta)
        for name in piece.meta.column_names:
            if name not in shards.META_SCHEMA.names:
                rows = rows.append_column(piece.meta.schema.field(name), piece.meta[name])
        return rows, piece.errors

    def _shards(self, batch: pa.Table) -> Iterator[tuple[int, Iterator[shards.Shard]]]:
        """(shard, its pieces) for each shard of a call."""
        if plan.UNITS not in batch.column_names:  # packed by decode tasks: one piece per row, a shard's in a row
            unpacked = shards.unpack(batch)
            for number in dict.fromkeys(s.shard for s in unpacked):
                yield number, iter([s for s in unpacked if s.shard == number])
            return
        for shard, units in _plan_rows(batch):
            yield shard, read_shard(self.io, shard, units, self.decode_on == "cpu", self.threads)

    def decode(self, shard: shards.Shard) -> shards.Shard:
        """Decode a shard's file bytes on this actor's device (CPU fallback per image)."""
        from raycap import devdecode

        return devdecode.decode_shard(shard, self.device, self.io.max_pixels)
