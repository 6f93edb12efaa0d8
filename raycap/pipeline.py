"""The sharded image pipeline extract and caption share: plan, decode tasks, model actor pool, atomic writes.

A shard is a fixed list of input files (the plan, stored with the output on the first run). Each shard
travels through Ray Data as ONE row, so no stage can split it: decode (CPU task) -> model (actor pool,
one GPU per actor when there are GPUs) -> write (CPU task: the shard's Parquet files, then its commit
marker). A shard is finished when its marker exists; reruns skip finished shards and redo the others,
which overwrite their deterministic file names, so rows are never duplicated or lost. This is the only
module that sets concurrency, num_gpus and batch sizes.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from raycap import plan, schema, storage
from raycap.images import DEFAULT_MAX_PIXELS, ImageError, decode_image
from raycap.plan import auto_shard_size  # noqa: F401 - part of this module's interface

_META_SCHEMA = pa.schema([
    (schema.IMAGE_ID, pa.string()), (schema.PATH, pa.string()), (schema.WIDTH, pa.int32()), (schema.HEIGHT, pa.int32())
])


def to_ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def from_ipc(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(pa.py_buffer(data)).read_all()


def error_table(paths: list[str], stages: list[str], errors: list[str]) -> pa.Table:
    return pa.table([paths, stages, errors], schema=schema.ERRORS_SCHEMA)


@dataclass
class ShardJob:
    """What one run of the sharded pipeline needs; built by extract.py or caption.py."""

    input: str  # folder or s3:// prefix of images
    output: str  # output root
    rows_dir: str  # schema.FEATURES_DIR or schema.CAPTIONS_DIR
    model_cls: type  # a ShardModel subclass, built once per actor
    model_kwargs: dict[str, Any]
    shard_size: int | None = None  # images per shard (the unit of retry, resume and output file); None: auto
    max_pixels: int = DEFAULT_MAX_PIXELS  # decompression-bomb guard, checked before decoding
    max_errors: int | None = None  # stop once more images than this have failed (None: never)
    actors: tuple[int, int] | None = None  # (min, max) model actors; None: one per GPU, or sized to CPUs
    gpus_per_actor: float | None = None  # None: 1 when the cluster has GPUs, else 0
    compression: str = "none"  # Parquet compression of the output rows
    row_bytes: int = 0  # size of one output row, for the in-flight working-set estimate
    storage_options: dict[str, Any] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)  # job-specific facts recorded in _manifest.json
    incremental: bool = False  # relist the input and plan new shards for files added since the plan


class ShardModel:
    """Base of the model stage: a callable class that maps decoded shards to output rows.

    Subclasses load their model in `__init__` and implement `predict(pixels, meta) -> pa.Table` for
    (N, 299, 299, 3) uint8 pixels and the N images' (image_id, path, width, height).
    """

    def __init__(self, threads: int | None = None) -> None:
        if threads:
            import torch

            torch.set_num_threads(threads)

    def predict(self, pixels: np.ndarray, meta: pa.Table) -> pa.Table:
        raise NotImplementedError

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = []
        for row in batch.to_pylist():
            meta = from_ipc(row["meta"])
            pixels = np.frombuffer(row["pixels"], dtype=np.uint8).reshape(len(meta), *_PIXEL_SHAPE)
            rows = self.predict(pixels, meta) if len(meta) else None
            out.append({"shard": row["shard"], "rows": to_ipc(rows) if rows is not None else b"",
                        "errors": row["errors"]})
        return pa.Table.from_pylist(out)


_PIXEL_SHAPE = (schema.IMAGE_SIZE, schema.IMAGE_SIZE, 3)
_SHARD_BLOCK_BYTES = 1024  # target block size of the job's Dataset: every shard row (one per batch) is a block


def decode_shards(batch: pa.Table, input_root: str, storage_options: dict, max_pixels: int) -> pa.Table:
    """CPU task: read and decode every file of each shard; a file that fails becomes an error row."""
    fs, root = storage.filesystem(input_root, storage_options)
    out = []
    for row in batch.to_pylist():
        ids = row["image_ids"]
        paths = [storage.join(root, i) for i in ids]
        contents = fs.cat(paths, on_error="return") if paths else {}
        pixels = np.empty((len(ids), *_PIXEL_SHAPE), dtype=np.uint8)
        meta: dict[str, list] = {c: [] for c in _META_SCHEMA.names}
        errors: tuple[list, list, list] = ([], [], [])
        for image_id, path in zip(ids, paths):
            display = storage.uri(fs, path)
            data = contents.get(path)
            if isinstance(data, BaseException) or data is None:
                reason = "missing" if data is None else f"{type(data).__name__}: {data}"
                _append_error(errors, display, "read", reason)
                continue
            try:
                decoded = decode_image(data, max_pixels=max_pixels)
            except ImageError as e:
                _append_error(errors, display, e.stage, str(e))
                continue
            pixels[len(meta[schema.IMAGE_ID])] = decoded.pixels
            for key, value in zip(_META_SCHEMA.names, (image_id, display, decoded.width, decoded.height)):
                meta[key].append(value)
        n = len(meta[schema.IMAGE_ID])
        out.append({
            "shard": row["shard"],
            "pixels": pixels[:n].tobytes(),
            "meta": to_ipc(pa.table(meta, schema=_META_SCHEMA)),
            "errors": to_ipc(error_table(*errors)),
        })
    return pa.Table.from_pylist(out)


def _append_error(errors: tuple[list, list, list], path: str, stage: str, message: str) -> None:
    errors[0].append(path)
    errors[1].append(stage)
    errors[2].append(" ".join(message.split())[:500])


def write_shards(batch: pa.Table, output: str, rows_dir: str, storage_options: dict, compression: str) -> pa.Table:
    """CPU task: write each shard's rows and errors atomically, then its commit marker (last)."""
    fs, root = storage.filesystem(output, storage_options)
    out = []
    for row in batch.to_pylist():
        name = plan.shard_name(row["shard"])
        rows = from_ipc(row["rows"]) if row["rows"] else None
        errors = from_ipc(row["errors"])
        written = 0
        if rows is not None and len(rows):
            path = storage.join(root, rows_dir, f"{name}.parquet")
            written += storage.write_parquet_atomic(fs, path, rows, compression)
        if len(errors):
            written += storage.write_parquet_atomic(fs, storage.join(root, schema.ERRORS_DIR, f"{name}.parquet"),
                                                    errors, "zstd")
        marker = {"shard": row["shard"], "rows": len(rows) if rows is not None else 0, "errors": len(errors),
                  "bytes": written}
        storage.write_json_atomic(fs, storage.join(root, schema.SHARDS_DIR, plan.marker_name(
            row["shard"], marker["rows"], marker["errors"])), marker)
        out.append(marker)
    return pa.Table.from_pylist(out)


