"""Training input, pure: caption sources read a chunk at a time, the split by a seeded hash, a batch's captions."""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from raycap import schema, storage

if TYPE_CHECKING:
    import torch

CAPTION_ROWS = pa.schema([(schema.IMAGE_ID, pa.string()), (schema.CAPTION, pa.string())])  # a source's rows
SPLIT_ROWS = pa.schema([(schema.IMAGE_ID, pa.string()), ("split", pa.int8())])  # a --split-file's rows
TRAIN, VAL, EXCLUDED = 0, 1, -1  # an image's side: the split column's values
VAL_FRACTION = 0.05  # share of images that a seeded hash of their id assigns to val
CSV_BLOCK = 16 << 20  # bytes of a captions CSV parsed at a time: a big table never sits whole in one process


@dataclass(frozen=True)
class CaptionChunk:
    """One readable part of a caption source: a whole JSON/CSV/Parquet file, or one extract output's feature file."""

    kind: str  # coco | csv | parquet | kept
    uri: str
    column: str = "txt"  # kept: the text column of the feature rows


def caption_chunks(
    location: str, storage_options: dict[str, Any] | None = None, caption_column: str = "txt"
) -> list[CaptionChunk]:
    """What to read of `--captions`: COCO captions JSON, a CSV/Parquet table of (file_name | image_id | path,
    caption), or an extract output folder whose feature rows kept a text column (`caption_column`)."""
    fs, path = storage.filesystem(location, storage_options)
    if fs.isdir(path):
        folder = storage.join(path, schema.FEATURES_DIR)
        shards = sorted(p for p in fs.ls(folder, detail=False) if p.endswith(".parquet")) if fs.isdir(folder) else []
        if not shards:
            raise ValueError(f"--captions {location} is a folder without {schema.FEATURES_DIR}/*.parquet")
        names = pq.read_schema(shards[0], filesystem=fs).names
        if caption_column not in names:
            raise ValueError(
                f"--captions {location}: its feature rows have no {caption_column!r} column (--caption-column)"
            )
        return [CaptionChunk("kept", storage.uri(fs, p), caption_column) for p in shards]
    kind = "coco" if location.endswith(".json") else "parquet" if location.endswith(".parquet") else "csv"
    return [CaptionChunk(kind, location)]


def _pairs(ids: list[Any], captions: list[Any]) -> pa.Table:
    """(image id, caption) rows; ids keep '/' separators, empty captions are dropped."""
    kept = [(str(i).replace(os.sep, "/"), str(c)) for i, c in zip(ids, captions) if c is not None and str(c).strip()]
    return pa.table([[i for i, _ in kept], [c for _, c in kept]], schema=CAPTION_ROWS)


def _table_key(names: list[str], location: str) -> str:
    key = next((c for c in ("file_name", "image_id", "path") if c in names), None)
    if key is None or schema.CAPTION not in names:
        raise ValueError(f"--captions {location} needs columns (file_name | image_id | path, caption)")
    return key


def read_caption_chunk(chunk: CaptionChunk, storage_options: dict[str, Any] | None = None) -> Iterator[pa.Table]:
    """A chunk's (image_id, caption) rows, a batch at a time; one ValueError line for a malformed source."""
    if chunk.kind == "kept":
        fs, path = storage.filesystem(chunk.uri, storage_options)
        with fs.open(path, "rb") as f:
            file = pq.ParquetFile(f)
            if chunk.column not in file.schema_arrow.names:
                raise ValueError(f"--captions: {chunk.uri} has no {chunk.column!r} column (--caption-column)")
            for batch in file.iter_batches(columns=[schema.IMAGE_ID, chunk.column]):
                ids, texts = batch.column(0).to_pylist(), batch.column(1).to_pylist()
                flat = [(i, c) for i, t in zip(ids, texts) for c in (t if isinstance(t, list) else [t])]
                yield _pairs([i for i, _ in flat], [c for _, c in flat])
        return
    if chunk.kind == "coco":
        data = storage.read_bytes(chunk.uri, storage_options, "--captions")
        try:
            coco = json.loads(data)
            names = {im["id"]: im["file_name"] for im in coco["images"]}
            pairs = [(names[a["image_id"]], a["caption"]) for a in coco["annotations"]]
        except json.JSONDecodeError as e:
            raise ValueError(f"--captions {chunk.uri} is not JSON ({e})") from None
        except (KeyError, TypeError) as e:
            raise ValueError(f"--captions {chunk.uri} is not COCO captions JSON (missing {e})") from None
        yield _pairs([n for n, _ in pairs], [c for _, c in pairs])
        return
    fs, path = storage.filesystem(chunk.uri, storage_options)
    try:
        with fs.open(path, "rb") as f:
            if chunk.kind == "parquet":
                file = pq.ParquetFile(f)
                key = _table_key(file.schema_arrow.names, chunk.uri)
                for batch in file.iter_batches(columns=[key, schema.CAPTION]):
                    yield _pairs(batch.column(0).to_pylist(), batch.column(1).to_pylist())
                return
            reader = pacsv.open_csv(f, read_options=pacsv.ReadOptions(block_size=CSV_BLOCK))
            key = _table_key(reader.schema.names, chunk.uri)
            for batch in reader:
                yield _pairs(batch.column(key).to_pylist(), batch.column(schema.CAPTION).to_pylist())
    except pa.ArrowInvalid as e:
        raise ValueError(f"--captions {chunk.uri} cannot be read as a table ({storage.one_line(e)})") from None


