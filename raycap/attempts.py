"""Poison shards bounded: each try of a shard leaves an attempt marker, and a shard out of tries is recorded as failed.

A shard whose processing kills its worker (a segfault in a decoder, an out-of-memory kill) never returns, so Ray
restarts the actor and retries the call. Before a model actor processes a shard it records an attempt under the
output's `_shards/attempts/<shard>/` (on any URI, so every node sees it); a shard that already has SHARD_ATTEMPTS
of them is not processed again but gets a failed marker `_shards/failed/<shard>.json`, and its call returns a
marker row naming the failure. markers.finished_shards counts neither, so a rerun, which clears both first, retries
exactly the shards that did not commit.
"""

from __future__ import annotations

import contextlib
import os
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from raycap import markers, schema, storage

ATTEMPTS_ENV = "RAYCAP_SHARD_ATTEMPTS"
SHARD_ATTEMPTS = int(os.environ.get(ATTEMPTS_ENV, "3"))  # tries of one shard whose worker dies before it is failed
FAILED = "failed"  # key of a marker row whose shard is recorded as failed (its reason)
ATTEMPTS_DIR = "attempts"  # inside schema.SHARDS_DIR: one folder per shard tried, one object per try
FAILED_DIR = "failed"  # inside schema.SHARDS_DIR: one JSON per shard out of tries


class ShardsFailed(RuntimeError):
    """Shards that killed their worker SHARD_ATTEMPTS times: the other shards are committed; a rerun retries these."""


def ray_task_retries(attempts: int = SHARD_ATTEMPTS) -> int:
    """Ray's bound on retries of one model call (Ray Data's default is unbounded): room for every try of a shard
    and a shard in flight beside it on the same actor, plus the call that records the failure."""
    return 2 * attempts + 1


def _attempts_dir(root: str, shard: int) -> str:
    return storage.join(root, schema.SHARDS_DIR, ATTEMPTS_DIR, markers.shard_name(shard))


def _failed_path(root: str, shard: int) -> str:
    return storage.join(root, schema.SHARDS_DIR, FAILED_DIR, f"{markers.shard_name(shard)}.json")


def tried(fs: Any, root: str, shard: int) -> int:
    """How many tries of `shard` this run has begun."""
    folder = _attempts_dir(root, shard)
    fs.invalidate_cache(folder)
    try:
        return len(fs.ls(folder, detail=False))
    except FileNotFoundError:
        return 0


def begin(output: str, storage_options: dict[str, Any], shard: int, attempts: int = SHARD_ATTEMPTS) -> str | None:
    """Record a try of `shard` and return None, or, when it already had `attempts` tries, record it as failed and
    return the reason."""
    fs, root = storage.filesystem(output, storage_options)
    n = tried(fs, root, shard)
    if n < attempts:
        storage.write_json_atomic(fs, storage.join(_attempts_dir(root, shard), f"{uuid.uuid4().hex}.json"), {})
        return None
    reason = f"its worker died on each of {n} tries (a crash or an out-of-memory kill while processing it)"
    storage.write_json_atomic(fs, _failed_path(root, shard), {"shard": shard, "tries": n, FAILED: reason})
    return reason


def admit(output: str, storage_options: dict[str, Any], batch: pa.Table) -> tuple[pa.Table, list[dict[str, Any]]]:
    """The rows of a model call's batch (plan rows or packed shards, each with a `shard` column) still to process,
    each with a try recorded, and the marker rows of those out of tries."""
    keep, failed = [], []
    for i, shard in enumerate(batch.column("shard").to_pylist()):
        if (reason := begin(output, storage_options, shard)) is None:
            keep.append(i)
        else:
            failed.append({"shard": shard, "rows": 0, "errors": 0, "bytes": 0, FAILED: reason})
    return (batch if len(keep) == len(batch) else batch.take(pa.array(keep, pa.int64()))), failed


class _Turns:
    """Calls of one actor overlap (GPU actors take two), so a death kills every shard in flight; a shard being
    retried runs alone, so that the shard in flight beside a poison one is charged at most its first try."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._shared = 0  # calls running beside others
        self._alone = False  # a retried shard's call is running

    @contextlib.contextmanager
    def take(self, alone: bool) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._alone and (not alone or self._shared == 0))
            if alone:
                self._alone = True
            else:
                self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                if alone:
                    self._alone = False
                else:
                    self._shared -= 1
                self._cond.notify_all()


_TURNS = _Turns()  # one per process: a model actor's worker


@contextlib.contextmanager
def turn(
    output: str, storage_options: dict[str, Any], batch: pa.Table
) -> Iterator[tuple[pa.Table, list[dict[str, Any]]]]:
    """Around a model call: `admit` its batch once the call may run (alone if one of its shards is retried)."""
    fs, root = storage.filesystem(output, storage_options)
    retried = any(tried(fs, root, shard) for shard in batch.column("shard").to_pylist())
    with _TURNS.take(alone=retried):
        admitted, failed = admit(output, storage_options, batch)
        yield admitted, failed
        # Committed: its tries are forgotten, so a call Ray retries after the commit (the worker died before Ray
        # had the result) redoes it from a clean count, and only a shard that itself kills its worker fails.
        for shard in admitted.column("shard").to_pylist():
            _remove(fs, _attempts_dir(root, shard))


def _remove(fs: Any, folder: str) -> None:
    """Remove a folder if it is there. On S3 a folder is its objects, and they can go between `exists` and `rm`
    (a killed driver's last DELETE landing during the rerun): removing nothing is not an error."""
    fs.invalidate_cache(folder)
    if fs.exists(folder):
        with contextlib.suppress(FileNotFoundError):
            fs.rm(folder, recursive=True)


def clear(fs: Any, root: str) -> None:
    """Forget an earlier run's tries and failures (before a run starts): a rerun gives every unfinished shard
    SHARD_ATTEMPTS new tries."""
    for name in (ATTEMPTS_DIR, FAILED_DIR):
        _remove(fs, storage.join(root, schema.SHARDS_DIR, name))


def failure_line(failed: dict[int, str]) -> str:
    """One line naming each failed shard and why."""
    shards = "; ".join(f"{markers.shard_name(k)}: {why}" for k, why in sorted(failed.items()))
    return (
        f"{len(failed)} shard(s) failed after {SHARD_ATTEMPTS} tries ({shards}); the other shards are committed, "
        "rerun to retry these"
    )


def is_failed(marker: Any) -> bool:
    """Whether a marker row from the model stage records a failed shard."""
    return FAILED in marker and marker[FAILED] is not None