class TooManyErrors(RuntimeError):
    """More images failed than --max-errors allows."""


def inflight_bytes(shard_size: int, actors: int, row_bytes: int) -> int:
    """The run's expected object-store working set: per actor the shard it works on and one queued, plus a
    few decoded or finished shards in between. Recorded in the manifest; the hard bound is Ray Data's own
    executor budget (half the object store), which bench/memory.py checks with this estimate."""
    pixel_bytes = int(np.prod(_PIXEL_SHAPE))
    return (2 * actors + 4) * shard_size * (pixel_bytes + row_bytes)


def plan_resources(job: ShardJob) -> dict[str, Any]:
    """Actor pool size, GPUs and threads per actor, CPUs for decoding, from what the cluster has."""
    resources = ray.cluster_resources()
    cpus, gpus = int(resources.get("CPU", 1)), int(resources.get("GPU", 0))
    gpus_per_actor = job.gpus_per_actor if job.gpus_per_actor is not None else (1.0 if gpus else 0.0)
    if gpus_per_actor > 0:
        most = max(1, int(gpus / gpus_per_actor))
        actors = job.actors or (1, most)
        # Two shards in flight per GPU actor: the next one is fetched while this one runs.
        return {"actors": actors, "num_gpus": gpus_per_actor, "actor_cpus": 1, "threads": None, "decode_cpus": 1,
                "in_flight": 2}
    # CPU only: single-threaded actors use the cores better than one multi-threaded actor (measured here:
    # 2 x 1 thread = 11.8 images/s, 1 x 2 threads = 9.9), up to 8 threads per actor on large nodes. Each
    # actor reserves 3/4 of its CPUs so decode tasks (~5% of the model's CPU time) always find room.
    threads = max(1, cpus // 8)
    n = job.actors[1] if job.actors else max(1, cpus // threads)
    actors = job.actors or (n, n)
    # One shard in flight per CPU actor: a shard takes many seconds here, so a free actor takes the next one
    # and no actor sits on a queue while another idles at the end.
    return {"actors": actors, "num_gpus": 0, "actor_cpus": 0.75 * threads, "threads": threads,
            "decode_cpus": 0.5, "in_flight": 1}


def run(job: ShardJob, progress: Callable[[str], None] = print, progress_seconds: float = 30.0) -> dict[str, Any]:
    """Run (or resume) a sharded job to completion and write its manifest; returns the manifest.

    The driver holds the plan's header, the finished shards' counts and one item per plan part, never the
    image ids: tasks read each shard's ids from its row group of the plan's Parquet parts. A progress line
    goes out every `progress_seconds` or 10% of the shards.
    """
    started = time.time()
    in_fs, in_root = storage.filesystem(job.input, job.storage_options)
    out_fs, out_root = storage.filesystem(job.output, job.storage_options)
    input_uri = storage.uri(in_fs, in_root)
    res = plan_resources(job)
    shard_plan = plan.prepare(in_fs, in_root, out_fs, out_root, job.shard_size, res["actors"][1], job.incremental,
                              progress)
    done = plan.finished_shards(out_fs, out_root)
    parts = plan.pending_parts(shard_plan, done)
    pending = sum(len(p["pending"]) for p in parts)
    progress(f"{input_uri}: {shard_plan.files} files in {shard_plan.shards} shards, {len(done)} already finished"
             + ("" if pending else ": nothing to do"))
    errors_so_far = sum(e for _, e in done.values())
    inflight = inflight_bytes(shard_plan.shard_size, res["actors"][1], job.row_bytes)
    finished_before = set(done)
    if parts:
        lines = plan.Progress(shard_plan.shards, shard_plan.files, done, progress, every_seconds=progress_seconds)
        context = ray.data.DataContext.get_current()
        block_bytes, context.target_max_block_size = context.target_max_block_size, _SHARD_BLOCK_BYTES
        ds = ray.data.from_items(parts, override_num_blocks=len(parts))
        # Fewer CPUs than decoding, so the two are not fused: each shard is a block and gets its own decode task.
        ds = ds.map_batches(plan.expand_parts, batch_size=1, batch_format="pyarrow", num_cpus=0.1,
                            fn_kwargs={"output": job.output, "storage_options": job.storage_options})
        ds = ds.map_batches(decode_shards, batch_size=1, batch_format="pyarrow", num_cpus=res["decode_cpus"],
                            fn_kwargs={"input_root": job.input, "storage_options": job.storage_options,
                                       "max_pixels": job.max_pixels})
        min_actors, max_actors = res["actors"]
        ds = ds.map_batches(job.model_cls, batch_size=1, batch_format="pyarrow",
                            fn_constructor_kwargs={**job.model_kwargs, "threads": res["threads"]},
                            compute=ray.data.ActorPoolStrategy(min_size=min_actors, max_size=max_actors,
                                                               max_tasks_in_flight_per_actor=res["in_flight"]),
                            num_gpus=res["num_gpus"], num_cpus=res["actor_cpus"])
        ds = ds.map_batches(write_shards, batch_size=1, batch_format="pyarrow", num_cpus=0.25,
                            fn_kwargs={"output": job.output, "rows_dir": job.rows_dir,
                                       "storage_options": job.storage_options, "compression": job.compression})
        context.target_max_block_size = block_bytes  # the Dataset keeps the context it was built with
        for marker in ds.iter_rows():
            rows, errors = int(marker["rows"]), int(marker["errors"])
            done[int(marker["shard"])] = (rows, errors)
            lines.shard_finished(rows, errors)
            errors_so_far += errors
            if job.max_errors is not None and errors_so_far > job.max_errors:
                raise TooManyErrors(
                    f"{errors_so_far} images failed, over --max-errors {job.max_errors}; see "
                    f"{storage.uri(out_fs, storage.join(out_root, schema.ERRORS_DIR))} (rerun to resume)"
                )
    elapsed = time.time() - started
    processed = sum(r + e for k, (r, e) in done.items() if k not in finished_before)
    manifest = {
        "input": input_uri,
        "output": storage.uri(out_fs, out_root),
        "images": shard_plan.files,
        "rows": sum(r for r, _ in done.values()),
        "errors": sum(e for _, e in done.values()),
        "shards": shard_plan.shards,
        "shards_this_run": pending,
        "shard_size": shard_plan.shard_size,
        "increments": shard_plan.increments,
        "seconds": round(elapsed, 2),
        "images_per_second": round(processed / elapsed, 2) if elapsed > 0 else None,
        "resources": {k: v for k, v in res.items() if k != "actors"} | {"actors": list(res["actors"]),
                                                                        "inflight_bytes": inflight},
        "versions": _versions(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **job.manifest,
    }
    if manifest["rows"] + manifest["errors"] != shard_plan.files:
        raise RuntimeError(f"accounting error: {manifest['rows']} rows + {manifest['errors']} errors "
                           f"!= {shard_plan.files}")
    storage.write_json_atomic(out_fs, storage.join(out_root, schema.MANIFEST_FILE), manifest)
    return manifest


def _versions() -> dict[str, str]:
    import PIL
    import torch
    import torchvision

    from raycap import __version__

    return {"raycap": __version__, "ray": ray.__version__, "torch": torch.__version__,
            "torchvision": torchvision.__version__, "pyarrow": pa.__version__, "pillow": PIL.__version__,
            "python": os.sys.version.split()[0]}
