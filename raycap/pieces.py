"""The feature shards as pieces (row slices of a file and its captions file), dealt out to DDP workers each epoch."""

from __future__ import annotations

import math
from collections.abc import Callable, Container, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raycap import schema, storage
from raycap.ingest import TRAIN
from raycap.trainset import CAPTIONS, SPLIT

PIECES_PER_WORKER = 8  # a small input's row groups are sliced until each worker gets about this many pieces
SHUFFLE_PIECES = 4  # a worker's shuffle buffer mixes the rows of this many pieces (row groups) at a time


@dataclass(frozen=True)
class Piece:
    """Rows [start, stop) of one row group of one feature file (and of its captions file, row for row): the unit
    an epoch deals out to the workers."""

    path: str  # the feature file's URI
    captions: str  # its captions file's URI (trainset.py): same row groups, same rows
    row_group: int
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


def plan_pieces(files: list[tuple[str, str]], groups: list[list[int]], world: int) -> list[Piece]:
    """The row groups of `files` ((features, captions) paths; `groups`: rows of each of a file's row groups) as
    pieces; a small input's groups are sliced so each of `world` workers gets several.

    At scale a piece is a whole row group (read once an epoch). Slicing re-reads a group once per slice, which
    only happens when the whole input is smaller than world x PIECES_PER_WORKER groups' worth of slices.
    """
    total = sum(n for sizes in groups for n in sizes)
    most = max(1, math.ceil(total / (world * PIECES_PER_WORKER)))
    pieces = []
    for (path, captions), sizes in zip(files, groups):
        for index, n in enumerate(sizes):
            for start in range(0, n, most):
                pieces.append(Piece(path, captions, index, start, min(n, start + most)))
    return pieces


def deal(pieces: list[Piece], epoch: int, seed: int, rank: int, world: int) -> list[Piece]:
    """A worker's pieces for an epoch: a seeded permutation of all pieces, every `world`-th from `rank`.

    Every piece goes to exactly one worker each epoch, and to another worker, in another order, the next.
    """
    order = np.random.default_rng([seed, epoch]).permutation(len(pieces))
    return [pieces[i] for i in order[rank::world]]


def _read_group(uri: str, row_group: int, columns: list[str], storage_options: dict[str, Any] | None) -> pa.Table:
    fs, path = storage.filesystem(uri, storage_options)
    with fs.open(path, "rb") as f:
        return pq.ParquetFile(f).read_row_group(row_group, columns=columns)


def read_piece(piece: Piece, columns: list[str], storage_options: dict[str, Any] | None = None) -> pa.Table:
    """The piece's rows of the feature file's `columns`, then its captions file's split and captions columns."""
    group = _read_group(piece.path, piece.row_group, columns, storage_options)
    side = _read_group(piece.captions, piece.row_group, [SPLIT, CAPTIONS], storage_options)
    rows = group.slice(piece.start, piece.rows)
    side = side.slice(piece.start, piece.rows)
    return rows.append_column(SPLIT, side[SPLIT]).append_column(CAPTIONS, side[CAPTIONS])


def training_rows(table: pa.Table, held_out: Container[str] = ()) -> pa.Table:
    """The rows of the training side that have captions (`held_out`: training images moved to val)."""
    keep = pc.and_(pc.equal(table[SPLIT], TRAIN), pc.greater(pc.fill_null(pc.list_value_length(table[CAPTIONS]), 0), 0))
    if held_out:
        keep = pc.and_(keep, pa.array([i not in held_out for i in table[schema.IMAGE_ID].to_pylist()]))
    return table.filter(keep)


