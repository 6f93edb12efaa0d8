"""Parquet files with image bytes (Hugging Face's Image struct<bytes, path>, or a binary column): a file per shard."""

from __future__ import annotations

from collections.abc import Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from raycap import listing, storage
from raycap.sources import Piece, Sample, SourceSpec

ROW = "row"  # the column every parquet-source row carries: its row index within its file


def units(spec: SourceSpec, fs: fsspec.AbstractFileSystem, root: str, skipped: listing.Skipped) -> Iterator[str]:
    """Every .parquet file below `root` (its relative name); other files are counted as skipped."""
    for name in listing.iter_files(fs, root, skipped=skipped):
        if name.lower().endswith(".parquet"):
            yield name
        else:
            skipped.add(name, "not a .parquet file")


def image_column(schema: pa.Schema, named: str | None) -> str:
    """The column holding image bytes: `named`, else the one struct<bytes: binary, ...> (Hugging Face's
    Image feature) or the one binary column. ValueError (one line) when there is none or several."""
    if named:
        if named not in schema.names:
            raise ValueError(f"no column {named!r} (columns: {', '.join(schema.names)})")
        return named
    structs = [f.name for f in schema if pa.types.is_struct(f.type) and _is_binary(f.type, "bytes")]
    binary = [f.name for f in schema if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type)]
    found = structs or binary
    if len(found) != 1:
        what = "no image column" if not found else f"several image columns ({', '.join(found)})"
        raise ValueError(f"{what}: name one with --image-column")
    return found[0]


def _is_binary(struct: pa.StructType, name: str) -> bool:
    index = struct.get_field_index(name)
    return index >= 0 and (pa.types.is_binary(struct[index].type) or pa.types.is_large_binary(struct[index].type))


def read(
    spec: SourceSpec,
    fs: fsspec.AbstractFileSystem,
    root: str,
    planned: list[dict],
    piece: int,
    storage_options: dict | None = None,
) -> Iterator[Piece]:
    """The file's rows in pieces of `piece`, a row group's batches at a time; a row without bytes is an error
    row FILE#ROW, and a file that cannot be read (or has no image column) one error row naming it."""
    (unit,) = (p["unit"] for p in planned)
    path = storage.join(root, unit)
    shown = storage.uri(fs, path)
    try:
        f = fs.open(path, "rb")
    except FileNotFoundError:
        yield Piece(errors=[(shown, "read", "missing")])
        return
    with f:
        try:
            file = pq.ParquetFile(f)
            column = image_column(file.schema_arrow, spec.image_column)
            wanted = [column, *([spec.id_column] if spec.id_column else []), *spec.keep_columns]
            missing = [c for c in wanted if c not in file.schema_arrow.names]
            if missing:
                raise ValueError(f"no column {missing[0]!r}")
        except (pa.ArrowException, ValueError, OSError) as e:
            yield Piece(errors=[(shown, "read", f"not a readable Parquet image file: {storage.one_line(e)}")])
            return
        row = 0
        for batch in file.iter_batches(batch_size=piece, columns=list(dict.fromkeys(wanted))):
            yield _piece(spec, unit, shown, batch, column, row)
            row += batch.num_rows


def _piece(spec: SourceSpec, unit: str, shown: str, batch: pa.RecordBatch, column: str, first: int) -> Piece:
    images = batch.column(column)
    if pa.types.is_struct(images.type):
        paths = images.field("path").to_pylist() if images.type.get_field_index("path") >= 0 else None
        images = images.field("bytes")
    else:
        paths = None
    data = images.to_pylist()
    ids = batch.column(spec.id_column).to_pylist() if spec.id_column else None
    kept = {name: batch.column(name).to_pylist() for name in spec.keep_columns}
    out = Piece(types={ROW: pa.int64()} | {name: batch.schema.field(name).type for name in spec.keep_columns})
    for i, value in enumerate(data):
        row = first + i
        where = f"{shown}#{row}"
        if not value:
            named = f" (it names {paths[i]!r} instead)" if paths and paths[i] else ""
            out.errors.append((where, "read", f"no image bytes in column {column!r}{named}"))
            continue
        image_id = str(ids[i]) if ids is not None else f"{unit}/{row}"
        fields = {ROW: row} | {name: values[i] for name, values in kept.items()}
        out.samples.append(Sample(image_id, where, value, fields))
    return out
