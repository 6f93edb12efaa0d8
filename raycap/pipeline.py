"""The sharded image pipeline extract and caption share: plan, read and decode, model actor pool, commits.

A shard is a fixed list of input files (the plan, stored with the output on the first run). Each shard
travels through Ray Data as ONE row, so no stage can split it. On CPU nodes one stage does everything: a
model actor reads its shard's files, decodes them, runs the model and writes the rows, then the commit
marker (raycap/stages.py). In front of GPU actors that take Pillow's pixels, CPU tasks read and decode, so
that the GPU never waits for the CPU; GPU actors that decode on their device read their own shards' bytes (no
trip through a CPU node). A shard is finished when its marker exists; reruns skip
finished shards and redo the others, which overwrite their deterministic file names, so rows are never
duplicated or lost. This is the only module that sets concurrency, num_gpus and batch sizes.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from raycap import attempts, markers, plan, resources, schema, shards, sources, stages, storage
from raycap.config import PipelineConfig
from raycap.images import DEFAULT_MAX_PIXELS
from raycap.plan import auto_shard_size  # noqa: F401 - part of this module's interface
from raycap.progress import Progress
from raycap.sources import SourceSpec


@dataclass
class ShardJob:
    """What one run of the sharded pipeline needs; built from a job's config by `ShardJob.from_config`."""

    input: str  # folder or s3:// prefix of images
    output: str  # output root
    rows_dir: str  # schema.FEATURES_DIR or schema.CAPTIONS_DIR
    model_cls: type  # a stages.ShardModel subclass, built once per actor
    model_kwargs: dict[str, Any]
    shard_size: int | None = None  # images per shard (the unit of retry, resume and output file); None: auto
    batch_size: int | None = None  # images per model forward; None: CPU_BATCH or GPU_BATCH by the actor's device
    decode: str = "auto"  # cpu (Pillow) | device (the actor's device) | auto: device on GPUs
    max_pixels: int = DEFAULT_MAX_PIXELS  # decompression-bomb guard, checked before decoding
    max_errors: int | None = None  # stop once more images than this have failed (None: never)
    actors: tuple[int, int] | None = None  # (min, max) model actors; None: one per GPU, or sized to CPUs
    gpus_per_actor: float | None = None  # None: 1 when the cluster has GPUs, else 0
    actor_cpus: float | None = None  # CPUs reserved per model actor; None: plan_resources decides
    decode_cpus: float | None = None  # CPUs reserved per decode task (GPU actors); None: plan_resources decides
    compression: str = "none"  # Parquet compression of the output rows
    row_bytes: int = 0  # size of one output row, for the in-flight working-set estimate
    storage_options: dict[str, Any] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)  # job-specific facts recorded in _manifest.json
    incremental: bool = False  # relist the input and plan new shards for files added since the plan
    decode_tasks: bool | None = None  # read and decode in CPU tasks before the actors; None: GPU actors, CPU decode
    source: SourceSpec = field(default_factory=lambda: SourceSpec("auto"))  # the kind of input store

    @classmethod
    def from_config(cls, config: PipelineConfig, **job: Any) -> ShardJob:
        """The settings every pipeline shares come from `config`; `job` gives the rest (rows_dir, model, ...)."""
        shared = {name: getattr(config, name) for name in _SHARED_SETTINGS}
        return cls(**shared, source=config.source(), **job)


_SHARED_SETTINGS = (
    "input",
    "output",
    "shard_size",
    "batch_size",
    "decode",
    "max_pixels",
    "max_errors",
    "actors",
    "gpus_per_actor",
    "storage_options",
    "incremental",
)
CPU_BATCH = 16  # images per forward on a CPU: larger batches gain nothing there and hold more memory
GPU_BATCH = 128  # images per forward on a GPU: enough to keep it busy in bf16


_SHARD_BLOCK_BYTES = 1024  # target block size of the job's Dataset: every shard row (one per batch) is a block


def resolved(value: Any) -> Any:
    """An actor argument shipped through the object store (`ray.put` on the driver), or the value itself."""
    return ray.get(value) if isinstance(value, ray.ObjectRef) else value


class TooManyErrors(RuntimeError):
    """More images failed than --max-errors allows."""


def inflight_bytes(shard_size: int, actors: int, row_bytes: int, decode_tasks: bool = True, in_flight: int = 1) -> int:
    """The run's expected working set of shards (pixels and rows), recorded in the manifest. When decode tasks
    feed the actors (GPU nodes), decoded shards wait in the object store: per actor the shard it works on and
    one queued, plus a few in between (bench/memory.py measures the store's peak; Ray Data's executor budget,
    half the store, is the hard bound). Actors that read their own shards hold `in_flight` each in their own
    memory, and the store none."""
    pixel_bytes = int(np.prod(shards.PIXEL_SHAPE))
    return (2 * actors + 4 if decode_tasks else in_flight * actors) * shard_size * (pixel_bytes + row_bytes)


