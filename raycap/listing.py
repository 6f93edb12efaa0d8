"""Streaming, deterministic listing of an input folder or prefix; parallel across prefixes on object stores."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import fsspec

from raycap import schema, storage

LIST_THREADS = 16  # listing requests in flight on object stores
LIST_AHEAD = 64  # prefixes listed ahead of the one being streamed


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


def order(image_id: str) -> tuple[str, ...]:
    """The listing order: path components compared one by one (a folder's files and subfolders by name)."""
    return tuple(image_id.split("/"))


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
    first = _list_dir(fs, root, skipped)
    if not first and fs.isfile(root):
        raise ValueError(f"input must be a folder or prefix, got a file: {shown}")
    return _walk_remote(fs, root, first, threads, skipped)


def _walk_local(path: str, rel: str, skipped: Skipped) -> Iterator[str]:
    entries = []
    with os.scandir(path) as it:
        for e in it:
            if _hidden(e.name):
                skipped.add(rel + e.name)
            else:
                entries.append((e.name, e.is_dir()))
    entries.sort()
    for name, is_dir in entries:
        if is_dir:
            yield from _walk_local(os.path.join(path, name), f"{rel}{name}/", skipped)
        else:
            yield rel + name


def _list_dir(fs: fsspec.AbstractFileSystem, path: str, skipped: Skipped) -> list[tuple[str, bool]]:
    """One prefix level: sorted (name, is_folder), hidden names dropped, nothing left in fsspec's cache."""
    try:
        entries = fs.ls(path, detail=True, refresh=True)
    except FileNotFoundError:
        raise ValueError(f"input does not exist: {storage.uri(fs, path)}") from None
    except Exception as e:  # noqa: BLE001 - credentials, endpoint, permissions: one line naming the prefix
        raise ValueError(f"cannot list {storage.uri(fs, path)} ({type(e).__name__}: {storage.one_line(e)})") from None
    finally:
        fs.invalidate_cache(path)
    base = path.rstrip("/")
    out = []
    for entry in entries:
        full = entry["name"].rstrip("/")
        name = full.rpartition("/")[2]
        if not name or full == base:  # S3 may list the prefix itself
            continue
        if _hidden(name):
            skipped.add(full)
        else:
            out.append((name, entry["type"] == "directory"))
    out.sort()
    return out


@dataclass
class _Folder:
    path: str
    rel: str
    listing: Future | None = None


def _walk_remote(
    fs: fsspec.AbstractFileSystem, root: str, first: list[tuple[str, bool]], threads: int, skipped: Skipped
) -> Iterator[str]:
    """Depth first in `order`, with the next LIST_AHEAD folders being listed `threads` at a time."""
    with ThreadPoolExecutor(threads) as pool:
        done: Future = Future()
        done.set_result(first)
        stack: list[_Folder | list[str]] = [_Folder(root, "", done)]  # the top is streamed next
        while stack:
            item = stack.pop()
            if isinstance(item, list):
                yield from item
                continue
            assert item.listing is not None
            entries = item.listing.result()
            pushed: list[_Folder | list[str]] = []
            run: list[str] = []
            for name, is_dir in entries:
                if is_dir:
                    if run:
                        pushed.append(run)
                        run = []
                    pushed.append(_Folder(f"{item.path}/{name}", f"{item.rel}{name}/"))
                else:
                    run.append(item.rel + name)
            if run:
                pushed.append(run)
            stack.extend(reversed(pushed))
            ahead = 0
            for waiting in reversed(stack):
                if isinstance(waiting, _Folder):
                    if waiting.listing is None:
                        waiting.listing = pool.submit(_list_dir, fs, waiting.path, skipped)
                    ahead += 1
                    if ahead >= LIST_AHEAD:
                        break
