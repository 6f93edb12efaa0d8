"""`make demo`: synth -> extract -> train -> caption the test split -> evaluate -> show, on one embedded Ray.

Run `make demo`, or `python -m raycap.demo --num-images 200 --epochs 1` for a quick look (local only).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence

from raycap import cli
from raycap.config import VERBOSE_ENV


def train_arguments(args: argparse.Namespace, data: str, features: str, model: str) -> list[str]:
    """`raycap train`'s arguments in the demo recipe: synth's `data`, extract's `features`, the `model` to write."""
    return [
        "--features",
        features,
        "--captions",
        os.path.join(data, "captions.json"),
        "--split-file",
        os.path.join(data, "splits.json"),
        "--output",
        model,
        "--epochs",
        str(args.epochs),
        "--workers",
        str(args.workers),
        "--batch-size",
        str(args.batch_size),
        "--units",
        str(args.units),
        "--seed",
        str(args.seed),
    ]


def parser() -> argparse.ArgumentParser:
    """The demo's options; their defaults are the demo recipe (bench/learning.py trains with the same)."""
    parser = argparse.ArgumentParser(prog="python -m raycap.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="demo-output")
    parser.add_argument("--num-images", type=int, default=2000)
    parser.add_argument(
        "--epochs", type=int, default=10, help="val loss still falls after 5; the faster bf16 step pays for 10"
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8, help="images per worker per step")
    parser.add_argument(
        "--units",
        type=int,
        default=256,
        help="GRU units (the tutorial's 512 learns a little more per epoch at twice the time)",
    )
    parser.add_argument("--seed", type=int, default=0, help="training seed (initialisation, data order)")
    parser.add_argument("--verbose", action="store_true", help="also show Ray's own log lines")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.verbose:
        os.environ[VERBOSE_ENV] = "1"
    out = os.path.abspath(args.output)
    data, test_images = os.path.join(out, "data"), os.path.join(out, "test-images")
    started = time.time()

    def step(name: str, *command: str, echo: bool = True) -> None:
        t = time.time()
        print(f"\n== raycap {name} {' '.join(command)}", flush=True)
        with contextlib.nullcontext() if echo else contextlib.redirect_stdout(io.StringIO()):
            code = cli.main([name, *command])
        if code:
            sys.exit(code)
        print(f"== {name} took {time.time() - t:.0f}s", flush=True)

    step("synth", "--output", data, "--num-images", str(args.num_images))
    # The test split is captioned from its images, so it moves out of the folder the features come from.
    os.makedirs(test_images, exist_ok=True)
    with open(os.path.join(data, "splits.json")) as f:
        for name in json.load(f)["test"]:
            source = os.path.join(data, "images", name)
            if os.path.exists(source):
                shutil.move(source, os.path.join(test_images, name))
    # One embedded Ray for every step. It keeps its dashboard: without it Ray Train's placement-group cleaner
    # cannot query the state API and logs a warning every second of training.
    cli.init_ray(None)
    step(
        "extract",
        "--input",
        os.path.join(data, "images"),
        "--output",
        os.path.join(out, "features"),
        "--encoder-weights",
        "random",
    )
    step("train", *train_arguments(args, data, os.path.join(out, "features"), os.path.join(out, "model")))
    step("caption", "--input", test_images, "--output", out, "--model", os.path.join(out, "model"))
    step(
        "evaluate",
        "--predictions",
        out,
        "--references",
        os.path.join(data, "captions.json"),
        "--objects",
        os.path.join(data, "objects.json"),
        "--output",
        os.path.join(out, "metrics.json"),
        echo=False,  # the metrics JSON is in metrics.json; the summary below prints the headline figures
    )
    from raycap.predictions import load_predictions

    rows = load_predictions(out).slice(0, 5).to_pylist()
    step("show", "--predictions", out, "--image", rows[0]["image_id"], "--output", os.path.join(out, "attention.png"))
    with open(os.path.join(out, "metrics.json")) as f:
        metrics = json.load(f)
    print("\nA few captions of the test split:")
    for row in rows:
        print(f"  {row['image_id']}: {row['caption']}  (score {row['score']:.3f})")
    print(
        f"\nBLEU-4 {metrics['BLEU-4']:.3f}  CIDEr {metrics['CIDEr']:.3f}  object accuracy "
        f"{metrics['object_accuracy']:.3f}  grounding {metrics.get('grounding', float('nan')):.2f}"
    )
    print(f"demo finished in {time.time() - started:.0f}s -> {out} (captions/, metrics.json, attention.png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
