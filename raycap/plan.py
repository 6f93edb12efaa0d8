"""The shard plan: the input's units (sources/) split into shards, its Parquet parts and header, commit markers."""

from __future__ import annotations

import dataclasses
import heapq
import io
import itertools
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raycap import schema, sources, storage
from raycap.listing import Skipped, order
from raycap.sources import SourceSpec

HEADER = "_plan.json"  # inside schema.PLAN_DIR, written last: the plan's commit
SHARDS_PER_PART = 256  # shards per plan part; each shard is one row group of its part
UNITS = "units"  # column of the shard rows expand_parts yields: the shard's units
UNIT, FIELDS = "unit", "fields"  # a plan part's columns beside the shard: the unit's name, its kept fields (JSON)
_PART_SCHEMA = pa.schema([("shard", pa.int32()), (UNIT, pa.string()), (FIELDS, pa.string())])


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
    shard_size: int  # units per shard (the last shard of an increment may hold fewer); 1 for packed sources
    files: int = 0  # planned units (files, URIs, tars or Parquet files), all increments
    shards: int = 0  # shards, all increments; shard numbers are 0..shards-1
    parts: list[dict[str, Any]] = field(default_factory=list)  # {name, first_shard, shards, files}
    increments: list[dict[str, Any]] = field(default_factory=list)  # {at, first_shard, shards, files, removed}
    source: dict[str, Any] = field(default_factory=dict)  # the SourceSpec the units were listed with

    @property
    def spec(self) -> SourceSpec:
        return SourceSpec.from_dict(self.source or {"format": "files"})

    @property
    def images(self) -> int | None:
        """Images planned, where a unit is one image (files, list); None where they are known once read."""
        return None if self.spec.packed else self.files


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


