"""URIs (local paths and s3://) through fsspec/s3fs: listing, atomic writes, shard plans and commit markers."""

from __future__ import annotations

import io
import json
import os
import posixpath
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from raycap import schema


def filesystem(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and the path inside it for a local path or URI.

    S3 endpoint and credentials come from the standard AWS variables (AWS_ENDPOINT_URL included)
    unless `storage_options` says otherwise.
    """
    options = dict(storage_options or {})
    if uri.startswith(("s3://", "s3a://")):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint and "endpoint_url" not in options:
            options.setdefault("client_kwargs", {}).setdefault("endpoint_url", endpoint)
        uri = "s3://" + uri.split("://", 1)[1]
    fs, path = fsspec.core.url_to_fs(uri, **options)
    if isinstance(fs, LocalFileSystem):
        path = os.path.abspath(path)
    return fs, path.rstrip("/") or "/"


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The user-facing URI of a path inside `fs`."""
    return path if is_local(fs) else fs.unstrip_protocol(path)


def join(*parts: str) -> str:
    return posixpath.join(*parts)


def list_files(fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
    """Every file below `root` (recursive), as sorted relative ids with '/' separators.

    Hidden names (leading '.') and Parquet/Spark bookkeeping (leading '_') are skipped.
    """
    if not fs.exists(root):
        raise ValueError(f"input does not exist: {uri(fs, root)}")
    if fs.isfile(root):
        raise ValueError(f"input must be a folder or prefix, got a file: {uri(fs, root)}")
    prefix = root.rstrip("/") + "/"
    ids = []
    for path in fs.find(root, withdirs=False):
        rel = path[len(prefix) :] if path.startswith(prefix) else posixpath.basename(path)
        rel = rel.replace(os.sep, "/")
        if any(part.startswith((".", "_")) for part in rel.split("/")):
            continue
        ids.append(rel)
    return sorted(ids)


def read_bytes(location: str, storage_options: dict[str, Any] | None = None, what: str = "") -> bytes:
    """The whole content of one file at a local path or URI; a missing or unreadable one is one ValueError line.

    `what` names the flag or file in the message (e.g. "--captions").
    """
    fs, path = filesystem(location, storage_options)
    label = f"{what} {location}" if what else location
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        raise ValueError(f"{label}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"{label}: is a folder, expected a file") from None
    except Exception as e:  # noqa: BLE001 - credentials, endpoint, permissions: one line naming the URI
        raise ValueError(f"{label}: cannot read ({type(e).__name__}: {_one_line(e)})") from None


def read_text(location: str, storage_options: dict[str, Any] | None = None, what: str = "") -> str:
    return read_bytes(location, storage_options, what).decode("utf-8")


def write_bytes(location: str, data: bytes, storage_options: dict[str, Any] | None = None) -> None:
    """Write one file at a local path or URI atomically (see `write_bytes_atomic`)."""
    fs, path = filesystem(location, storage_options)
    write_bytes_atomic(fs, path, data)


def exists(location: str, storage_options: dict[str, Any] | None = None) -> bool:
    fs, path = filesystem(location, storage_options)
    return fs.exists(path)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]


def write_bytes_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Make `path` appear complete or not at all.

    Locally: write a temporary sibling, fsync, rename. On S3 an object becomes visible only when its
    upload completes, so a direct put is already atomic.
    """
    parent = posixpath.dirname(path)
    if is_local(fs):
        os.makedirs(parent, exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        fs.pipe_file(path, data)


def write_parquet_atomic(fs: fsspec.AbstractFileSystem, path: str, table: pa.Table, compression: str) -> int:
    """Serialise `table` in memory and write it atomically; returns the bytes written."""
    sink = io.BytesIO()
    pq.write_table(table, sink, compression=compression, use_dictionary=[c for c in table.column_names
                   if not pa.types.is_fixed_size_binary(table.schema.field(c).type)])
    data = sink.getvalue()
    write_bytes_atomic(fs, path, data)
    return len(data)


def write_json_atomic(fs: fsspec.AbstractFileSystem, path: str, obj: Any) -> None:
    write_bytes_atomic(fs, path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(fs: fsspec.AbstractFileSystem, path: str) -> Any:
    with fs.open(path, "rb") as f:
        return json.load(f)


def shard_name(shard: int) -> str:
    return f"shard-{shard:06d}"


def finished_shards(fs: fsspec.AbstractFileSystem, output: str) -> dict[int, dict]:
    """The commit markers of an output root: shard number -> its marker (counts)."""
    marker_dir = join(output, schema.SHARDS_DIR)
    if not fs.exists(marker_dir):
        return {}
    paths = [p for p in fs.ls(marker_dir, detail=False) if p.endswith(".json")]
    with ThreadPoolExecutor(16) as pool:
        markers = list(pool.map(lambda p: read_json(fs, p), paths))
    return {int(m["shard"]): m for m in markers}


def load_or_create_plan(
    fs: fsspec.AbstractFileSystem, output: str, input_uri: str, image_ids: Sequence[str] | None, shard_size: int
) -> list[list[str]]:
    """The split of the input into shards, fixed by the first run and reused by every rerun.

    A rerun that lists a different input would reshuffle shard membership and could duplicate or lose
    rows, so the plan is stored with the output and a rerun over another input is refused.
    """
    path = join(output, schema.PLAN_FILE)
    if fs.exists(path):
        plan = read_json(fs, path)
        if plan["input"] != input_uri:
            raise ValueError(
                f"{uri(fs, output)} holds the output of another input ({plan['input']}); "
                "choose a new --output or the same --input"
            )
        return plan["shards"]
    if image_ids is None:
        raise ValueError("no plan yet and no listing given")
    shards = [list(image_ids[i : i + shard_size]) for i in range(0, len(image_ids), shard_size)]
    write_json_atomic(fs, path, {"input": input_uri, "shard_size": shard_size, "shards": shards})
    return shards

