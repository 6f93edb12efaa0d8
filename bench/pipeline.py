"""Benchmark: the shard pipeline's own cost, with a model stage that does no work, against decoding alone.

The bench writes photo-sized JPEGs (640x480, plus a few 3000x2000), then runs `pipeline.run` with resources
planned as on a GPU node: decode tasks (a core each) in front of the model actor, which reserves no CPU but
whose work (unpacking shards, writing rows) is counted; every core is given to decoding.
It runs a quarter of the files, then all of them: the steady state is their difference, free of fixed costs.
It prints, with the CPU's flags:

- steady-state images/s per decoding core, against `images.decode_image` alone on one core (target >= 0.85),
  and the same ratio in CPU seconds per image over every process of the local Ray cluster (which holds on a
  machine shared with other work, where wall-clock rates do not);
- the fixed cost before the first shard is committed, on a warm cluster (target < 5 s);
- the bytes each image moves through the object store (pixels or file bytes in, feature rows out) and the
  copies of its pixel and feature data along the way.

The first commit's time comes from the commit markers' modification times. `--decode device` runs the same
pipeline with decoding inside the (CPU) model actor, to measure what moving file bytes instead of pixels costs.
"""

from __future__ import annotations

import argparse
import glob
import os
import pathlib
import shutil
import sys
import time

import numpy as np
import pyarrow as pa
import ray
from cpumeter import CpuMeter  # bench/ is on sys.path when a bench runs as a script
from PIL import Image

from raycap import images, pipeline, resources, schema, stages
from raycap.encoder import cpu_description

# Copies of each image's data outside decoders and the model, counted along the code (raycap/shards.py packs
# pixels and reads them in place). CPU decoding: Pillow's bytes -> numpy (images.decode_image) -> the shard's
# pixel array -> the object store. Device decoding moves the (smaller) file bytes instead: fs.cat's bytes ->
# the shard's IPC buffer -> the object store -> the tensor decode_jpeg reads. Features, both ways: model output
# -> Arrow column over the same memory (schema.features_to_arrow) -> the Parquet writer, in the model actor
# (raycap/stages.py): they never enter the object store.
PIXEL_COPIES = {"cpu": 3, "device": 0}
FILE_COPIES = {"cpu": 0, "device": 3}
FEATURE_COPIES = 0


class ZeroModel(stages.ShardModel):
    """The model stage without a model: zero features of the real size, so the rows cost what real ones do."""

    def predict(self, pixels, meta: pa.Table) -> pa.Table:
        features = np.zeros((len(meta), schema.NUM_REGIONS, schema.FEATURE_DIM), np.float16)
        columns = [
            meta[schema.IMAGE_ID],
            meta[schema.PATH],
            schema.features_to_arrow(features),
            meta[schema.WIDTH],
            meta[schema.HEIGHT],
        ]
        return pa.table(columns, schema=schema.features_schema())


def make_photos(folder: str, small: int, large: int, repeat: int, seed: int = 0) -> list[str]:
    """Photo-like JPEGs (smooth gradients, texture and noise; quality 90): `small` 640x480, `large` 3000x2000,
    each also under `repeat - 1` more names (hard links: as many files to decode, for the price of one)."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i, (w, h) in enumerate([(640, 480)] * small + [(3000, 2000)] * large):
        path = os.path.join(folder, f"photo-{i:05d}.jpg")
        paths.append(path)
        if os.path.exists(path):
            continue
        coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC)
        noise = rng.normal(0, 12, (h // 4, w // 4, 3))
        detail = Image.fromarray(np.clip(noise + 128, 0, 255).astype(np.uint8)).resize((w, h))
        Image.blend(img, detail, 0.3).save(path, "JPEG", quality=90)
    for name in os.listdir(folder):  # aliases of an earlier run with a larger --repeat
        if name.startswith("r") and int(name[1:].split("-")[0]) >= repeat:
            os.remove(os.path.join(folder, name))
    for k in range(1, repeat):
        for path in paths[: small + large]:
            alias = os.path.join(folder, f"r{k}-{os.path.basename(path)}")
            if not os.path.exists(alias):
                os.link(path, alias)
            paths.append(alias)
    return paths


def decode_only(paths: list[str]) -> tuple[float, float]:
    """images/s of images.decode_image alone on one core (files already in memory), and its CPU s per image."""
    data = [pathlib.Path(p).read_bytes() for p in paths]
    images.decode_image(data[0])
    started, cpu = time.perf_counter(), time.process_time()
    for d in data:
        images.decode_image(d)
    return len(data) / (time.perf_counter() - started), (time.process_time() - cpu) / len(data)


def subset(folder: str, paths: list[str], fraction: float) -> str:
    """A sibling folder holding the first `fraction` of `paths` as hard links: the short run's input."""
    short = folder.rstrip("/") + "-short"
    shutil.rmtree(short, ignore_errors=True)
    os.makedirs(short)
    for path in paths[: int(len(paths) * fraction)]:
        os.link(path, os.path.join(short, os.path.basename(path)))
    return short