def load_captions(
    location: str, storage_options: dict[str, Any] | None = None, caption_column: str = "txt"
) -> dict[str, list[str]]:
    """Every caption of `--captions` by image id, in one process: for small sources and tests (training reads
    the same chunks in Ray tasks, never whole)."""
    captions: dict[str, list[str]] = {}
    for chunk in caption_chunks(location, storage_options, caption_column):
        for table in read_caption_chunk(chunk, storage_options):
            for image_id, caption in zip(table[schema.IMAGE_ID].to_pylist(), table[schema.CAPTION].to_pylist()):
                captions.setdefault(image_id, []).append(caption)
    if not captions:
        raise ValueError(f"--captions {location} holds no captions")
    return captions


def read_split_file(split_file: str, storage_options: dict[str, Any] | None = None) -> pa.Table:
    """splits.json ({"train": [ids], "val": [ids]}) as (image_id, split) rows; images it does not name are left out."""
    try:
        splits = json.loads(storage.read_bytes(split_file, storage_options, "--split-file"))
        train, val = [str(i) for i in splits["train"]], [str(i) for i in splits.get("val", [])]
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"--split-file {split_file} is not JSON with a train list ({e!r})") from None
    return pa.table([train + val, [TRAIN] * len(train) + [VAL] * len(val)], schema=SPLIT_ROWS)


def split_hash(image_id: str, seed: int, salt: str = "") -> float:
    """A stable, seeded hash of an image id in [0, 1): the split of an image never depends on the other images."""
    digest = hashlib.blake2b(f"{seed}:{salt}{image_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def hash_side(image_id: str, seed: int) -> int:
    """TRAIN or VAL by the seeded hash: about VAL_FRACTION of the images are val."""
    return VAL if split_hash(image_id, seed) < VAL_FRACTION else TRAIN


def sample_key(image_id: str, seed: int) -> float:
    """The seeded order of the val sample: validation scores the val images with the smallest keys."""
    return split_hash(image_id, seed, "val-sample:")


def _pad(seqs: list[list[int]]) -> torch.Tensor:
    import torch  # here, not at the top: the join's Ray tasks import this module and never need torch

    out = torch.zeros(len(seqs), max(len(s) for s in seqs), dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s)
    return out


def caption_batch(
    image_ids: list[str], captions: dict[str, list[list[int]]]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """All captions of a batch of images, sorted by descending length and padded to the longest.

    Returns (rows of images that have captions (M,), caption ids (N, T), image index into those rows (N,),
    weights (N,)). An image's identical captions are decoded once and weighted by their count, which
    leaves the loss unchanged. Sorting makes each step run only on the captions still going.
    """
    rows, pairs = [], []
    for row, image_id in enumerate(image_ids):
        caps = captions.get(image_id)
        if not caps:
            continue
        for cap, count in Counter(tuple(c) for c in caps).items():
            pairs.append((len(rows), cap, count))
        rows.append(row)
    pairs.sort(key=lambda p: -len(p[1]))
    import torch

    return (
        torch.tensor(rows, dtype=torch.long),
        _pad([list(p[1]) for p in pairs]),
        torch.tensor([p[0] for p in pairs], dtype=torch.long),
        torch.tensor([p[2] for p in pairs], dtype=torch.float32),
    )