def feature_statistics(
    pieces: list[Piece],
    keep: Callable[[pa.Table], pa.Table],
    seed: int,
    images: int = 512,
    storage_options: dict[str, Any] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of the features of (up to `images`) training images (`keep`), from pieces drawn
    at random across the whole input (a store ordered by source or day would bias its first files)."""
    sums, squares, count = 0.0, 0.0, 0
    for i in np.random.default_rng(seed).permutation(len(pieces)):
        table = keep(read_piece(pieces[i], [schema.IMAGE_ID, schema.FEATURES], storage_options))
        if not len(table):
            continue
        feats = feature_array(table).astype(np.float64)
        feats = feats.reshape(-1, feats.shape[-1])
        sums = sums + feats.sum(0)
        squares = squares + (feats**2).sum(0)
        count += len(table)
        if count >= images:
            break
    if not count:
        raise ValueError("no training image with captions in the feature files")
    n = count * schema.NUM_REGIONS
    mean = sums / n
    return mean.astype(np.float32), np.sqrt(np.maximum(squares / n - mean**2, 0)).astype(np.float32)


def feature_array(table: pa.Table) -> np.ndarray:
    """A table's feature column as an (N, 64, C) array in its stored dtype (its field metadata says which)."""
    dtype, _ = schema.feature_layout(table.schema.field(schema.FEATURES))
    return schema.features_to_numpy(table[schema.FEATURES], dtype)


class WorkerFeatures:
    """One DDP worker's share of the training features, batch by batch, epoch after epoch.

    Each epoch deals the pieces out afresh (`deal`), and the worker reads its own straight from the store, the
    features and their captions side by side: no pipeline to start, no caption table in memory, the same cost
    per step at 10 thousand or 10 million images. Rows pass `keep` (the training side), then a shuffle buffer
    of SHUFFLE_PIECES pieces, seeded per epoch and rank. With `cache_bytes` > 0 and a share that fits, the
    worker reads epoch 0's share into memory and reshuffles it locally every epoch; its share then stays fixed
    (as with a DistributedSampler that is not reseeded).
    """

    def __init__(
        self,
        pieces: list[Piece],
        keep: Callable[[pa.Table], pa.Table],
        rank: int,
        world: int,
        batch_size: int,
        seed: int,
        cache_bytes: int,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        self.pieces, self.keep, self.storage_options = pieces, keep, storage_options
        self.rank, self.world, self.batch_size, self.seed, self.cache_bytes = rank, world, batch_size, seed, cache_bytes
        self.cached: pa.Table | None = None  # (N rows: image_id, features, split, captions) once it is known to fit
        self.reads = 0  # pieces read from the store

    def batches(self, epoch: int) -> Iterator[pa.Table]:
        rng = np.random.default_rng([self.seed, epoch, self.rank])
        mine = deal(self.pieces, epoch, self.seed, self.rank, self.world)
        first = None
        if self.cached is None and self.cache_bytes > 0 and mine:
            first = self._read(mine[0])
            per_row = first.nbytes / max(1, len(first))
            if per_row * sum(p.rows for p in mine) <= self.cache_bytes:  # the whole share fits: read it now
                self.cached = pa.concat_tables([first, *(self._read(p) for p in mine[1:])]).combine_chunks()
            else:
                self.cache_bytes = 0  # too big for this worker: stream every epoch
        if self.cached is not None:
            order = rng.permutation(len(self.cached))
            for start in range(0, len(order), self.batch_size):  # a batch at a time: no second copy of the share
                yield self.cached.take(order[start : start + self.batch_size])
            return
        buffer = []
        for k, piece in enumerate(mine):
            buffer.append(first if k == 0 and first is not None else self._read(piece))
            if len(buffer) >= SHUFFLE_PIECES:
                yield from self._drain(buffer, rng, keep_tail=True)
        yield from self._drain(buffer, rng, keep_tail=False)

    def _read(self, piece: Piece) -> pa.Table:
        self.reads += 1
        return self.keep(read_piece(piece, [schema.IMAGE_ID, schema.FEATURES], self.storage_options))

    def _drain(self, buffer: list[pa.Table], rng: np.random.Generator, keep_tail: bool) -> Iterator[pa.Table]:
        """Shuffled batches from the buffered pieces; with `keep_tail`, a partial last batch waits for more rows."""
        rows = pa.concat_tables(buffer) if buffer else None
        buffer.clear()
        if rows is None or len(rows) == 0:
            return
        rows = rows.take(rng.permutation(len(rows)))
        full = len(rows) - len(rows) % self.batch_size if keep_tail else len(rows)
        for start in range(0, full, self.batch_size):
            yield rows.slice(start, self.batch_size)
        if full < len(rows):
            buffer.append(rows.slice(full))