def run_pipeline(
    folder: str, out: str, shard_size: int, decode: str, decode_cpus: float = resources.GPU_DECODE_CPUS
) -> dict:
    """One run on a warm cluster: its wall seconds, CPU seconds over every process, images, and the seconds
    from its start to its first commit (from the commit markers' modification times)."""
    shutil.rmtree(out, ignore_errors=True)
    job = pipeline.ShardJob(
        input=folder,
        output=out,
        rows_dir=schema.FEATURES_DIR,
        model_cls=ZeroModel,
        model_kwargs={},
        shard_size=shard_size,
        actors=(1, 1),
        gpus_per_actor=0,
        decode=decode,
        decode_tasks=True,
        actor_cpus=0,  # a GPU actor's CPU work (unpacking, writing rows) is counted, but no core is kept for it
        decode_cpus=decode_cpus,  # by default a core per decode task, as raycap plans a GPU node
        row_bytes=schema.NUM_REGIONS * schema.FEATURE_DIM * 2,
    )
    started = time.time()
    with CpuMeter() as meter:
        manifest = pipeline.run(job, progress=lambda _: None)
    ended = time.time()
    first = min(os.stat(path).st_mtime for path in glob.glob(os.path.join(out, schema.SHARDS_DIR, "*.json")))
    return {
        "seconds": ended - started,
        "cpu": meter.between(started, ended),
        "images": manifest["rows"] + manifest["errors"],
        "fixed_s": first - started,
        "shards": manifest["shards"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", type=int, default=400, help="640x480 JPEGs")
    parser.add_argument("--large", type=int, default=8, help="3000x2000 JPEGs")
    parser.add_argument("--repeat", type=int, default=10, help="files per distinct image (a longer steady state)")
    parser.add_argument("--shard-size", type=int, default=64)
    parser.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs of the local Ray cluster")
    parser.add_argument("--decode", default="cpu", choices=["cpu", "device", "both"])
    parser.add_argument("--decode-cpus", type=float, default=resources.GPU_DECODE_CPUS, help="CPUs per decode task")
    parser.add_argument("--workdir", default="bench-output/pipeline")
    args = parser.parse_args(argv)
    folder = os.path.join(args.workdir, "photos")
    paths = make_photos(folder, args.small, args.large, args.repeat)
    short = subset(folder, paths, 0.25)
    print(f"CPU: {cpu_description()}")
    print(
        f"{len(paths)} JPEGs: {args.small} at 640x480 and {args.large} at 3000x2000, each {args.repeat} times; "
        f"shards of {args.shard_size}"
    )
    single, single_cpu = decode_only(paths[: args.small + args.large])
    print(f"decode_image alone, one core: {single:.1f} images/s, {single_cpu * 1e3:.2f} ms CPU per image")
    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    cores = int(ray.cluster_resources()["CPU"])
    try:
        out = os.path.join(args.workdir, "out")
        run_pipeline(short, out, args.shard_size, "cpu")  # warm-up: worker processes and imports
        for decode in ("cpu", "device") if args.decode == "both" else (args.decode,):
            # Two runs, a quarter and all of the files: their differences are the steady state, with every
            # fixed cost (actor start, the first and last shards in flight, the manifest) cancelled out.
            a = run_pipeline(short, out, args.shard_size, decode, args.decode_cpus)
            b = run_pipeline(folder, out, args.shard_size, decode, args.decode_cpus)
            images = b["images"] - a["images"]
            steady = images / (b["seconds"] - a["seconds"])
            cpu_per_image = (b["cpu"] - a["cpu"]) / images
            moved = "file bytes" if decode == "device" else "pixels"
            in_bytes = sum(os.path.getsize(p) for p in paths) / len(paths) if decode == "device" else 299 * 299 * 3
            print(
                f"[decode={decode}] {a['images']} then {b['images']} images ({b['shards']} shards): whole runs "
                f"{a['images'] / a['seconds']:.1f} and {b['images'] / b['seconds']:.1f} images/s; steady state "
                f"(their difference) {steady:.1f} images/s on {cores} cores = {steady / cores:.1f} per core: "
                f"ratio {steady / cores / single:.2f} of decode_image alone (target >= 0.85)"
            )
            print(
                f"[decode={decode}] CPU per image in the steady state, every process of the Ray cluster: "
                f"{cpu_per_image * 1e3:.2f} ms: ratio {single_cpu / cpu_per_image:.2f} of decode_image alone "
                f"(holds on a busy machine, where wall-clock rates do not)"
            )
            print(
                f"[decode={decode}] fixed cost before the first shard is committed (warm cluster): "
                f"{b['fixed_s']:.2f} s (target < 5 s)"
            )
            print(
                f"[decode={decode}] per image through the object store: {in_bytes / 1e3:.0f} KB of {moved}; "
                f"{schema.NUM_REGIONS * schema.FEATURE_DIM * 2 / 1e3:.0f} KB of features written by the model actor; "
                f"copies: {PIXEL_COPIES[decode]} of pixels outside the decoder, {FEATURE_COPIES} of features"
            )
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
