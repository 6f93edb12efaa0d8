"""The training set as data: captions joined to the feature rows by image id, written beside them once per run.

A hash join in three steps, each a pure function over Arrow tables that train.py runs as Ray tasks:

1. scatter: every source (the feature files' image ids, each caption chunk, the split file) is cut into
   buckets by a hash of the image id;
2. join: one task per bucket attaches each feature row's captions and its side (train, val or left out);
3. gather: one task per group of feature files writes each file's captions file, row for row and row group
   for row group with the feature file, and returns what the driver needs: the row groups, counts, word
   counts of the training captions, the val images with the smallest sample keys, digests for the run's pin.

No process ever holds the whole caption table: the driver merges per-task summaries (word counts, at most
--val-images val candidates), and each training worker reads a piece's captions beside the piece's features.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import posixpath
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raycap import schema, storage
from raycap.ingest import (
    CAPTION_ROWS,
    EXCLUDED,
    SPLIT_ROWS,
    TRAIN,
    VAL,
    CaptionChunk,
    hash_side,
    read_caption_chunk,
    read_split_file,
    sample_key,
    split_hash,
)
from raycap.text import words

SPLIT, CAPTIONS, FILE, ROW_GROUP, ROW = "split", "captions", "file", "row_group", "row"
FEATURE_ROWS = pa.schema(
    [(schema.IMAGE_ID, pa.string()), (FILE, pa.int32()), (ROW_GROUP, pa.int32()), (ROW, pa.int32())]
)
CAPTIONS_FILE = pa.schema([(schema.IMAGE_ID, pa.string()), (SPLIT, pa.int8()), (CAPTIONS, pa.list_(pa.string()))])
JOINED = pa.schema([(FILE, pa.int32()), (ROW_GROUP, pa.int32()), (ROW, pa.int32()), *CAPTIONS_FILE])
FILES_PER_BUCKET = 512  # feature files per join (and gather) task: ~130 k images at extract's 256 a file
T = TypeVar("T")
MAX_BUCKETS = 256  # join tasks, and gather tasks, at most
FILES_PER_SCATTER = 64  # feature files whose image ids one scatter task reads


@dataclass(frozen=True)
class ValImage:
    """One image of the val sample and where its row is."""

    key: float  # its sample key: the sample is the val images with the smallest keys
    image_id: str
    file: int  # index into TrainSet.files
    row_group: int
    row: int  # within the row group


@dataclass
class FileSummary:
    """What a gather task learned about one feature file."""

    file: int
    groups: list[int]  # rows of each row group
    train: int  # training images (with captions)
    val: int  # val images (with captions)
    digests: dict[str, str]  # split, captions: of this file's rows


@dataclass
class GatherResult:
    """One gather task's files, and what it merged of them."""

    files: list[FileSummary]
    words: Counter  # word counts over the training captions
    val: list[ValImage]  # the val images with the smallest sample keys (at most the sample size)
    first_train: ValImage | None  # the training image with the smallest sample key (a tiny set's val image)


@dataclass
class TrainSet:
    """The joined training set as the driver knows it: no image id or caption of its own beyond the val sample."""

    files: list[tuple[str, str]]  # (feature file, its captions file), paths inside the features' filesystem
    groups: list[list[int]]  # per file: rows of each row group
    train_images: int
    val_images: int
    words: Counter  # over the training captions: the vocabulary's counts
    val_sample: list[ValImage]  # what validation scores each epoch (at most --val-images)
    held_out: tuple[str, ...] = ()  # training images moved to val (a set too small for the hash to pick one)
    digests: dict[str, str] = field(default_factory=dict)  # split, captions: of every file, in file order