def _write_parts(fs: fsspec.AbstractFileSystem, output: str, units: Iterable[Any], shard_size: int, plan: Plan) -> int:
    """Append the listed `units` (names, or (name, fields) pairs) to `plan` as new shards, SHARDS_PER_PART to a
    part; returns the units added."""
    per_part = SHARDS_PER_PART * shard_size
    added = 0
    units = iter(units)
    while chunk := list(itertools.islice(units, per_part)):
        shards = math.ceil(len(chunk) / shard_size)
        first = plan.shards
        name = f"part-{len(plan.parts):06d}.parquet"
        numbers = pa.array(first + np.arange(len(chunk), dtype=np.int32) // shard_size)
        names = [u if isinstance(u, str) else u[0] for u in chunk]
        fields = [None if isinstance(u, str) or u[1] is None else json.dumps(u[1], sort_keys=True) for u in chunk]
        sink = io.BytesIO()
        pq.write_table(
            pa.table([numbers, pa.array(names, pa.string()), pa.array(fields, pa.string())], schema=_PART_SCHEMA),
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
                yield from pq.read_table(path, columns=[UNIT], filesystem=fs)[0].to_pylist()

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


def resolve_source(
    in_fs: fsspec.AbstractFileSystem, in_root: str, requested: SourceSpec, plan: Plan | None, say: Callable[[str], None]
) -> SourceSpec:
    """The source a run reads: the plan's on a rerun (a different --input-format or --keep-columns is one line),
    else the requested one, with `auto` decided from the listing's head; the first line says which."""
    input_uri = storage.uri(in_fs, in_root)
    if plan is not None:
        stored = plan.spec
        if requested.format not in ("auto", stored.format):
            raise ValueError(f"{input_uri} was planned as --input-format {stored.format}, not {requested.format}")
        if requested.keep_columns != stored.keep_columns:
            kept = ",".join(stored.keep_columns) or "(none)"
            raise ValueError(f"the plan under this --output keeps --keep-columns {kept}; rerun with the same")
        say(f"{input_uri}: {stored.format} input (as planned)")
        return stored
    if requested.format == "auto":
        kind, why = sources.detect(in_fs, in_root, requested)
        say(f"{input_uri}: {kind} input (auto: {why}; --input-format to choose)")
        return dataclasses.replace(requested, format=kind)
    say(f"{input_uri}: {requested.format} input")
    return requested


def prepare(
    in_fs: fsspec.AbstractFileSystem,
    in_root: str,
    out_fs: fsspec.AbstractFileSystem,
    out_root: str,
    shard_size: int | None,
    actors: int,
    incremental: bool = False,
    say: Callable[[str], None] = print,
    source: SourceSpec | None = None,
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
    spec = resolve_source(in_fs, in_root, source or SourceSpec("files"), plan, say)
    if spec.packed and shard_size is not None:
        raise ValueError(f"--shard-size applies to files and list inputs; each {spec.format} file is one shard")
    if plan is not None and not incremental:
        say(f"{input_uri}: plan reused, input not relisted (--incremental plans files added since)")
        return plan
    if incremental and spec.format == "list":
        raise ValueError("--incremental relists a folder; for an index of URIs, write a new index and --output")
    skipped = Skipped()
    listed = sources.units(spec, in_fs, in_root, skipped)
    if plan is None:
        if spec.packed:
            shard_size = 1
        elif shard_size is None:
            # Auto size from the count, deciding once enough units are seen that the largest size applies.
            enough = min(auto_shard_size_limit(actors), 1 << 20)
            head = list(itertools.islice(listed, enough))
            shard_size = auto_shard_size(len(head), actors)
            listed = itertools.chain(head, listed)
        plan = Plan(input=input_uri, shard_size=shard_size, source=spec.to_dict())
        diff = None
        new_files = listed
    else:
        diff = _Diff(_planned_ids(out_fs, out_root, plan), listed)
        new_files = iter(diff)
    first_shard = plan.shards
    added = _write_parts(out_fs, out_root, new_files, plan.shard_size, plan)
    if not plan.files:
        what = "" if spec.format == "files" else f"{spec.format} "
        raise ValueError(f"no {what}files under {input_uri}" + _skipped_note(skipped))
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
                "skipped": skipped.count,  # names not planned, by reason in skipped_reasons
                "skipped_reasons": dict(skipped.reasons),
            }
        )
        storage.write_json_atomic(out_fs, storage.join(plan_dir(out_root), HEADER), asdict(plan))
    if skipped.count:
        say(f"{input_uri}: {skipped.count} names not planned" + _skipped_note(skipped))
    if diff is not None:
        say(f"{input_uri}: {added} new files planned in {plan.shards - first_shard} new shards")
    return plan


def _skipped_note(skipped: Skipped) -> str:
    if not skipped.count:
        return ""
    why = ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.reasons.items()))
    return f" ({why}; e.g. {', '.join(skipped.examples)})"


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
    """Task: yields (shard, units, fields) for each pending shard of each plan part, read as its row group.

    One table per shard, so that each becomes its own block (see pipeline.run) and shards decode in parallel.
    """
    fs, root = storage.filesystem(output, storage_options)
    for row in batch.to_pylist():
        with fs.open(storage.join(plan_dir(root), row["part"]), "rb") as f:
            part = pq.ParquetFile(f)
            for shard in row["pending"]:
                group = part.read_row_group(shard - row["first_shard"], columns=[UNIT, FIELDS])
                units, fields = group[UNIT].to_pylist(), group[FIELDS].to_pylist()
                yield pa.table({"shard": [shard], UNITS: [units], FIELDS: [fields]})


def planned_units(units: list[str], fields: list[str | None]) -> list[dict[str, Any]]:
    """A shard's plan rows as sources.read takes them: {"unit", "fields"}."""
    return [{"unit": u, "fields": None if f is None else json.loads(f)} for u, f in zip(units, fields)]


def plan_only(config: Any, say: Callable[[str], None] = print) -> str:
    """`--plan-only`: list the input and write (or extend) the plan without Ray or a model; one summary line."""
    in_fs, in_root = storage.filesystem(config.input, config.storage_options)
    out_fs, out_root = storage.filesystem(config.output, config.storage_options)
    actors = config.actors[1] if config.actors else max(1, os.cpu_count() or 1)
    plan = prepare(
        in_fs, in_root, out_fs, out_root, config.shard_size, actors, config.incremental, say, config.source()
    )
    return f"{plan.files} {units_name(plan)} in {plan.shards} shards"


def units_name(plan: Plan) -> str:
    """What the plan's units are, for the summary lines."""
    return {"webdataset": "tars", "parquet": "Parquet files", "list": "URIs"}.get(plan.spec.format, "files")
