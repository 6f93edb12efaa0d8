"""An index of URIs (`list`): a Parquet, CSV/TSV or text file naming each image; nothing is listed."""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from raycap import listing, storage
from raycap.sources import Piece, SourceSpec, extension
from raycap.sources.files import read_paths

BATCH_ROWS = 65_536  # index rows read at a time while planning


def units(
    spec: SourceSpec, fs: fsspec.AbstractFileSystem, root: str, skipped: listing.Skipped
) -> Iterator[tuple[str, dict | None]]:
    """(URI as written, kept fields) of every index row, in the index's order, read a batch at a time."""
    shown = storage.uri(fs, root)
    if not storage.is_file(fs, root):
        raise ValueError(f"--input-format list needs --input to be an index file (Parquet, CSV, TSV or text): {shown}")
    columns = [spec.path_column, *spec.keep_columns]
    ext = extension(root)
    if ext == ".txt" and spec.keep_columns:
        raise ValueError(f"--keep-columns needs a Parquet or CSV index; {shown} is a text file of URIs")
    for batch in _batches(fs, root, ext, columns, shown):
        names = batch.column(0).to_pylist()
        kept = [batch.column(i).to_pylist() for i in range(1, batch.num_columns)]
        for row, name in enumerate(names):
            if name is None or not str(name).strip():
                skipped.add(f"{shown} row with an empty {spec.path_column}")
                continue
            fields = {c: _jsonable(v[row]) for c, v in zip(spec.keep_columns, kept)} if kept else None
            yield str(name).strip(), fields


def _batches(
    fs: fsspec.AbstractFileSystem, root: str, ext: str, columns: list[str], shown: str
) -> Iterator[pa.RecordBatch]:
    try:
        with fs.open(root, "rb") as f:
            if ext == ".parquet":
                file = pq.ParquetFile(f)
                missing = [c for c in columns if c not in file.schema_arrow.names]
                if missing:
                    names = ", ".join(file.schema_arrow.names)
                    raise ValueError(f"{shown} has no column {missing[0]!r} (columns: {names})")
                yield from file.iter_batches(batch_size=BATCH_ROWS, columns=columns)
            elif ext in (".csv", ".tsv"):
                reader = pacsv.open_csv(
                    f,
                    parse_options=pacsv.ParseOptions(delimiter="\t" if ext == ".tsv" else ","),
                    convert_options=pacsv.ConvertOptions(
                        include_columns=columns, column_types={c: pa.string() for c in columns}
                    ),
                )
                yield from reader
            else:
                for chunk in _line_chunks(f):
                    yield pa.record_batch([pa.array(chunk, pa.string())], names=columns[:1])
    except (pa.ArrowInvalid, KeyError) as e:
        raise ValueError(f"cannot read the index {shown}: {storage.one_line(e)}") from None


def _line_chunks(f: Any) -> Iterator[list[str]]:
    chunk: list[str] = []
    for line in f:
        text = line.decode("utf-8").strip()
        if text and not text.startswith("#"):
            chunk.append(text)
        if len(chunk) >= BATCH_ROWS:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _jsonable(value: Any) -> Any:
    """A kept value the plan can store as JSON: numbers, text, booleans and nulls as they are; others as text."""
    return value if value is None or isinstance(value, bool | int | float | str) else str(value)


def resolve(uri: str, index: str) -> str:
    """A URI of the index as a location: absolute paths and URIs as written, relative ones beside the index."""
    return uri if "://" in uri or uri.startswith("/") else posixpath.join(posixpath.dirname(index), uri)


def read(
    spec: SourceSpec,
    fs: fsspec.AbstractFileSystem,
    root: str,
    planned: list[dict],
    piece: int,
    storage_options: dict | None = None,
) -> Iterator[Piece]:
    """The shard's URIs read in one piece, grouped by store (an index may name several buckets)."""
    index = storage.uri(fs, root)
    groups: dict[int, tuple[fsspec.AbstractFileSystem, list[int], list[str]]] = {}
    for k, row in enumerate(planned):
        store, path = storage.filesystem(resolve(row["unit"], index), storage_options)
        groups.setdefault(id(store), (store, [], []))[1].append(k)
        groups[id(store)][2].append(path)
    out = Piece()
    for store, rows, paths in groups.values():
        part = read_paths(store, [planned[k]["unit"] for k in rows], paths, [planned[k]["fields"] for k in rows])
        out.samples += part.samples
        out.errors += part.errors
    yield out