def plan_resources(job: ShardJob) -> dict[str, Any]:
    """Actor pool size, GPUs, CPUs and threads per actor, CPUs per decode task, planned per node
    (raycap.resources); a job no node shape can run raises Unschedulable (one line) before anything starts."""
    res = resources.plan_actors(
        resources.node_shapes(), job.gpus_per_actor, job.actors, alive=resources.node_shapes(autoscaler=False)
    )
    return res


def settle_resources(job: ShardJob, planned: dict[str, Any]) -> dict[str, Any]:
    """What the job itself fixes on top of `plan_resources`: explicit CPU reservations, the batch size, where
    images are decoded and whether decode tasks feed the actors, the last three by the actor's device.

    CPU actors read and decode their own shards: a task in front of them would decode on the same cores and
    only add a worker process and a trip of the pixels through the object store. GPU actors that take Pillow's
    pixels are fed by CPU tasks, so that the GPU's time goes to the model; GPU actors that decode on their
    device read their own shards' bytes: a task that only read them would send every byte store -> CPU node ->
    GPU node."""
    gpu = planned["num_gpus"] > 0
    decode = "device" if job.decode == "device" or (job.decode == "auto" and gpu) else "cpu"
    settled = {
        "batch_size": job.batch_size or (GPU_BATCH if gpu else CPU_BATCH),
        "decode": decode,
        "decode_tasks": (gpu and decode == "cpu") if job.decode_tasks is None else job.decode_tasks,
    }
    # GPU actors take two shards at a time: one forward pass on the device while the other shard is read,
    # unpacked or written. CPU actors take one: a shard takes seconds there, and a free actor takes the next
    # one, so none sits in another actor's queue at the end.
    settled["in_flight"] = 2 if gpu or settled["decode_tasks"] else 1
    if job.actor_cpus is not None:
        settled["actor_cpus"] = job.actor_cpus
    if job.decode_cpus is not None:
        settled["decode_cpus"] = job.decode_cpus
    return settled


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
    storage.remove_stale_temporaries(out_fs, out_root)  # an earlier run's killed writes
    attempts.clear(out_fs, out_root)  # an earlier run's tries: every unfinished shard gets SHARD_ATTEMPTS anew
    res = plan_resources(job)
    res |= settle_resources(job, res)
    shard_plan = plan.prepare(
        in_fs, in_root, out_fs, out_root, job.shard_size, res["actors"][1], job.incremental, progress, job.source
    )
    source = shard_plan.spec
    if source.packed:  # the actors read a tar or Parquet file themselves, a piece at a time (no shard in the store)
        res["decode_tasks"] = False
    done = markers.finished_shards(out_fs, out_root)
    parts = plan.pending_parts(shard_plan, done)
    pending = sum(len(p["pending"]) for p in parts)
    progress(
        f"{input_uri}: {shard_plan.files} {plan.units_name(shard_plan)} in {shard_plan.shards} shards, "
        f"{len(done)} already finished" + ("" if pending else ": nothing to do")
    )
    errors_so_far = sum(e for _, e in done.values())
    shard_images = sources.PIECE_IMAGES if source.packed else shard_plan.shard_size  # held at a time per shard
    inflight = inflight_bytes(shard_images, res["actors"][1], job.row_bytes, res["decode_tasks"], res["in_flight"])
    finished_before = set(done)
    failed: dict[int, str] = {}  # shard -> why, of shards out of tries (raycap.attempts)
    if parts:
        lines = Progress(shard_plan.shards, shard_plan.images, done, progress, every_seconds=progress_seconds)
        ds = _shard_dataset(job, res, parts, source)
        for marker in resources.watched(ds.iter_rows(), resources.stall_seconds(), "shard"):
            if attempts.is_failed(marker):
                failed[int(marker["shard"])] = marker[attempts.FAILED]
                continue
            rows, errors = int(marker["rows"]), int(marker["errors"])
            done[int(marker["shard"])] = (rows, errors)
            lines.shard_finished(rows, errors)
            errors_so_far += errors
            if job.max_errors is not None and errors_so_far > job.max_errors:
                raise TooManyErrors(
                    f"{errors_so_far} images failed, over --max-errors {job.max_errors}; see "
                    f"{storage.uri(out_fs, storage.join(out_root, schema.ERRORS_DIR))} (rerun to resume)"
                )
    if failed:
        raise attempts.ShardsFailed(attempts.failure_line(failed))
    elapsed = time.time() - started
    processed = sum(r + e for k, (r, e) in done.items() if k not in finished_before)
    manifest = {
        "input": input_uri,
        "output": storage.uri(out_fs, out_root),
        "input_format": source.format,
        "keep_columns": list(source.keep_columns),
        "images": sum(r + e for r, e in done.values()),
        "units": shard_plan.files,  # planned files (files, list), tars (webdataset) or Parquet files (parquet)
        "rows": sum(r for r, _ in done.values()),
        "errors": sum(e for _, e in done.values()),
        "shards": shard_plan.shards,
        "shards_this_run": pending,
        "shard_size": shard_plan.shard_size,
        "increments": shard_plan.increments,
        "skipped": sum(i.get("skipped", 0) for i in shard_plan.increments),  # hidden or raycap's own names
        "seconds": round(elapsed, 2),
        "images_per_second": round(processed / elapsed, 2) if elapsed > 0 else None,
        "resources": {k: v for k, v in res.items() if k != "actors"}
        | {"actors": list(res["actors"]), "inflight_bytes": inflight},
        "versions": _versions(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **job.manifest,
    }
    if len(done) != shard_plan.shards or (shard_plan.images is not None and manifest["images"] != shard_plan.images):
        raise RuntimeError(
            f"accounting error: {len(done)} of {shard_plan.shards} shards committed, {manifest['rows']} rows + "
            f"{manifest['errors']} errors for {shard_plan.images or 'unknown'} images"
        )
    storage.write_json_atomic(out_fs, storage.join(out_root, schema.MANIFEST_FILE), manifest)
    return manifest


@contextlib.contextmanager
def _shard_context() -> Iterator[None]:
    """The Ray Data settings a job's Dataset is built with (it keeps a copy of the context it was built in):
    every shard row is a block of its own, and a stage's own exception (a full disk, S3 refusing a write)
    reaches the driver as itself, not as Ray Data's UserCodeException, which keeps only its text, so the CLI
    can turn the known ones into one line."""
    context = ray.data.DataContext.get_current()
    saved = context.target_max_block_size, context.raise_original_map_exception
    context.target_max_block_size, context.raise_original_map_exception = _SHARD_BLOCK_BYTES, True
    try:
        yield
    finally:
        context.target_max_block_size, context.raise_original_map_exception = saved


def _shard_dataset(
    job: ShardJob, res: dict[str, Any], parts: list[dict[str, Any]], source: SourceSpec
) -> ray.data.Dataset:
    """The job's Dataset: plan parts -> shard rows -> [decode tasks] -> model actors -> one marker per shard."""
    io = stages.ShardIO(
        job.input, job.output, job.rows_dir, job.storage_options, job.max_pixels, job.compression, source
    )
    with _shard_context():
        ds = ray.data.from_items(parts, override_num_blocks=len(parts))
        # No CPU reserved (it only reads the plan, and a task waiting on the next stage would hold its CPU all
        # run, keeping a decode task out) and one task at a time. Its reservation differs from the next
        # stage's, so the two are not fused: each shard is a block of its own.
        ds = ds.map_batches(
            plan.expand_parts,
            batch_size=1,
            batch_format="pyarrow",
            num_cpus=0,
            concurrency=1,
            fn_kwargs={"output": job.output, "storage_options": job.storage_options},
        )
        if res["decode_tasks"]:
            ds = ds.map_batches(
                stages.decode_shards,
                batch_size=1,
                batch_format="pyarrow",
                num_cpus=res["decode_cpus"],
                fn_kwargs={"io": io, "decode": res["decode"]},
            )
        # No more actors than shards to do: an actor without a shard only costs a worker process with torch loaded.
        pending = sum(len(p["pending"]) for p in parts)
        min_actors, max_actors = (min(n, pending) for n in res["actors"])
        ds = ds.map_batches(
            job.model_cls,
            batch_size=1,
            batch_format="pyarrow",
            fn_constructor_kwargs={
                **job.model_kwargs,
                "io": io,
                "threads": res["threads"],
                "batch_size": res["batch_size"],
                "decode": res["decode"],
            },
            compute=ray.data.ActorPoolStrategy(
                min_size=min_actors,
                max_size=max_actors,
                max_tasks_in_flight_per_actor=res["in_flight"],
                max_concurrent_calls_per_actor=res["in_flight"],
                enable_true_multi_threading=res["in_flight"] > 1,  # ShardModel lets forward passes take turns
            ),
            num_gpus=res["num_gpus"],
            num_cpus=res["actor_cpus"],
            # Ray 2.60 takes these only as ray_remote_args (it warns: 2.64 names them). A restart follows a death
            # in a call, and a call is retried a bounded number of times (Ray Data's default: forever).
            max_restarts=-1,
            max_task_retries=attempts.ray_task_retries(),
        )
    return ds


def _versions() -> dict[str, str]:
    import PIL
    import torch

    from raycap import __version__
    from raycap.versions import installed_version

    return {
        "raycap": __version__,
        "ray": ray.__version__,
        "torch": torch.__version__,
        "torchvision": installed_version("torchvision"),  # not imported on the driver
        "pyarrow": pa.__version__,
        "pillow": PIL.__version__,
        "python": os.sys.version.split()[0],
    }
