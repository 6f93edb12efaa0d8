"""Input stores behind one interface: list a store's units (planned into shards), read a shard's samples.

A source kind is a module here (files, webdataset, parquet, index) with two functions:

    units(spec, fs, root, skipped)         -> Iterator[Unit]      what the plan lists, in listing order
    read(spec, fs, root, units, piece)     -> Iterator[Piece]     a shard's samples, at most `piece` at a time

A unit is one file for `files` and `list` (so a shard holds many) and one container for `webdataset` (a tar)
and `parquet` (a file), which is then a shard of its own. Everything below the plan (pipeline, markers,
writers) sees only pieces: samples (id, display path, bytes, kept fields) and error rows.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import Any

import fsspec

from raycap import listing, storage

FORMATS = ("auto", "files", "webdataset", "parquet", "list")  # --input-format
PACKED = frozenset({"webdataset", "parquet"})  # one container per shard; its images are known once it is read
PIECE_IMAGES = 256  # images of a packed shard decoded and written at a time: the per-shard memory bound
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")  # a sample's image, in this order
INDEX_EXTENSIONS = (".parquet", ".csv", ".tsv", ".txt")  # an --input file of these is an index (list)
DETECT_NAMES = 1000  # names of the listing's head that `detect` looks at


@dataclass(frozen=True)
class SourceSpec:
    """What the user said about the input store; stored in the plan and shipped to every task and actor."""

    format: str = "auto"  # files | webdataset | parquet | list | auto (decided from the listing)
    image_key: str | None = None  # webdataset: the member extension holding the image (default: first image one)
    image_column: str | None = None  # parquet: the image column (default: the struct<bytes, path> or binary one)
    id_column: str | None = None  # parquet: a column whose values are the image ids (default FILE/ROW)
    path_column: str = "path"  # list: the index's column of URIs
    keep_columns: tuple[str, ...] = ()  # fields of the store carried into every output row

    def to_dict(self) -> dict[str, Any]:
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SourceSpec:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in d.items() if k in known}
        values["keep_columns"] = tuple(values.get("keep_columns", ()))
        return cls(**values)

    @property
    def packed(self) -> bool:
        return self.format in PACKED


@dataclass
class Sample:
    """One image of a store: its id, the path shown to users (and in error rows), its bytes, its kept fields."""

    image_id: str
    path: str
    data: bytes
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass
class Piece:
    """Up to PIECE_IMAGES samples of one shard, and the error rows (path, stage, message) found beside them."""

    samples: list[Sample] = field(default_factory=list)
    errors: list[tuple[str, str, str]] = field(default_factory=list)
    types: dict[str, Any] = field(default_factory=dict)  # Arrow types of the samples' fields (others: inferred)


def module(kind: str) -> Any:
    """The module that lists and reads `kind` (imported on use: a worker loads only the kind it serves)."""
    import importlib

    return importlib.import_module(f"raycap.sources.{'index' if kind == 'list' else kind}")


def units(spec: SourceSpec, fs: fsspec.AbstractFileSystem, root: str, skipped: listing.Skipped) -> Iterator[Any]:
    """The units to plan (a relative name, or for `list` a (URI, fields) pair), in listing order."""
    return module(spec.format).units(spec, fs, root, skipped)


def read(
    spec: SourceSpec,
    fs: fsspec.AbstractFileSystem,
    root: str,
    planned: list[dict],
    piece: int,
    storage_options: dict | None = None,
) -> Iterator[Piece]:
    """A shard's samples and error rows, in pieces of at most `piece` samples. `planned` are the shard's plan
    rows ({"unit", "fields"}); `storage_options` open the other stores an index names."""
    return module(spec.format).read(spec, fs, root, planned, piece, storage_options)


def extension(name: str) -> str:
    return posixpath.splitext(name)[1].lower()


def detect(fs: fsspec.AbstractFileSystem, root: str, spec: SourceSpec) -> tuple[str, str]:
    """(format, why) for --input-format auto, from what the head of the listing holds; a folder of both tars
    or Parquet files and loose images is one error asking for the flag."""
    if storage.is_file(fs, root):
        if extension(root) in INDEX_EXTENSIONS:
            return "list", f"a {extension(root)} file: an index of URIs"
        raise ValueError(
            f"--input {storage.uri(fs, root)} is a file; an index of URIs must end in "
            f"{', '.join(INDEX_EXTENSIONS)} (or pass a folder)"
        )
    seen = {"tar": 0, "parquet": 0, "image": 0, "other": 0}
    for i, name in enumerate(listing.iter_files(fs, root, skipped=listing.Skipped())):
        if i >= DETECT_NAMES:
            break
        ext = extension(name)
        if ext in (".tar", ".parquet"):
            seen[ext[1:]] += 1
        else:
            seen["image" if ext[1:] in IMAGE_EXTENSIONS else "other"] += 1
    if seen["tar"] and not seen["image"]:
        return "webdataset", f"{seen['tar']} .tar files"
    if seen["parquet"] and not seen["image"] and not seen["tar"]:
        return "parquet", f"{seen['parquet']} .parquet files"
    if (seen["tar"] or seen["parquet"]) and seen["image"]:
        raise ValueError(
            f"--input {storage.uri(fs, root)} holds both loose images and .tar/.parquet files; "
            "pass --input-format files, webdataset or parquet"
        )
    return "files", "loose files"
