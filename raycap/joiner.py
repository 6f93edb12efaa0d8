"""The training set's hash join (trainset.py) as Ray tasks: scatter, join per bucket, gather per group of files.

Its own module so that the tasks' processes import Arrow and raycap's pure core only: a task function defined
beside the trainer would make every task process import torch and Ray Train to unpickle it.
"""

from __future__ import annotations

from typing import Any

import ray

from raycap import ingest, trainset
from raycap.config import TrainConfig
from raycap.trainset import TrainSet


def _returns(refs: Any, n: int) -> list[Any]:
    """A task's `n` return references as a list (Ray hands back a single reference when n is 1)."""
    return list(refs) if n > 1 else [refs]


def _values(values: list[Any]) -> Any:
    """A task's list of values as its `len(values)` returns (one return is the value itself, not a list)."""
    return values if len(values) > 1 else values[0]


def _scatter_features(files: list[tuple[int, str]], buckets: int, options: dict[str, Any]) -> Any:
    return _values(trainset.scatter_features(files, buckets, options))


def _scatter_split(split_file: str, buckets: int, options: dict[str, Any]) -> Any:
    return _values(trainset.scatter_split(split_file, buckets, options))


def _scatter_captions(chunks: list[ingest.CaptionChunk], buckets: int, options: dict[str, Any]) -> list[Any]:
    """Each bucket's rows as a list of object references, put a source batch at a time, then the row count."""
    refs: list[list[Any]] = [[] for _ in range(buckets)]
    count = 0
    for tables in trainset.scatter_captions(chunks, buckets, options):
        for bucket, table in zip(refs, tables):
            bucket.append(ray.put(table))
        count += sum(len(t) for t in tables)
    return [*refs, count]


def _join_bucket(seed: int, use_split_file: bool, fraction: float, gathers: int, *parts: Any) -> Any:
    tables = [t for p in parts for t in (ray.get(p) if isinstance(p, list) else [p])]  # a source's batches
    return _values(trainset.join_bucket(tables, seed, use_split_file, fraction, gathers))


def _gather_files(
    files: dict[int, tuple[str, str]], sample: int, seed: int, options: dict[str, Any], *parts: Any
) -> trainset.GatherResult:
    return trainset.gather_files(list(parts), files, sample, seed, options)


def _get(refs: list[Any]) -> list[Any]:
    """ray.get, with a task's own ValueError (a malformed captions or split file) as one line, not a traceback."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, ValueError):
            raise ValueError(str(e.cause)) from None
        raise


def build_trainset(config: TrainConfig, features: list[str], root: str) -> TrainSet:
    """trainset.py's hash join as Ray tasks of a CPU each: scatter every source, join each bucket, gather each
    group of feature files (its captions files written under `root`). The driver holds references and the
    gathers' summaries only."""
    options = config.storage_options
    files = [(uri, trainset.captions_path(root, uri)) for uri in features]
    chunks = ingest.caption_chunks(config.captions, options, config.caption_column)
    buckets = trainset.bucket_count(len(features))
    task = ray.remote(num_cpus=1)
    scatter = [
        _returns(task(_scatter_features).options(num_returns=buckets).remote(group, buckets, options), buckets)
        for group in trainset.scatter_groups(list(enumerate(features)))
    ]
    counted = [
        _returns(task(_scatter_captions).options(num_returns=buckets + 1).remote(c, buckets, options), buckets + 1)
        for c in trainset.scatter_groups(chunks)
    ]
    scatter += [refs[:-1] for refs in counted]
    if config.split_file:
        split = task(_scatter_split).options(num_returns=buckets).remote(config.split_file, buckets, options)
        scatter.append(_returns(split, buckets))
    fraction = 1.0
    if config.max_captions is not None:
        total = sum(_get([refs[-1] for refs in counted]))
        fraction = min(1.0, config.max_captions / max(1, total))
    gathers = buckets
    joined = [
        _returns(
            task(_join_bucket)
            .options(num_returns=gathers)
            .remote(config.seed, bool(config.split_file), fraction, gathers, *(refs[k] for refs in scatter)),
            gathers,
        )
        for k in range(buckets)
    ]
    results = _get(
        [
            task(_gather_files).remote(
                {i: files[i] for i in range(g, len(files), gathers)},
                config.val_images,
                config.seed,
                options,
                *(refs[g] for refs in joined),
            )
            for g in range(gathers)
        ]
    )
    return trainset.merge(results, files, config.val_images)
