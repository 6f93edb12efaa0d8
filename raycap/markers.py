"""Commit markers: one object per finished shard whose name carries its counts, so one listing resumes a run."""

from __future__ import annotations

import posixpath
import re

import fsspec

from raycap import schema, storage

_MARKER = re.compile(r"^shard-(\d+)\.rows-(\d+)\.errors-(\d+)\.json$")


def shard_name(shard: int) -> str:
    return f"shard-{shard:06d}"


def marker_name(shard: int, rows: int, errors: int) -> str:
    """A commit marker's name carries its counts, so one listing tells a rerun everything it needs."""
    return f"{shard_name(shard)}.rows-{rows}.errors-{errors}.json"


def _names(fs: fsspec.AbstractFileSystem, marker_dir: str) -> list[str]:
    """The names in the marker folder (markers, and the attempts/ folder beside them), from one fresh listing."""
    exists = fs.exists(marker_dir)
    names = [posixpath.basename(p) for p in fs.ls(marker_dir, detail=False, refresh=True)] if exists else []
    fs.invalidate_cache(marker_dir)
    return names


def any_committed(fs: fsspec.AbstractFileSystem, output: str) -> bool:
    """Whether a shard of `output` is committed; read-only (finished_shards also removes a shard's duplicates)."""
    return any(_MARKER.match(n) for n in _names(fs, storage.join(output, schema.SHARDS_DIR)))


def finished_shards(fs: fsspec.AbstractFileSystem, output: str) -> dict[int, tuple[int, int]]:
    """Shard number -> (rows, errors) of each committed shard, from ONE listing of the marker names.

    A shard with two markers (a task retried after committing, with other counts) is dropped, and its markers
    removed, so it is redone.
    """
    marker_dir = storage.join(output, schema.SHARDS_DIR)
    names = _names(fs, marker_dir)
    found: dict[int, tuple[int, int]] = {}
    twice: dict[int, list[str]] = {}
    for name in names:
        m = _MARKER.match(name)
        if m is None:
            continue
        shard = int(m[1])
        if shard in found or shard in twice:
            twice.setdefault(shard, []).append(name)
        found[shard] = (int(m[2]), int(m[3]))
    for shard in twice:
        fs.rm([storage.join(marker_dir, n) for n in names if n.startswith(shard_name(shard) + ".")])
        del found[shard]
    return found
