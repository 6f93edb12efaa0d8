"""Helpers shared by the tests: feature extraction through the job entry point, caption and reference files."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jobs import extract as extract_job
from raycap import pipeline, schema, stages
from raycap.schema import CAPTIONS_SCHEMA

# A hang guard, never a speed check: a command or wait that takes this long is stuck. Far beyond (>= 10x) the
# normal time of the slowest thing a test waits for (the multinode script, ~3 minutes on 2 busy cores).
HANG_SECONDS = 1800


class MeanModel(stages.ShardModel):
    """A model stage without a model: one row per image with its mean pixel value (with Ray or without)."""

    def predict(self, pixels: np.ndarray, meta: pa.Table) -> pa.Table:
        means = np.asarray(pixels).reshape(len(pixels), -1).mean(axis=1)  # a tensor after device decoding
        return pa.table({schema.IMAGE_ID: meta[schema.IMAGE_ID], "mean": means, schema.WIDTH: meta[schema.WIDTH]})


def fsync_on_a_full_disk(fd: int) -> None:
    """os.fsync as on a full disk: the blocks of the data written do not fit (ENOSPC)."""
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class FullDiskModel(MeanModel):
    """MeanModel on a node whose disk is full: every fsync in its process fails as it would (ENOSPC)."""

    def __init__(self, **stage: Any) -> None:
        super().__init__(**stage)
        os.fsync = fsync_on_a_full_disk


def mean_job(images, output, model_cls: type = MeanModel, **settings: Any) -> pipeline.ShardJob:
    """A pipeline job of one CPU actor running `model_cls` (a model without a model) over `images`."""
    return pipeline.ShardJob(
        input=str(images),
        output=str(output),
        rows_dir=schema.FEATURES_DIR,
        model_cls=model_cls,
        model_kwargs={},
        actors=(1, 1),
        gpus_per_actor=0,
        **settings,
    )


def extract(images, output, *extra: str) -> int:
    """`jobs/extract.py` with the offline encoder: the way every test extracts features."""
    return extract_job.main(["--input", str(images), "--output", str(output), "--encoder-weights", "random", *extra])


def write_predictions(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Write rows as CAPTIONS_SCHEMA Parquet, the way `raycap caption` does.

    Each row needs image_id and caption; tokens (default: the caption's words), attention ((T, 64), default
    uniform), path (default /data/<image_id>), score (-1.0) and model_id ("test") are optional.
    """
    tokens = [r.get("tokens", r["caption"].split()) for r in rows]
    att = [
        np.asarray(r.get("attention", np.full((len(t), 64), 1 / 64)), np.float16)
        for r, t in zip(rows, tokens, strict=True)
    ]
    offsets = pa.array(np.concatenate([[0], np.cumsum([len(a) for a in att])]).astype(np.int32))
    flat = pa.array(np.concatenate([a.reshape(-1) for a in att] + [np.zeros(0, np.float16)]))
    columns = {
        "image_id": pa.array([r["image_id"] for r in rows]),
        "path": pa.array([r.get("path", "/data/" + r["image_id"]) for r in rows]),
        "caption": pa.array([r["caption"] for r in rows]),
        "tokens": pa.array(tokens, pa.list_(pa.string())),
        "score": pa.array([r.get("score", -1.0) for r in rows], pa.float32()),
        "attention": pa.ListArray.from_arrays(offsets, pa.FixedSizeListArray.from_arrays(flat, 64)),
        "width": pa.array([64] * len(rows), pa.int32()),
        "height": pa.array([48] * len(rows), pa.int32()),
        "model_id": pa.array([r.get("model_id", "test") for r in rows]),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pydict(columns, schema=CAPTIONS_SCHEMA), path)
    return path


def write_references(path: Path, captions: dict[str, list[str]]) -> Path:
    """COCO captions JSON of `{file_name: [caption, ...]}`."""
    images = [{"id": i, "file_name": name} for i, name in enumerate(captions)]
    anns = [{"image_id": i, "caption": c} for i, caps in enumerate(captions.values()) for c in caps]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "annotations": anns}))
    return path
