"""The pipeline's stages as plain code: read and decode a shard, the model stage (a callable class), write a shard.

pipeline.py wires these into Ray Data; here they run on Arrow tables alone, so tests drive them without Ray.
A shard enters the model stage either as a plan row (shard, image_ids), which the actor reads and decodes
itself, or packed by a decode task in front of it (raycap/shards.py); the model stage writes the shard's rows
and errors and then its commit marker, and hands on only the marker.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from raycap import attempts, plan, schema, shards, storage
from raycap.images import DEFAULT_MAX_PIXELS, ImageError, decode_image

IMAGE_IDS = "image_ids"  # column of the plan rows (shard, image_ids) that plan.expand_parts yields


@dataclass(frozen=True)
class ShardIO:
    """Where one job's shards come from and go to: what every stage needs, shipped to each task and actor."""

    input: str  # folder or s3:// prefix of images
    output: str  # output root
    rows_dir: str  # schema.FEATURES_DIR or schema.CAPTIONS_DIR
    storage_options: dict[str, Any] = field(default_factory=dict)
    max_pixels: int = DEFAULT_MAX_PIXELS  # decompression-bomb guard, checked before decoding
    compression: str = "none"  # Parquet compression of the output rows


def read_shard(io: ShardIO, shard: int, ids: list[str], decode: bool, workers: int = 1) -> shards.Shard:
    """Read every file of one shard and decode it here with Pillow (`decode`, on `workers` threads), or keep
    its bytes for the model to decode on its device. A file that fails becomes an error row."""
    fs, root = storage.filesystem(io.input, io.storage_options)
    paths = [storage.join(root, i) for i in ids]
    contents = storage.read_objects(fs, paths)
    errors: tuple[list, list, list] = ([], [], [])
    found = []  # (image_id, display path, file bytes)
    for image_id, path, data in zip(ids, paths, contents):
        display = storage.uri(fs, path)
        if data is None or isinstance(data, OSError):
            reason = "missing" if data is None else f"{type(data).__name__}: {data}"
            shards.append_error(errors, display, "read", reason)
        else:
            found.append((image_id, display, data))
    if not decode:
        ids_found, displays, files = (list(column) for column in zip(*found)) if found else ([], [], [])
        return shards.of_files(shard, ids_found, displays, files, shards.error_table(*errors))
    pixels = np.empty((len(found), *shards.PIXEL_SHAPE), dtype=np.uint8)
    meta: dict[str, list] = {name: [] for name in shards.META_SCHEMA.names}
    for (image_id, display, _), result in zip(found, _decode_all([f[2] for f in found], io.max_pixels, workers)):
        if isinstance(result, ImageError):
            shards.append_error(errors, display, result.stage, str(result))
            continue
        pixels[len(meta[schema.IMAGE_ID])] = result.pixels
        for name, value in zip(meta, (image_id, display, result.width, result.height)):
            meta[name].append(value)
    n = len(meta[schema.IMAGE_ID])
    return shards.Shard(shard, pa.table(meta, schema=shards.META_SCHEMA), shards.error_table(*errors), pixels[:n])


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


def _plan_rows(batch: pa.Table) -> Iterator[tuple[int, list[str]]]:
    """(shard, image_ids) of each plan row of a batch (plan.expand_parts yields them)."""
    return zip(batch.column("shard").to_pylist(), batch.column(IMAGE_IDS).to_pylist())


def decode_shards(batch: pa.Table, io: ShardIO, decode: str = "cpu") -> pa.Table:
    """CPU task in front of GPU actors: read each plan row's files and decode them (decode="cpu"), or pass
    their bytes on to be decoded on the actor's device (decode="device")."""
    return shards.pack([read_shard(io, shard, ids, decode == "cpu") for shard, ids in _plan_rows(batch)])


def write_shard(io: ShardIO, shard: int, rows: pa.Table | None, errors: pa.Table) -> dict[str, int]:
    """Write one shard's rows and errors atomically, then its commit marker (last); returns the marker."""
    fs, root = storage.filesystem(io.output, io.storage_options)
    name, count, written = plan.shard_name(shard), rows.num_rows if rows is not None else 0, 0
    rows_path = storage.join(root, io.rows_dir, f"{name}.parquet")
    errors_path = storage.join(root, schema.ERRORS_DIR, f"{name}.parquet")
    for path, table in ((rows_path, rows if count else None), (errors_path, errors if len(errors) else None)):
        if table is not None:
            written += storage.write_parquet_atomic(fs, path, table, io.compression if path == rows_path else "zstd")
        else:  # an earlier attempt of this shard may have written one (an image read then, failing now)
            storage.remove_if_present(fs, path)
    marker = {"shard": shard, "rows": count, "errors": len(errors), "bytes": written}
    marker_path = storage.join(root, schema.SHARDS_DIR, plan.marker_name(shard, count, len(errors)))
    storage.write_json_atomic(fs, marker_path, marker)
    return marker


class ShardModel:
    """Base of the model stage: a callable class that turns shards into written rows, one marker row each.

    Subclasses load their model in `__init__` (setting `device`) and implement `predict(pixels, meta) ->
    pa.Table` for (N, 299, 299, 3) uint8 pixels (a read-only array, or a tensor on `device` when the shard
    was decoded there) and the N images' (image_id, path, width, height).

    A call takes plan rows (shard, image_ids), whose files this actor reads and decodes itself ("cpu": Pillow
    on `threads` threads; "device": on `device`), or shards a decode task packed. Calls may overlap (GPU
    actors take two at a time): forward passes take turns on the device while another call reads, decodes or
    writes.
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
        with attempts.turn(self.io.output, self.io.storage_options, batch) as (batch, markers):  # a try, or failed
            return self._process(batch, markers)

    def _process(self, batch: pa.Table, markers: list[dict[str, Any]]) -> pa.Table:
        for shard in self._shards(batch):
            if shard.encoded:
                shard = self.decode(shard)
            rows = None
            if len(shard.meta):
                with self._device_turn:
                    rows = self.predict(shard.pixels, shard.meta)
            markers.append(write_shard(self.io, shard.shard, rows, shard.errors))
        return pa.Table.from_pylist(markers)

    def _shards(self, batch: pa.Table) -> Iterator[shards.Shard]:
        if IMAGE_IDS not in batch.column_names:  # packed by decode tasks
            yield from shards.unpack(batch)
            return
        for shard, ids in _plan_rows(batch):
            yield read_shard(self.io, shard, ids, self.decode_on == "cpu", self.threads)

    def decode(self, shard: shards.Shard) -> shards.Shard:
        """Decode a shard's file bytes on this actor's device (CPU fallback per image)."""
        from raycap import devdecode

        return devdecode.decode_shard(shard, self.device, self.io.max_pixels)
