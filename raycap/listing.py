"""Streaming, deterministic listing of an input folder or prefix, never holding a whole level in memory.

Paged on S3 and parallel across prefixes; huge local folders are sorted in runs spilled to disk.
"""

from __future__ import annotations

import contextlib
import heapq
import os
import tempfile
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import fsspec

from raycap import schema, storage

LIST_THREADS = 16  # listing requests in flight on object stores
LIST_AHEAD = 64  # pages (a folder's first, or the next of one being streamed) listed ahead of the one streamed
LOCAL_RUN = 100_000  # names of one local folder sorted in memory at a time; a larger folder spills sorted runs
MERGE_FAN = 64  # spilled runs open at once: each MERGE_FAN runs are merged into one longer run


# raycap's own bookkeeping, where an output lies inside its input. Every other name is an input, '_' ones too:
# cameras name Adobe RGB shots `_DSC0001.JPG`, and a `_raw/` folder holds real images (a file that is not an
# image becomes an error row, never a silent skip).
OWN_NAMES = frozenset({schema.SHARDS_DIR, schema.PLAN_DIR, schema.MANIFEST_FILE})
HIDDEN = "hidden or raycap's own"  # Skipped's reason for the names `_hidden` leaves out


@dataclass
class Skipped:
    """The names a listing left out (hidden or raycap's own, or not of the input's kind), counted by reason, with
    a few examples: never silent."""

    count: int = 0
    examples: list[str] = field(default_factory=list)
    reasons: dict[str, int] = field(default_factory=dict)  # why -> how many
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)  # remote prefixes list in threads

    def add(self, name: str, reason: str = HIDDEN) -> None:
        with self._lock:
            self.count += 1
            self.reasons[reason] = self.reasons.get(reason, 0) + 1
            if len(self.examples) < 5:
                self.examples.append(name)


def _hidden(name: str) -> bool:
    """Hidden files and folders (a leading '.', also raycap's own temporaries) and raycap's own names."""
    return name.startswith(".") or name in OWN_NAMES


def order(image_id: str) -> str:
    """The listing order: whole ids compared by code point, which is UTF-8 byte order, the order in which S3 returns
    keys, so a prefix streams page by page as listed. A folder's entries sort as 'name' for a file and 'name/' for
    a subfolder: 'a.jpg' < 'a/z.jpg' < 'a0.jpg'. (Comparing path components one by one would put 'a/z.jpg' before
    'a.jpg', and a listing would have to hold back every 'a.*', 'a-*' or 'a *' key until 'a/' was done.)"""
    return image_id


def iter_files(
    fs: fsspec.AbstractFileSystem, root: str, threads: int = LIST_THREADS, skipped: Skipped | None = None
) -> Iterator[str]:
    """Every file below `root` as relative ids ('/' separators), streamed in `order`; the names left out are
    counted in `skipped`.

    A missing root, a file, or a prefix the credentials cannot list is one ValueError before the first id.
    """
    shown, skipped = storage.uri(fs, root), skipped if skipped is not None else Skipped()
    if storage.is_local(fs):
        if not os.path.exists(root):
            raise ValueError(f"input does not exist: {shown}")
        if not os.path.isdir(root):
            raise ValueError(f"input must be a folder or prefix, got a file: {shown}")
        return _walk_local(root, "", skipped)
    first = _list_page(fs, root, None, skipped)
    if not first.found:
        if fs.isfile(root):
            raise ValueError(f"input must be a folder or prefix, got a file: {shown}")
        raise ValueError(f"input does not exist: {shown}")
    return _walk_remote(fs, root, first, threads, skipped)


def _walk_local(path: str, rel: str, skipped: Skipped) -> Iterator[str]:
    for key in _local_level(path, rel, skipped):
        if key.endswith("/"):
            yield from _walk_local(os.path.join(path, key[:-1]), rel + key, skipped)
        else:
            yield rel + key


def _local_level(path: str, rel: str, skipped: Skipped) -> Iterator[str]:
    """One local folder's names in `order` (a subfolder's as 'name/'), hidden ones counted and dropped: sorted in
    memory up to LOCAL_RUN names; a larger folder is sorted in runs spilled to a temporary folder, then merged."""
    keys: list[str] = []
    with contextlib.ExitStack() as cleanup:
        runs: _Runs | None = None
        with os.scandir(path) as it:
            for e in it:
                if _hidden(e.name):
                    skipped.add(rel + e.name)
                    continue
                keys.append(e.name + "/" if e.is_dir() else e.name)
                if len(keys) >= LOCAL_RUN:
                    runs = runs or cleanup.enter_context(_Runs())
                    runs.add(keys)
                    keys = []
        if runs is None:
            keys.sort()
            yield from keys
        else:
            runs.add(keys)
            del keys
            yield from runs.merged()


class _Runs:
    """Sorted runs of names in a temporary folder (NUL-terminated; names never hold NUL or '/'); every MERGE_FAN
    runs of one length are merged into one run of the next, so at most MERGE_FAN - 1 per length stay open."""

    def __enter__(self) -> _Runs:
        self.folder = tempfile.TemporaryDirectory(prefix="raycap-listing-")
        self.levels: list[list[str]] = [[]]  # run paths, by how many merges made them
        self.made = 0
        return self

    def __exit__(self, *exc: object) -> None:
        self.folder.cleanup()

    def add(self, keys: list[str]) -> None:
        keys.sort()
        self.levels[0].append(self._write(keys))
        level = 0
        while len(self.levels[level]) >= MERGE_FAN:
            merged = self._write(heapq.merge(*map(_read_run, self.levels[level])))
            for run in self.levels[level]:
                os.remove(run)
            self.levels[level] = []
            if level + 1 == len(self.levels):
                self.levels.append([])
            self.levels[level + 1].append(merged)
            level += 1

    def merged(self) -> Iterator[str]:
        return heapq.merge(*(_read_run(run) for runs in self.levels for run in runs))

    def _write(self, keys: Iterable[str]) -> str:
        path = os.path.join(self.folder.name, f"run-{self.made:06d}")
        self.made += 1
        with open(path, "wb", buffering=1 << 16) as f:
            f.writelines(k.encode("utf-8", "surrogateescape") + b"\0" for k in keys)
        return path


