"""Training input: captions (files or a store's own text), the split by image, and a batch's captions as tensors."""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections import Counter
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import torch

from raycap import schema, storage


def kept_text(location: str, column: str, storage_options: dict[str, Any] | None = None) -> list[tuple[str, str]]:
    """(image id, caption) pairs from a column kept in the feature rows of an extract output folder.

    The column holds one caption per row (a string, e.g. a store's alt text) or several (a list of strings).
    """
    fs, root = storage.filesystem(location, storage_options)
    folder = storage.join(root, schema.FEATURES_DIR)
    shards = sorted(p for p in fs.ls(folder, detail=False) if p.endswith(".parquet")) if fs.isdir(folder) else []
    if not shards:
        raise ValueError(f"--captions {location} is a folder without {schema.FEATURES_DIR}/*.parquet")
    pairs: list[tuple[str, str]] = []
    for path in shards:  # two columns a file: the features themselves are never read
        names = pq.read_schema(path, filesystem=fs).names
        if column not in names:
            raise ValueError(f"--captions {location}: its feature rows have no {column!r} column (--caption-column)")
        table = pq.read_table(path, columns=[schema.IMAGE_ID, column], filesystem=fs)
        for image_id, text in zip(table[schema.IMAGE_ID].to_pylist(), table[column].to_pylist()):
            for caption in text if isinstance(text, list) else [text]:
                if caption is not None and str(caption).strip():
                    pairs.append((image_id, str(caption)))
    return pairs


def load_captions(
    location: str,
    max_captions: int | None = None,
    seed: int = 0,
    storage_options: dict[str, Any] | None = None,
    caption_column: str = "txt",
) -> dict[str, list[str]]:
    """Captions by image id from COCO captions JSON, a CSV/Parquet table of (file_name or path, caption), or the
    text column `caption_column` kept in the feature rows of an extract output folder.

    `location` is a local path or URI. With `max_captions`, a seeded random subset of captions is kept
    (the tutorial's 30,000 of COCO).
    """
    fs, path = storage.filesystem(location, storage_options)
    pairs: list[tuple[str, str]] = []
    if fs.isdir(path):
        pairs = kept_text(location, caption_column, storage_options)
    elif location.endswith(".json"):
        data = storage.read_bytes(location, storage_options, "--captions")
        try:
            coco = json.loads(data)
            names = {im["id"]: im["file_name"] for im in coco["images"]}
            pairs = [(names[a["image_id"]], a["caption"]) for a in coco["annotations"]]
        except json.JSONDecodeError as e:
            raise ValueError(f"--captions {location} is not JSON ({e})") from None
        except (KeyError, TypeError) as e:
            raise ValueError(f"--captions {location} is not COCO captions JSON (missing {e})") from None
    else:
        data = storage.read_bytes(location, storage_options, "--captions")
        try:
            table = (
                pq.read_table(pa.BufferReader(data))
                if location.endswith(".parquet")
                else pacsv.read_csv(pa.BufferReader(data))
            )
        except pa.ArrowInvalid as e:
            raise ValueError(f"--captions {location} cannot be read as a table ({storage.one_line(e)})") from None
        key = next((c for c in ("file_name", "image_id", "path") if c in table.column_names), None)
        if key is None or "caption" not in table.column_names:
            raise ValueError(f"--captions {location} needs columns (file_name | image_id | path, caption)")
        pairs = list(zip(table[key].to_pylist(), table["caption"].to_pylist()))
    if max_captions is not None and len(pairs) > max_captions:
        pairs = random.Random(seed).sample(pairs, max_captions)
    captions: dict[str, list[str]] = {}
    for name, caption in pairs:
        captions.setdefault(str(name).replace(os.sep, "/"), []).append(str(caption))
    if not captions:
        raise ValueError(f"--captions {location} holds no captions")
    return captions


def split_images(
    image_ids: list[str], split_file: str | None, seed: int, storage_options: dict[str, Any] | None = None
) -> tuple[list[str], list[str]]:
    """Train and val image ids: from splits.json (a local path or URI), or a seeded hash of each id (about 95/5)."""
    if split_file:
        try:
            splits = json.loads(storage.read_bytes(split_file, storage_options, "--split-file"))
            train, val = list(splits["train"]), list(splits.get("val", []))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"--split-file {split_file} is not JSON with a train list ({e!r})") from None
        known = set(image_ids)
        return [i for i in train if i in known], [i for i in val if i in known]
    ranked = sorted((split_hash(i, seed), i) for i in image_ids)
    val = [i for h, i in ranked if h < VAL_FRACTION]
    if not val and len(ranked) > 1:
        val = [ranked[0][1]]  # a tiny set still validates on one image
    held = set(val)
    return sorted(i for i in image_ids if i not in held), sorted(val)


VAL_FRACTION = 0.05  # share of images that a seeded hash of their id assigns to val


def split_hash(image_id: str, seed: int) -> float:
    """A stable, seeded hash of an image id in [0, 1): the split of an image never depends on the other images."""
    digest = hashlib.blake2b(f"{seed}:{image_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def _pad(seqs: list[list[int]]) -> torch.Tensor:
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
    return (
        torch.tensor(rows, dtype=torch.long),
        _pad([list(p[1]) for p in pairs]),
        torch.tensor([p[0] for p in pairs], dtype=torch.long),
        torch.tensor([p[2] for p in pairs], dtype=torch.float32),
    )
