"""Benchmark: training at 10 k, 100 k and 1 M captioned images: what grows with the data and what stays flat.

Each size is a synthetic captioned feature set (`synth.write_captioned_features`: reduced 64 x 8 float16 features,
so a million images fit one disk; a caption an image) trained for one epoch by `raycap train` on an embedded Ray,
2 workers, a small model, `--val-images 64`, each size in a fresh process (so the driver's peak RSS is its own).
Prints per size: the captions join's time, the epoch's time and images/s, the driver's peak RSS, and each
worker's peak RSS before its first step (what it holds of the data) and over the epoch (the max over ranks).
Steps cost the same at any size when images/s stays flat; the driver and the workers' setup stay flat when the
caption table lives in no process.

    PYTHONPATH=$PWD .venv/bin/python bench/train_scale.py --sizes 10000 100000 1000000
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import resource
import subprocess
import sys
import time

from raycap import cli, modeldir, synth

RECIPE = ["--epochs", "1", "--workers", "2", "--batch-size", "512", "--units", "16", "--embedding-dim", "8"]
CAPTIONS = 1  # per image: a step's cost is per caption, so one keeps a million-image epoch to minutes on 2 cores


def one(root: str, images: int) -> dict[str, float]:
    """Write the set (once), train it in this process; the figures of the run."""
    data, model = os.path.join(root, f"set-{images}"), os.path.join(root, f"model-{images}")
    if not os.path.isdir(data):
        synth.write_captioned_features(data, images, captions=CAPTIONS)
    subprocess.run(["rm", "-rf", model, model + ".runs"], check=True)
    started = time.time()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(["train", "--features", data, "--captions", os.path.join(data, "captions.csv"),
                         "--output", model, *RECIPE, "--val-images", "64"])  # fmt: skip
    if code:
        raise SystemExit(f"raycap train failed ({code})")
    joined = re.search(r"joined in ([\d.]+)s", out.getvalue())
    with open(os.path.join(model, modeldir.METRICS)) as f:
        epoch = json.loads(f.read().splitlines()[-1])
    return {
        "images": images,
        "command_s": time.time() - started,
        "join_s": float(joined.group(1)) if joined else float("nan"),
        "epoch_s": epoch["epoch_seconds"],
        "images_per_s": epoch["samples_per_second"] / CAPTIONS,  # samples are captions
        "driver_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "worker_setup_mb": epoch["worker_setup_rss_mb"],
        "worker_peak_mb": epoch["worker_peak_rss_mb"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="bench-output/train-scale")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # the child process: one size, JSON out
    args = parser.parse_args(argv)
    root = os.path.abspath(args.output)
    if args.one:
        print("RESULT " + json.dumps(one(root, args.one)))
        return 0
    flags = open("/proc/cpuinfo").read().split()  # noqa: SIM115 - read once
    print(f"CPU: {os.cpu_count()} cores, " + ", ".join(f"{f}={'yes' if f in flags else 'no'}"
                                                       for f in ("avx2", "avx512_bf16", "amx_bf16")))  # fmt: skip
    print("\n| images | join s | epoch s | images/s | driver peak MB | worker setup MB | worker peak MB | command s |")
    print("|---|---|---|---|---|---|---|---|")
    for images in args.sizes:
        env = {**os.environ, "PYTHONPATH": os.getcwd()}
        run = subprocess.run([sys.executable, __file__, "--output", root, "--one", str(images)],
                             capture_output=True, text=True, env=env)  # fmt: skip
        line = next((x for x in run.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(run.stdout[-2000:], run.stderr[-2000:], file=sys.stderr)
            return 1
        r = json.loads(line[len("RESULT ") :])
        print(f"| {images:,} | {r['join_s']:.1f} | {r['epoch_s']:.1f} | {r['images_per_s']:.0f} | "
              f"{r['driver_peak_mb']:.0f} | {r['worker_setup_mb']:.0f} | {r['worker_peak_mb']:.0f} | "
              f"{r['command_s']:.0f} |", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
