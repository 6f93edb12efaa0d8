"""WebDataset tars as img2dataset writes them (KEY.jpg, KEY.txt, KEY.json): one tar per shard, streamed."""

from __future__ import annotations

import json
import re
import tarfile
from collections.abc import Iterator
from typing import Any

import fsspec
import pyarrow as pa

from raycap import listing, storage
from raycap.sources import IMAGE_EXTENSIONS, Piece, Sample, SourceSpec

KEY = "key"  # the column every webdataset row carries: the sample's key inside its tar
READ_AHEAD = 8 << 20  # bytes a tar's stream reads ahead of the member being unpacked
TAR_BUFFER = 1 << 20  # bytes tarfile's stream reads at a time (its default, 10 KB, costs a Python call each)
_MEMBER = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # webdataset's convention: KEY is up to the basename's first dot


def units(spec: SourceSpec, fs: fsspec.AbstractFileSystem, root: str, skipped: listing.Skipped) -> Iterator[str]:
    """Every .tar below `root` (its relative name); other files beside them (img2dataset's per-tar .parquet and
    _stats.json) are counted as skipped. No tar is opened."""
    for name in listing.iter_files(fs, root, skipped=skipped):
        if name.lower().endswith(".tar"):
            yield name
        else:
            skipped.add(name, "not a .tar")


def split_name(name: str) -> tuple[str, str]:
    """(key, extension) of a tar member by the webdataset convention; a name without a dot is all key."""
    m = _MEMBER.match(name)
    return (m[1], m[2].lower()) if m else (name, "")


def read(
    spec: SourceSpec,
    fs: fsspec.AbstractFileSystem,
    root: str,
    planned: list[dict],
    piece: int,
    storage_options: dict | None = None,
) -> Iterator[Piece]:
    """The tar's samples in pieces of `piece`, read member by member from its URI. A sample without an image
    member is an error row naming TAR#KEY; a tar cut short keeps what came before and adds one error row."""
    (unit,) = (p["unit"] for p in planned)
    path = storage.join(root, unit)
    shown = storage.uri(fs, path)
    types = {KEY: pa.string()} | {name: pa.string() for name in spec.keep_columns}
    out = Piece(types=types)
    current: dict[str, bytes] = {}
    key = None
    try:
        with (
            fs.open(path, "rb", block_size=READ_AHEAD) as f,
            tarfile.open(fileobj=f, mode="r|", bufsize=TAR_BUFFER) as tar,
        ):
            for member in tar:
                if not member.isfile():
                    continue
                member_key, ext = split_name(member.name)
                if member_key != key and key is not None:
                    _add(out, spec, unit, shown, key, current)
                    current = {}
                    if len(out.samples) >= piece:
                        yield out
                        out = Piece(types=types)
                key = member_key
                data = tar.extractfile(member)
                current[ext] = data.read() if data else b""
    except FileNotFoundError:
        out.errors.append((shown, "read", "missing"))
        yield out
        return
    except (tarfile.TarError, EOFError) as e:
        where = f"{shown}#{key}" if key is not None else shown
        why = f"tar cut short ({type(e).__name__}: {storage.one_line(e)}); the samples before it are kept"
        out.errors.append((where, "read", why))
        yield out
        return
    if key is not None:
        _add(out, spec, unit, shown, key, current)
    yield out


def _add(out: Piece, spec: SourceSpec, unit: str, shown: str, key: str, members: dict[str, bytes]) -> None:
    where = f"{shown}#{key}"
    image = spec.image_key or next((e for e in IMAGE_EXTENSIONS if e in members), None)
    if image is None or image not in members:
        found = ", ".join(sorted(members)) or "none"
        wanted = f"a .{spec.image_key} member" if spec.image_key else "an image member"
        out.errors.append((where, "read", f"no image: the sample has no {wanted} (members: {found})"))
        return
    fields = {KEY: key} | {name: kept_field(members, name) for name in spec.keep_columns}
    out.samples.append(Sample(f"{unit}/{key}", where, members[image], fields))


def kept_field(members: dict[str, bytes], name: str) -> str | None:
    """A kept field of a sample as text: a member of that extension (`txt`), else a field of its .json member
    (numbers and objects as their JSON text); None where the sample has neither."""
    if name in members:
        return members[name].decode("utf-8", errors="replace")
    meta = _json(members.get("json"))
    if name not in meta:
        return None
    value = meta[name]
    return value if isinstance(value, str) or value is None else json.dumps(value)


def _json(data: bytes | None) -> dict[str, Any]:
    if not data:
        return {}
    try:
        value = json.loads(data)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
