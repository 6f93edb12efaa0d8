"""Benchmark: the same images as WebDataset tars and as loose files, read by raycap in one run; prints ratios.

Two measurements, each tars against files over the same synthetic images:
  read   the read + decode stage alone (stages.read_shard, Pillow on all cores; no model), on local disk and on
         a moto S3 server that delays every request by --latency-ms (an S3 round trip): one sequential read per
         tar against one request per file;
  extract  the whole `raycap extract` (random weights) on local disk, where the model dominates.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import pyarrow as pa
import s3fs
from plan import moto  # bench/ is on sys.path when a bench runs as a script

from raycap import plan, schema, stages, storage, synth
from raycap.encoder import cpu_description
from raycap.sources import SourceSpec


def make_stores(root: str, images: int, per_tar: int) -> tuple[str, str]:
    """`images` synthetic images as loose files and as tars of `per_tar` samples (KEY.jpg + KEY.txt)."""
    import webdataset as wds

    synth.generate(root, num_images=images, seed=0)
    files = os.path.join(root, "images")
    tars = os.path.join(root, "tars")
    os.makedirs(tars)
    names = sorted(os.listdir(files))
    for t in range(0, len(names), per_tar):
        with wds.TarWriter(os.path.join(tars, f"{t // per_tar:05d}.tar")) as sink:
            for name in names[t : t + per_tar]:
                with open(os.path.join(files, name), "rb") as f:
                    sink.write({"__key__": name.removesuffix(".jpg"), "jpg": f.read(), "txt": name})
    return files, tars


def read_rate(inp: str, spec: SourceSpec, options: dict, workers: int) -> float:
    """Images/s of planning nothing new and reading + decoding every shard of `inp` (first run plans)."""
    in_fs, in_root = storage.filesystem(inp, options)
    out = tempfile.mkdtemp(prefix="bench-sources-")
    out_fs, out_root = storage.filesystem(out)
    made = plan.prepare(in_fs, in_root, out_fs, out_root, 64 if not spec.packed else None, 1, say=lambda _: None,
                        source=spec)  # fmt: skip
    io = stages.ShardIO(inp, out, schema.FEATURES_DIR, options, source=made.spec)
    rows = list(plan.expand_parts(pa.Table.from_pylist(plan.pending_parts(made, {})), out, {}))
    started, images = time.perf_counter(), 0
    for row in rows:
        for shard, units in stages._plan_rows(row):
            images += sum(len(p.meta) for p in stages.read_shard(io, shard, units, True, workers))
    elapsed = time.perf_counter() - started
    shutil.rmtree(out)
    return images / elapsed


def extract_rate(inp: str, out: str, fmt: str) -> float:
    from raycap.config import ExtractConfig
    from raycap.extract import run

    manifest = run(ExtractConfig(input=inp, output=out, input_format=fmt, encoder_weights="random"))
    return manifest["images_per_second"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--per-tar", type=int, default=128)
    p.add_argument("--latency-ms", type=float, default=20.0, help="delay of every request on the moto server")
    p.add_argument("--no-extract", action="store_true", help="only the read stage (no Ray, no model)")
    a = p.parse_args(argv)
    workers = os.cpu_count() or 1
    print(f"cpu: {cpu_description()}; {workers} cores; {a.images} images, {a.per_tar} per tar", flush=True)
    root = tempfile.mkdtemp(prefix="bench-stores-")
    try:
        files, tars = make_stores(root, a.images, a.per_tar)
        results: dict[str, float] = {}
        for _ in range(2):  # alternating, best of two: the machine is noisy
            for name, inp, spec in (("files", files, SourceSpec("files")), ("tars", tars, SourceSpec("webdataset"))):
                results[f"local {name}"] = max(results.get(f"local {name}", 0), read_rate(inp, spec, {}, workers))
        with moto(0, a.latency_ms) as info:
            options = {"key": "bench", "secret": "bench", "client_kwargs": {"endpoint_url": info["endpoint"]}}
            fs = s3fs.S3FileSystem(**options)
            fs.put(files, "bench/files", recursive=True)
            fs.put(tars, "bench/tars", recursive=True)
            for name, spec in (("files", SourceSpec("files")), ("tars", SourceSpec("webdataset"))):
                results[f"s3 {name}"] = read_rate(f"s3://bench/{name}", spec, options, workers)
        for where in ("local", "s3"):
            extra = f" ({a.latency_ms:g} ms per request)" if where == "s3" else ""
            tar_rate, file_rate = results[f"{where} tars"], results[f"{where} files"]
            print(
                f"read+decode {where}{extra}: tars {tar_rate:.0f} images/s, files {file_rate:.0f} images/s: "
                f"{tar_rate / file_rate:.2f}x",
                flush=True,
            )
        if not a.no_extract:
            import ray

            ray.init(include_dashboard=False, log_to_driver=False)
            rates = {fmt: extract_rate(inp, os.path.join(root, f"out-{fmt}"), fmt)
                     for fmt, inp in (("files", files), ("webdataset", tars))}  # fmt: skip
            print(
                f"extract local (whole command, random weights): tars {rates['webdataset']:.1f} images/s, files "
                f"{rates['files']:.1f} images/s: {rates['webdataset'] / rates['files']:.2f}x",
                flush=True,
            )
        print(json.dumps({k: round(v, 1) for k, v in results.items()}))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
