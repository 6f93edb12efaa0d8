"""Benchmark: `raycap extract` against its own model alone and the tutorial's plain loop, same images, one run.

Prints, with the CPU's flags, the whole command's images/s (Ray start-up, listing, decoding, model, writing)
as two ratios: against the encoder alone on random pixels on the same cores (target >= 0.85; the pipeline's
efficiency), and against the tutorial's plain PyTorch loop (target >= 1.25x on CPUs with native bf16). A
second command on a quarter of the images gives the steady state (the difference of the two, free of fixed
costs) against the model alone too. Also the write/read MB/s of candidate Parquet encodings of the feature
tensor.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from cpumeter import CpuMeter  # bench/ is on sys.path when a bench runs as a script
from PIL import Image

from raycap import pipeline, schema, synth
from raycap.encoder import FeatureExtractor, _inception_trunk, cpu_description, preprocess, resolve_weights

SMALL_JOB = 16  # images of the smallest command timed: almost all of it is fixed cost


def plain_loop(paths: list[str], batch_size: int = 32) -> tuple[float, float]:
    """The tutorial's way: decode + resize with PIL one by one, InceptionV3 in NCHW fp32, batch 32."""
    trunk = _inception_trunk("random").eval()
    torch.set_num_threads(os.cpu_count() or 1)
    started, cpu = time.perf_counter(), time.process_time()
    with torch.inference_mode():
        for i in range(0, len(paths), batch_size):
            batch = [
                np.asarray(Image.open(p).convert("RGB").resize((299, 299), Image.BILINEAR))
                for p in paths[i : i + batch_size]
            ]
            trunk(preprocess(torch.from_numpy(np.stack(batch)))).flatten(2).transpose(1, 2).half()
    return len(paths) / (time.perf_counter() - started), (time.process_time() - cpu) / len(paths)


def model_only(batches: int = 3, batch_size: int = pipeline.CPU_BATCH) -> tuple[float, float, float]:
    """Images/s of the encoder alone on random pixels: the plain NCHW fp32 trunk vs our FeatureExtractor
    (BN folded, channels_last, the precision `auto` picks here). Their ratio is the ceiling of what the
    model side can win on this CPU; the pipeline's job is to come close to it. Also ours' CPU s per image."""
    torch.set_num_threads(os.cpu_count() or 1)
    pixels = torch.randint(0, 256, (batch_size, 299, 299, 3), dtype=torch.uint8)
    plain = _inception_trunk("random").eval()
    ours = FeatureExtractor("random", precision="auto", batch_size=batch_size)
    rates, cpu = [], 0.0
    for fn in (lambda: plain(preprocess(pixels)), lambda: ours(pixels.numpy())):
        with torch.inference_mode():
            fn()
            started, cpu = time.perf_counter(), time.process_time()
            for _ in range(batches):
                fn()
        rates.append(batches * batch_size / (time.perf_counter() - started))
        cpu = (time.process_time() - cpu) / (batches * batch_size)
    return rates[0], rates[1], cpu


