"""Loose files in a folder or under a prefix: every listed file is a unit and an image (recognised by content)."""

from __future__ import annotations

from collections.abc import Iterator

import fsspec

from raycap import listing, storage
from raycap.sources import Piece, Sample, SourceSpec


def units(spec: SourceSpec, fs: fsspec.AbstractFileSystem, root: str, skipped: listing.Skipped) -> Iterator[str]:
    """Every file below `root`, as its id relative to it (the streaming listing)."""
    return listing.iter_files(fs, root, skipped=skipped)


def read(
    spec: SourceSpec,
    fs: fsspec.AbstractFileSystem,
    root: str,
    planned: list[dict],
    piece: int,
    storage_options: dict | None = None,
) -> Iterator[Piece]:
    """The shard's files in one piece (a shard of files is already sized to fit memory): each one's bytes, or
    an error row `read: missing` or naming why it could not be read."""
    ids = [p["unit"] for p in planned]
    yield read_paths(fs, ids, [storage.join(root, i) for i in ids])


def read_paths(fs: fsspec.AbstractFileSystem, ids: list[str], paths: list[str], fields: list | None = None) -> Piece:
    """One piece of the files at `paths` (read as literal names, retried on store errors: storage.read_objects)."""
    out = Piece()
    for k, (image_id, path, data) in enumerate(zip(ids, paths, storage.read_objects(fs, paths))):
        shown = storage.uri(fs, path)
        if data is None or isinstance(data, OSError):
            out.errors.append((shown, "read", "missing" if data is None else f"{type(data).__name__}: {data}"))
        else:
            out.samples.append(Sample(image_id, shown, data, (fields[k] or {}) if fields else {}))
    return out
