"""The feature shards as pieces (row slices planned from Parquet footers), dealt out to DDP workers each epoch."""

from __future__ import annotations

import math
from collections.abc import Callable, Container, Iterator
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raycap import schema

PIECES_PER_WORKER = 8  # a small input's row groups are sliced until each worker gets about this many pieces
SHUFFLE_PIECES = 4  # a worker's shuffle buffer mixes the rows of this many pieces (row groups) at a time


@dataclass(frozen=True)
class Piece:
    """Rows [start, stop) of one row group of one feature file: the unit an epoch deals out to the workers."""

    path: str  # the file's path inside the features' filesystem
    row_group: int
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class RowGroup:
    """One row group of a feature file, with the ids of its images (read from the image_id column alone)."""

    path: str
    index: int
    ids: tuple[str, ...]


def row_groups(fs: fsspec.AbstractFileSystem, features_dir: str) -> list[RowGroup]:
    """Every row group of the feature files in path order; only the image_id column is read."""
    groups = []
    for path in sorted(p for p in fs.ls(features_dir, detail=False) if p.endswith(".parquet")):
        with fs.open(path, "rb") as f:
            file = pq.ParquetFile(f)
            for index in range(file.num_row_groups):
                ids = file.read_row_group(index, columns=[schema.IMAGE_ID])[schema.IMAGE_ID].to_pylist()
                groups.append(RowGroup(path, index, tuple(ids)))
    return groups


def plan_pieces(groups: list[RowGroup], world: int) -> list[Piece]:
    """The row groups as pieces; a small input's groups are sliced so each of `world` workers gets several.

    At scale a piece is a whole row group (read once an epoch). Slicing re-reads a group once per slice, which
    only happens when the whole input is smaller than world x PIECES_PER_WORKER groups' worth of slices.
    """
    total = sum(len(g.ids) for g in groups)
    most = max(1, math.ceil(total / (world * PIECES_PER_WORKER)))
    pieces = []
    for g in groups:
        for start in range(0, len(g.ids), most):
            pieces.append(Piece(g.path, g.index, start, min(len(g.ids), start + most)))
    return pieces


def deal(pieces: list[Piece], epoch: int, seed: int, rank: int, world: int) -> list[Piece]:
    """A worker's pieces for an epoch: a seeded permutation of all pieces, every `world`-th from `rank`.

    Every piece goes to exactly one worker each epoch, and to another worker, in another order, the next.
    """
    order = np.random.default_rng([seed, epoch]).permutation(len(pieces))
    return [pieces[i] for i in order[rank::world]]


def read_piece(fs: fsspec.AbstractFileSystem, piece: Piece, columns: list[str]) -> pa.Table:
    with fs.open(piece.path, "rb") as f:
        group = pq.ParquetFile(f).read_row_group(piece.row_group, columns=columns)
    return group.slice(piece.start, piece.rows)


def keep_ids(table: pa.Table, ids: Container[str]) -> pa.Table:
    """The rows whose image id is in `ids` (a set or dict the caller holds anyway).

    A lookup per row: Arrow's `is_in` would rebuild its hash table of every id on each call, once a piece.
    """
    return table.filter(pa.array([i in ids for i in table[schema.IMAGE_ID].to_pylist()], pa.bool_()))


def feature_statistics(
    fs: fsspec.AbstractFileSystem, pieces: list[Piece], train_ids: Container[str], seed: int, images: int = 512
) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of the features of (up to `images`) training images, from pieces drawn at
    random across the whole input (a store ordered by source or day would bias its first files)."""
    sums, squares, count = np.zeros(schema.FEATURE_DIM), np.zeros(schema.FEATURE_DIM), 0
    for i in np.random.default_rng(seed).permutation(len(pieces)):
        table = keep_ids(read_piece(fs, pieces[i], [schema.IMAGE_ID, schema.FEATURES]), train_ids)
        feats = schema.features_to_numpy(table[schema.FEATURES]).astype(np.float64).reshape(-1, schema.FEATURE_DIM)
        sums += feats.sum(0)
        squares += (feats**2).sum(0)
        count += len(table)
        if count >= images:
            break
    n = max(1, count * schema.NUM_REGIONS)
    mean = sums / n
    return mean.astype(np.float32), np.sqrt(np.maximum(squares / n - mean**2, 0)).astype(np.float32)


class WorkerFeatures:
    """One DDP worker's share of the training features, batch by batch, epoch after epoch.

    Each epoch deals the pieces out afresh (`deal`), and the worker reads its own straight from the store: no
    pipeline to start, the same cost per step at 10 thousand or 10 million images. Rows pass `keep` (the
    training side), then a shuffle buffer of SHUFFLE_PIECES pieces, seeded per epoch and rank. With
    `cache_bytes` > 0 and a share that fits, the worker reads epoch 0's share into memory and reshuffles it
    locally every epoch; its share then stays fixed (as with a DistributedSampler that is not reseeded).
    """

    def __init__(
        self,
        fs: fsspec.AbstractFileSystem,
        pieces: list[Piece],
        keep: Callable[[pa.Table], pa.Table],
        rank: int,
        world: int,
        batch_size: int,
        seed: int,
        cache_bytes: int,
    ) -> None:
        self.fs, self.pieces, self.keep = fs, pieces, keep
        self.rank, self.world, self.batch_size, self.seed, self.cache_bytes = rank, world, batch_size, seed, cache_bytes
        self.cached: pa.Table | None = None  # (N rows: image_id, features) once the share is known to fit
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
        return self.keep(read_piece(self.fs, piece, [schema.IMAGE_ID, schema.FEATURES]))

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