def raycap_extract(images: str, output: str) -> dict:
    """One `raycap extract` command: its wall seconds, CPU seconds over every process (Ray's included), manifest,
    and the seconds from its start to its first commit (the commit markers' modification times)."""
    started = time.time()
    with CpuMeter() as meter:
        subprocess.run(
            [sys.executable, "-m", "raycap.cli", "extract", "--input", images, "--output", output]
            + ["--encoder-weights", "random"],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    ended = time.time()
    with open(os.path.join(output, schema.MANIFEST_FILE)) as f:
        manifest = json.load(f)
    markers = os.path.join(output, schema.SHARDS_DIR)
    first = min(os.stat(os.path.join(markers, name)).st_mtime for name in os.listdir(markers))
    return {
        "seconds": ended - started,
        "cpu": meter.between(started, ended),
        "images": manifest["rows"],
        "manifest": manifest,
        "first_commit_s": first - started,
    }


def subset(images: str, count: int) -> str:
    """A sibling folder with the first `count` images as hard links: the short run's input."""
    short = images.rstrip("/") + f"-first-{count}"
    shutil.rmtree(short, ignore_errors=True)
    os.makedirs(short)
    for name in sorted(os.listdir(images))[:count]:
        os.link(os.path.join(images, name), os.path.join(short, name))
    return short


def bare_imports(repeats: int = 3) -> float:
    """Median wall seconds of a fresh interpreter importing what every command needs: the floor of a fixed cost."""
    code = "import torch, torchvision, ray, ray.data"
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True)
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def encodings(rows: int = 256, repeats: int = 3) -> dict[str, tuple[float, float]]:
    """Write and read MB/s of one shard of float16 features under candidate Arrow types."""
    feats = np.abs(np.random.default_rng(0).standard_normal((rows, 64, 2048))).astype(np.float16)
    feats[feats < 0.7] = 0  # ReLU features are about half zeros
    mb = feats.nbytes / 1e6
    columns = {
        "fixed_size_binary": schema.features_to_arrow(feats),
        "fixed_shape_tensor": pa.FixedShapeTensorArray.from_numpy_ndarray(feats),
        "list<float16>": pa.array(list(feats.reshape(rows, -1))),
    }
    out = {}
    for name, column in columns.items():
        table = pa.table({"features": column})
        write = read = 0.0
        for _ in range(repeats):
            sink = io.BytesIO()
            t = time.perf_counter()
            pq.write_table(table, sink, compression="none")
            write += time.perf_counter() - t
            t = time.perf_counter()
            back = pq.read_table(io.BytesIO(sink.getvalue()))
            if name == "fixed_size_binary":
                schema.features_to_numpy(back["features"])
            read += time.perf_counter() - t
        out[name] = (mb * repeats / write, mb * repeats / read)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--workdir", default="bench-output/extract")
    args = parser.parse_args(argv)
    data = os.path.join(args.workdir, "data")
    if not os.path.exists(os.path.join(data, synth.CAPTIONS_FILE)):
        synth.generate(data, args.images, seed=7)
    images = os.path.join(data, synth.IMAGES_DIR)
    paths = sorted(os.path.join(images, p) for p in os.listdir(images))[: args.images]
    out = os.path.join(args.workdir, f"features-{int(time.time())}")
    resolve_weights("random")  # the random trunk's cache file, as after any earlier command: no run below builds it
    whole = raycap_extract(images, out)
    # A quarter of the images, then all: the difference is the steady state, every fixed cost (Ray's start,
    # the weights, actors starting, the last shards, exit) cancelled out.
    short = raycap_extract(subset(images, args.images // 4), out + "-short")
    tiny = raycap_extract(subset(images, SMALL_JOB), out + "-tiny")
    imports = bare_imports()
    steady = (whole["images"] - short["images"]) / (whole["seconds"] - short["seconds"])
    steady_cpu = (whole["cpu"] - short["cpu"]) / (whole["images"] - short["images"])
    ours, ours_cpu, manifest = whole["images"] / whole["seconds"], whole["cpu"] / whole["images"], whole["manifest"]
    baseline, baseline_cpu = plain_loop(paths)
    plain_model, our_model, our_model_cpu = model_only()
    print(f"CPU: {cpu_description()}; {len(paths)} images")
    print(
        f"plain PyTorch loop (PIL decode, NCHW fp32, batch 32): {baseline:.2f} images/s, "
        f"{baseline_cpu:.3f} CPU s per image"
    )
    print(
        f"model alone on the same cores: plain NCHW fp32 {plain_model:.2f} images/s, ours "
        f"({manifest['precision_on_cpu']}, channels_last, BN folded, batch {pipeline.CPU_BATCH}) {our_model:.2f}, "
        f"{our_model_cpu:.3f} CPU s per image"
    )
    print(
        f"raycap extract (whole command, defaults): {ours:.2f} images/s (pipeline alone "
        f"{manifest['images_per_second']:.2f}), {ours_cpu:.3f} CPU s per image over all its processes; first shard "
        f"committed after {whole['first_commit_s']:.1f} s"
    )
    fixed = whole["seconds"] - whole["images"] / steady
    print(
        f"raycap extract steady state ({short['images']} then {whole['images']} images, the difference): "
        f"{steady:.2f} images/s, {steady_cpu:.3f} CPU s per image; fixed cost (whole command minus the steady "
        f"state) {fixed:.1f} s"
    )
    print(
        f"fixed cost / bare imports ({imports:.1f} s for `import torch, torchvision, ray, ray.data`): "
        f"{fixed / imports:.2f} (target <= 2); a {SMALL_JOB}-image command {tiny['seconds']:.1f} s, "
        f"{tiny['seconds'] / imports:.2f}x the bare imports"
    )
    print(
        f"ratio whole command / own model alone: {ours / our_model:.2f} (target >= 0.85); pipeline alone "
        f"{manifest['images_per_second'] / our_model:.2f}; steady state {steady / our_model:.2f}; in CPU time "
        f"{our_model_cpu / ours_cpu:.2f} whole, {our_model_cpu / steady_cpu:.2f} steady"
    )
    print(
        f"ratio whole command / plain loop: {ours / baseline:.2f}x (target >= 1.25x with native bf16); pipeline "
        f"alone {manifest['images_per_second'] / baseline:.2f}x; in CPU time {baseline_cpu / ours_cpu:.2f}x"
    )
    for name, (write, read) in encodings().items():
        print(f"feature column {name:>20}: write {write:7.0f} MB/s, read {read:7.0f} MB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
