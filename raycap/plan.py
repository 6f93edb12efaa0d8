"""The shard plan: streaming input listing, the plan's Parquet parts and header, commit markers, progress lines."""

from __future__ import annotations

import heapq
import io
import itertools
import math
import os
import posixpath
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raycap import schema, storage
from raycap.listing import Skipped, iter_files, order

HEADER = "_plan.json"  # inside schema.PLAN_DIR, written last: the plan's commit
SHARDS_PER_PART = 256  # shards per plan part; each shard is one row group of its part
_PART_SCHEMA = pa.schema([("shard", pa.int32()), (schema.IMAGE_ID, pa.string())])
_MARKER = re.compile(r"^shard-(\d+)\.rows-(\d+)\.errors-(\d+)\.json$")


def shard_name(shard: int) -> str:
    return f"shard-{shard:06d}"


def marker_name(shard: int, rows: int, errors: int) -> str:
    """A commit marker's name carries its counts, so one listing tells a rerun everything it needs."""
    return f"{shard_name(shard)}.rows-{rows}.errors-{errors}.json"


def auto_shard_size(images: int, actors: int, per_actor: int = 8, smallest: int = 32, largest: int = 256) -> int:
    """Shards small enough that every actor gets about `per_actor` of them (so none idles at the end), but
    at least `smallest` images (each shard costs scheduled work and files of its own); on big inputs simply
    `largest`."""
    return min(largest, max(smallest, math.ceil(images / (actors * per_actor))))


def auto_shard_size_limit(actors: int) -> int:
    """The image count from which `auto_shard_size` gives its largest size for `actors` actors."""
    return actors * 8 * 256


@dataclass
class Plan:
    """The plan header: which input, how it was split, where the parts are, and each increment."""

    input: str  # the input URI the plan was made from
    shard_size: int  # images per shard (the last shard of an increment may hold fewer)
    files: int = 0  # planned files, all increments
    shards: int = 0  # shards, all increments; shard numbers are 0..shards-1
    parts: list[dict[str, Any]] = field(default_factory=list)  # {name, first_shard, shards, files}
    increments: list[dict[str, Any]] = field(default_factory=list)  # {at, first_shard, shards, files, removed}


def plan_dir(output: str) -> str:
    return storage.join(output, schema.PLAN_DIR)


def read_plan(fs: fsspec.AbstractFileSystem, output: str) -> Plan | None:
    """The committed plan of an output root, or None before the first run committed one."""
    if fs.exists(storage.join(output, "_plan.json")):
        raise ValueError(
            f"{storage.uri(fs, output)} was written by an older raycap (_plan.json); choose a new --output"
        )
    path = storage.join(plan_dir(output), HEADER)
    if not fs.exists(path):
        return None
    return Plan(**storage.read_json(fs, path))