def bucket_count(files: int) -> int:
    """Join tasks for `files` feature files: enough to keep each bucket small, never more than MAX_BUCKETS."""
    return max(1, min(MAX_BUCKETS, -(-files // FILES_PER_BUCKET)))


def scatter_groups(files: list[T]) -> list[list[T]]:
    """Feature files (or the caption chunks of kept text, a file each) cut into the groups scatter tasks read."""
    return [files[i : i + FILES_PER_SCATTER] for i in range(0, len(files), FILES_PER_SCATTER)]


def _partition(table: pa.Table, keys: np.ndarray, parts: int) -> list[pa.Table]:
    """`table`'s rows cut into `parts` tables by `keys` (one int per row), each keeping the rows' order."""
    order = np.argsort(keys, kind="stable")
    ends = np.cumsum(np.bincount(keys, minlength=parts))
    ordered = table.take(pa.array(order))
    return [ordered.slice(int(end - n), int(n)) for end, n in zip(ends, np.bincount(keys, minlength=parts))]


def _buckets(table: pa.Table, buckets: int) -> list[pa.Table]:
    ids = table[schema.IMAGE_ID].to_pylist()
    keys = np.fromiter((zlib.crc32(i.encode()) % buckets for i in ids), dtype=np.int64, count=len(ids))
    return _partition(table, keys, buckets)


def scatter_features(
    files: list[tuple[int, str]], buckets: int, storage_options: dict[str, Any] | None = None
) -> list[pa.Table]:
    """Every feature row of `files` ((index, URI) each) as (image_id, file, row_group, row), cut into buckets.
    Only the image_id column is read."""
    tables = []
    for index, uri in files:
        fs, path = storage.filesystem(uri, storage_options)
        with fs.open(path, "rb") as f:
            file = pq.ParquetFile(f)
            for group in range(file.num_row_groups):
                ids = file.read_row_group(group, columns=[schema.IMAGE_ID])[schema.IMAGE_ID]
                n = len(ids)
                columns = [ids.cast(pa.string()), pa.array([index] * n, pa.int32()), pa.array([group] * n, pa.int32())]
                tables.append(pa.table([*columns, pa.array(np.arange(n, dtype=np.int32))], schema=FEATURE_ROWS))
    return _buckets(pa.concat_tables(tables) if tables else FEATURE_ROWS.empty_table(), buckets)


def scatter_captions(
    chunks: list[CaptionChunk], buckets: int, storage_options: dict[str, Any] | None = None
) -> Iterator[list[pa.Table]]:
    """The (image_id, caption) rows of some caption chunks cut into buckets, a source batch at a time (a big
    captions file is never whole in the task that reads it)."""
    for chunk in chunks:
        for table in read_caption_chunk(chunk, storage_options):
            yield _buckets(table, buckets)


def scatter_split(split_file: str, buckets: int, storage_options: dict[str, Any] | None = None) -> list[pa.Table]:
    """The split file's (image_id, split) rows cut into buckets."""
    return _buckets(read_split_file(split_file, storage_options), buckets)


def _kept(captions: pa.Table, seed: int, fraction: float) -> pa.Table:
    """A seeded subset of about `fraction` of the captions, the same whatever the tasks (--max-captions)."""
    pairs = zip(captions[schema.IMAGE_ID].to_pylist(), captions[schema.CAPTION].to_pylist())
    return captions.filter(pa.array([split_hash(f"{i}\0{c}", seed, "keep:") < fraction for i, c in pairs]))


def join_bucket(
    parts: list[pa.Table], seed: int, use_split_file: bool, fraction: float, gathers: int
) -> list[pa.Table]:
    """One bucket's feature rows with their captions and side, cut into the `gathers` groups of files.

    `parts` are this bucket's tables from every scatter task, in task order (so captions keep the source order);
    a caption source's come batch by batch.
    """

    def of(kind: pa.Schema) -> pa.Table:
        tables = [t for t in parts if t.schema.names == kind.names]
        return pa.concat_tables(tables) if tables else kind.empty_table()

    rows, captions, splits = of(FEATURE_ROWS), of(CAPTION_ROWS), of(SPLIT_ROWS)
    if fraction < 1.0:
        captions = _kept(captions, seed, fraction)
    grouped = captions.group_by(schema.IMAGE_ID, use_threads=False).aggregate([(schema.CAPTION, "list")])
    ids = rows[schema.IMAGE_ID]
    found = grouped[f"{schema.CAPTION}_list"].take(pc.index_in(ids, value_set=grouped[schema.IMAGE_ID]))
    if use_split_file:
        side = splits["split"].take(pc.index_in(ids, value_set=splits[schema.IMAGE_ID])).fill_null(EXCLUDED)
    else:
        side = pa.array([hash_side(i, seed) for i in ids.to_pylist()], pa.int8())
    joined = pa.table([rows[FILE], rows[ROW_GROUP], rows[ROW], ids, side, found], schema=JOINED)
    return _partition(joined, (joined[FILE].to_numpy() % gathers).astype(np.int64), gathers)


def _digest(values: list[Any]) -> str:
    return hashlib.sha256(json.dumps(values).encode()).hexdigest()[:16]


def gather_files(
    parts: list[pa.Table],
    files: dict[int, tuple[str, str]],
    sample: int,
    seed: int,
    storage_options: dict[str, Any] | None = None,
) -> GatherResult:
    """Write each of `files` ({index: (feature URI, captions URI)}) its captions file, aligned with its rows."""
    rows = pa.concat_tables(parts) if parts else JOINED.empty_table()
    by_file = _partition(rows, rows[FILE].to_numpy().astype(np.int64), max(files, default=0) + 1)
    summaries, counts, val, first = [], Counter(), [], None
    for index, (_, captions_uri) in sorted(files.items()):
        table = by_file[index].sort_by([(ROW_GROUP, "ascending"), (ROW, "ascending")])
        groups = np.bincount(table[ROW_GROUP].to_numpy(), minlength=0).tolist() if len(table) else []
        aligned = table.select(CAPTIONS_FILE.names).cast(CAPTIONS_FILE)
        fs, path = storage.filesystem(captions_uri, storage_options)
        sink = storage.ParquetSink(fs, path, CAPTIONS_FILE, "zstd")
        offset = 0
        for n in groups:  # one row group per feature row group: a piece reads the same slice of both files
            sink.write(aligned.slice(offset, n))
            offset += n
        sink.close()
        side, caps = aligned[SPLIT].to_pylist(), aligned[CAPTIONS].to_pylist()
        group_of, row_of = table[ROW_GROUP].to_pylist(), table[ROW].to_pylist()
        train = val_count = 0
        for k, image_id in enumerate(aligned[schema.IMAGE_ID].to_pylist()):
            if not caps[k]:
                continue
            if side[k] == TRAIN:
                train += 1
                counts.update(w for c in caps[k] for w in words(c))
                image = ValImage(sample_key(image_id, seed), image_id, index, group_of[k], row_of[k])
                first = image if first is None or image.key < first.key else first
            elif side[k] == VAL:
                val_count += 1
                val.append(ValImage(sample_key(image_id, seed), image_id, index, group_of[k], row_of[k]))
        val = heapq.nsmallest(sample, val, key=lambda v: v.key)
        digests = {"split": _digest(side), "captions": _digest(caps)}
        summaries.append(FileSummary(index, groups, train, val_count, digests))
    return GatherResult(summaries, counts, val, first)


def merge(results: list[GatherResult], files: list[tuple[str, str]], sample: int) -> TrainSet:
    """The gather tasks' results as one TrainSet: files in order, counts summed, the val sample's smallest keys."""
    summaries = sorted((s for r in results for s in r.files), key=lambda s: s.file)
    counts: Counter = Counter()
    for r in results:
        counts.update(r.words)
    val = heapq.nsmallest(sample, (v for r in results for v in r.val), key=lambda v: v.key)
    trainset = TrainSet(
        files=files,
        groups=[[] for _ in files],
        train_images=sum(s.train for s in summaries),
        val_images=sum(s.val for s in summaries),
        words=counts,
        val_sample=sorted(val, key=lambda v: v.key),
        digests={k: _digest([s.digests[k] for s in summaries]) for k in ("split", "captions")},
    )
    for s in summaries:
        trainset.groups[s.file] = s.groups
    if not val and trainset.train_images > 1:  # too few images for the hash to pick a val one: hold one out
        first = min((r.first_train for r in results if r.first_train), key=lambda v: v.key)
        trainset.val_sample, trainset.held_out = [first], (first.image_id,)
        trainset.train_images, trainset.val_images = trainset.train_images - 1, 1
        trainset.digests["split"] = _digest([trainset.digests["split"], first.image_id])
    return trainset


def captions_path(root: str, feature_path: str) -> str:
    """Where a feature file's captions file goes under the run's `root`."""
    return posixpath.join(root, posixpath.basename(feature_path))