def _read_run(path: str) -> Iterator[str]:
    with open(path, "rb") as f:
        rest = b""
        while block := f.read(1 << 16):
            *names, rest = (rest + block).split(b"\0")
            for name in names:
                yield name.decode("utf-8", "surrogateescape")


@dataclass
class _Page:
    """One page of one prefix level."""

    keys: list[str]  # names in `order`, a subfolder's as 'name/', hidden ones dropped
    token: str | None  # where the level's next page starts; None after its last
    found: bool  # anything listed below the prefix, hidden names included


def _list_page(fs: fsspec.AbstractFileSystem, path: str, token: str | None, skipped: Skipped) -> _Page:
    """The page of `path`'s level at `token` (None: its first), with hidden names counted and dropped."""
    try:
        if hasattr(fs, "call_s3"):
            names, token = _s3_page(fs, path, token)
        else:
            names, token = _whole_level(fs, path), None
    except FileNotFoundError:
        raise ValueError(f"input does not exist: {storage.uri(fs, path)}") from None
    except Exception as e:  # noqa: BLE001 - credentials, endpoint, permissions: one line naming the prefix
        raise ValueError(f"cannot list {storage.uri(fs, path)} ({type(e).__name__}: {storage.one_line(e)})") from None
    keys, found = [], False
    for key in names:
        name = key.rstrip("/")
        if not name:  # the prefix's own marker key, or the listed path itself
            continue
        found = True
        if _hidden(name):
            skipped.add(f"{path.rstrip('/')}/{name}")
        else:
            keys.append(key)
    return _Page(keys, token, found)


def _s3_page(fs: fsspec.AbstractFileSystem, path: str, token: str | None) -> tuple[list[str], str | None]:
    """One page (up to 1,000 names) of one S3 prefix level, sorted in `order`, and the next page's token.

    ListObjectsV2 with a '/' delimiter through s3fs's own call (its session, credentials, retries and errors as
    OSErrors), one request per page: s3fs's `ls` gathers every page of a level into one list of dicts before it
    returns (a flat prefix of 100 M keys, held whole), and its `_iterdir` pages but yields prefixes ahead of keys on
    its own event loop. S3 orders the keys and the common prefixes of a page, together, in UTF-8 byte order of the
    whole key, which is `order`; the page returns them as two lists, merged here.
    """
    bucket, _, key = path.strip("/").partition("/")
    prefix = f"{key}/" if key else ""
    request = {"Bucket": bucket, "Prefix": prefix, "Delimiter": "/"}
    if token is not None:
        request["ContinuationToken"] = token
    page = fs.call_s3("list_objects_v2", **request)
    names = [c["Key"][len(prefix) :] for c in page.get("Contents", [])]
    names += [p["Prefix"][len(prefix) :] for p in page.get("CommonPrefixes", [])]
    names.sort()
    return names, page.get("NextContinuationToken") if page.get("IsTruncated") else None


def _whole_level(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    """A whole level through `fs.ls`, for stores other than S3 (fsspec has no paged listing), sorted in `order`;
    nothing left in fsspec's cache."""
    try:
        entries = fs.ls(path, detail=True, refresh=True)
    finally:
        fs.invalidate_cache(path)
    base = path.rstrip("/")
    names = []
    for entry in entries:
        full = entry["name"].rstrip("/")
        name = "" if full == base else full.rpartition("/")[2]  # a store may list the prefix itself
        names.append(name + "/" if name and entry["type"] == "directory" else name)
    names.sort()
    return names


@dataclass
class _Pending:
    """A page still to stream: a folder's first (token None) or the next of a folder being streamed."""

    path: str
    rel: str
    token: str | None = None
    listing: Future | None = None


def _walk_remote(
    fs: fsspec.AbstractFileSystem, root: str, first: _Page, threads: int, skipped: Skipped
) -> Iterator[str]:
    """Depth first in `order`, a page at a time, with the next LIST_AHEAD pages being listed `threads` at a time:
    the stack holds at most one page per folder level being streamed, plus the pages listed ahead."""
    with ThreadPoolExecutor(threads) as pool:
        done: Future = Future()
        done.set_result(first)
        stack: list[_Pending | list[str]] = [_Pending(root, "", None, done)]  # the top is streamed next
        while stack:
            item = stack.pop()
            if isinstance(item, list):
                yield from item
                continue
            assert item.listing is not None
            page: _Page = item.listing.result()
            if page.token is not None:  # the rest of this folder, streamed after this page
                stack.append(_Pending(item.path, item.rel, page.token))
            pushed: list[_Pending | list[str]] = []
            run: list[str] = []
            for key in page.keys:
                if key.endswith("/"):
                    if run:
                        pushed.append(run)
                        run = []
                    pushed.append(_Pending(f"{item.path}/{key[:-1]}", item.rel + key))
                else:
                    run.append(item.rel + key)
            if run:
                pushed.append(run)
            stack.extend(reversed(pushed))
            ahead = 0
            for waiting in reversed(stack):
                if isinstance(waiting, _Pending):
                    if waiting.listing is None:
                        waiting.listing = pool.submit(_list_page, fs, waiting.path, waiting.token, skipped)
                    ahead += 1
                    if ahead >= LIST_AHEAD:
                        break