def _write_parts(fs: fsspec.AbstractFileSystem, output: str, ids: Iterable[str], shard_size: int, plan: Plan) -> int:
    """Append the listed `ids` to `plan` as new shards, SHARDS_PER_PART to a part; returns the files added."""
    per_part = SHARDS_PER_PART * shard_size
    added = 0
    ids = iter(ids)
    while chunk := list(itertools.islice(ids, per_part)):
        shards = math.ceil(len(chunk) / shard_size)
        first = plan.shards
        name = f"part-{len(plan.parts):06d}.parquet"
        numbers = pa.array(first + np.arange(len(chunk), dtype=np.int32) // shard_size)
        sink = io.BytesIO()
        pq.write_table(
            pa.table([numbers, pa.array(chunk, pa.string())], schema=_PART_SCHEMA),
            sink,
            row_group_size=shard_size,
            compression="zstd",
        )
        storage.write_bytes_atomic(fs, storage.join(plan_dir(output), name), sink.getvalue())
        plan.parts.append({"name": name, "first_shard": first, "shards": shards, "files": len(chunk)})
        plan.shards += shards
        plan.files += len(chunk)
        added += len(chunk)
    return added


def _planned_ids(fs: fsspec.AbstractFileSystem, output: str, plan: Plan) -> Iterator[str]:
    """Every planned id in `order`: each increment is in listing order, so merge them."""

    def increment(inc: dict) -> Iterator[str]:
        for part in plan.parts:
            if inc["first_shard"] <= part["first_shard"] < inc["first_shard"] + inc["shards"]:
                path = storage.join(plan_dir(output), part["name"])
                yield from pq.read_table(path, columns=[schema.IMAGE_ID], filesystem=fs)[0].to_pylist()

    return heapq.merge(*(increment(inc) for inc in plan.increments), key=order)


def _ascending(ids: Iterable[str], what: str, advice: str) -> Iterator[str]:
    """`ids`, checked to be in `order` as the diff's merge needs: a plan that an older raycap listed in another
    order (path components compared one by one) is one line, never files planned twice."""
    last = None
    for image_id in ids:
        if last is not None and order(image_id) < order(last):
            raise ValueError(f"{what} is not in listing order ({last!r} before {image_id!r}); {advice}")
        last = image_id
        yield image_id


class _Diff:
    """Streams the listed ids missing from the plan; counts (and samples) planned ids no longer listed."""

    def __init__(self, planned: Iterator[str], listed: Iterator[str]) -> None:
        self.planned = _ascending(planned, "the plan", "an older raycap wrote it: choose a new --output")
        self.listed = _ascending(listed, "the input's listing", "its store does not list keys in byte order")
        self.removed = 0
        self.removed_examples: list[str] = []

    def _gone(self, image_id: str) -> None:
        self.removed += 1
        if len(self.removed_examples) < 5:
            self.removed_examples.append(image_id)

    def __iter__(self) -> Iterator[str]:
        old = next(self.planned, None)
        for new in self.listed:
            while old is not None and order(old) < order(new):
                self._gone(old)
                old = next(self.planned, None)
            if old == new:
                old = next(self.planned, None)
            else:
                yield new
        while old is not None:
            self._gone(old)
            old = next(self.planned, None)


def prepare(
    in_fs: fsspec.AbstractFileSystem,
    in_root: str,
    out_fs: fsspec.AbstractFileSystem,
    out_root: str,
    shard_size: int | None,
    actors: int,
    incremental: bool = False,
    say: Callable[[str], None] = print,
) -> Plan:
    """The job's plan: made on the first run while listing; reused by reruns; extended by --incremental ones.

    Shard membership never changes once committed (reruns would otherwise duplicate or lose rows), so a
    rerun over another input is refused and a plain rerun does not relist the input.
    """
    input_uri = storage.uri(in_fs, in_root)
    plan = read_plan(out_fs, out_root)
    if plan is not None and plan.input != input_uri:
        raise ValueError(
            f"{storage.uri(out_fs, out_root)} holds the output of another input ({plan.input}); "
            "choose a new --output or the same --input"
        )
    if plan is not None and not incremental:
        say(f"{input_uri}: plan reused, input not relisted (--incremental plans files added since)")
        return plan
    skipped = Skipped()
    listed = iter_files(in_fs, in_root, skipped=skipped)
    if plan is None:
        if shard_size is None:
            # Auto size from the count, deciding once enough ids are seen that the largest size applies.
            enough = min(auto_shard_size_limit(actors), 1 << 20)
            head = list(itertools.islice(listed, enough))
            shard_size = auto_shard_size(len(head), actors)
            listed = itertools.chain(head, listed)
        plan = Plan(input=input_uri, shard_size=shard_size)
        diff = None
        new_files = listed
    else:
        diff = _Diff(_planned_ids(out_fs, out_root, plan), listed)
        new_files = iter(diff)
    first_shard = plan.shards
    added = _write_parts(out_fs, out_root, new_files, plan.shard_size, plan)
    if not plan.files:
        raise ValueError(f"no files under {input_uri}")
    removed = diff.removed if diff else 0
    if diff and diff.removed:
        say(
            f"{input_uri}: {diff.removed} planned files are gone from the input (e.g. "
            f"{', '.join(diff.removed_examples)}); their shards not yet finished will record them as errors"
        )
    if added or removed or not plan.increments:
        plan.increments.append(
            {
                "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "first_shard": first_shard,
                "shards": plan.shards - first_shard,
                "files": added,
                "removed": removed,
                "skipped": skipped.count,  # hidden or raycap's own names, not planned
            }
        )
        storage.write_json_atomic(out_fs, storage.join(plan_dir(out_root), HEADER), asdict(plan))
    if skipped.count:
        examples = ", ".join(skipped.examples)
        say(f"{input_uri}: {skipped.count} hidden or raycap-owned names not planned (e.g. {examples})")
    if diff is not None:
        say(f"{input_uri}: {added} new files planned in {plan.shards - first_shard} new shards")
    return plan


def finished_shards(fs: fsspec.AbstractFileSystem, output: str) -> dict[int, tuple[int, int]]:
    """Shard number -> (rows, errors) of each committed shard, from ONE listing of the marker names.

    A shard with two markers (a task retried after committing, with other counts) is dropped, and its markers
    removed, so it is redone.
    """
    marker_dir = storage.join(output, schema.SHARDS_DIR)
    exists = fs.exists(marker_dir)
    names = [posixpath.basename(p) for p in fs.ls(marker_dir, detail=False, refresh=True)] if exists else []
    fs.invalidate_cache(marker_dir)
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


def pending_parts(plan: Plan, done: dict[int, tuple[int, int]]) -> list[dict[str, Any]]:
    """One item per plan part that still has unfinished shards: the pipeline's source rows (a few thousand at
    most, whatever the number of images)."""
    items = []
    for part in plan.parts:
        first = part["first_shard"]
        pending = [k for k in range(first, first + part["shards"]) if k not in done]
        if pending:
            items.append({"part": part["name"], "first_shard": first, "pending": pending})
    return items


def expand_parts(batch: pa.Table, output: str, storage_options: dict) -> Iterator[pa.Table]:
    """Task: yields (shard, image_ids) for each pending shard of each plan part, read as its row group.

    One table per shard, so that each becomes its own block (see pipeline.run) and shards decode in parallel.
    """
    fs, root = storage.filesystem(output, storage_options)
    for row in batch.to_pylist():
        with fs.open(storage.join(plan_dir(root), row["part"]), "rb") as f:
            part = pq.ParquetFile(f)
            for shard in row["pending"]:
                ids = part.read_row_group(shard - row["first_shard"], columns=[schema.IMAGE_ID])[0]
                yield pa.table({"shard": [shard], "image_ids": [ids.to_pylist()]})


class Progress:
    """One line whenever `every_seconds` have passed or another `every_fraction` of the shards finished."""

    def __init__(
        self,
        shards: int,
        images: int,
        done: dict[int, tuple[int, int]],
        say: Callable[[str], None],
        every_seconds: float = 30.0,
        every_fraction: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.shards, self.images, self.say, self.clock = shards, images, say, clock
        self.every_seconds, self.step = every_seconds, max(1, math.ceil(every_fraction * shards))
        self.done = len(done)
        self.images_done = sum(r + e for r, e in done.values())
        self.errors = sum(e for _, e in done.values())
        self.this_run = 0
        self.started = self.last_time = clock()
        self.last_done = self.done

    def shard_finished(self, rows: int, errors: int) -> None:
        self.done += 1
        self.images_done += rows + errors
        self.errors += errors
        self.this_run += rows + errors
        now = self.clock()
        if (
            now - self.last_time >= self.every_seconds
            or self.done - self.last_done >= self.step
            or self.done == self.shards
        ):
            self.last_time, self.last_done = now, self.done
            self.say(self.line(now))

    def line(self, now: float) -> str:
        elapsed = max(now - self.started, 1e-9)
        rate = self.this_run / elapsed
        eta = f"{(self.images - self.images_done) / rate:.0f}s" if rate > 0 else "?"
        return (
            f"progress: {self.done}/{self.shards} shards, {self.images_done} images, {self.errors} errors, "
            f"{rate:.1f} images/s, ETA {eta}"
        )


def plan_only(config: Any, say: Callable[[str], None] = print) -> str:
    """`--plan-only`: list the input and write (or extend) the plan without Ray or a model; one summary line."""
    in_fs, in_root = storage.filesystem(config.input, config.storage_options)
    out_fs, out_root = storage.filesystem(config.output, config.storage_options)
    actors = config.actors[1] if config.actors else max(1, os.cpu_count() or 1)
    plan = prepare(in_fs, in_root, out_fs, out_root, config.shard_size, actors, config.incremental, say)
    return f"{plan.files} files in {plan.shards} shards"
