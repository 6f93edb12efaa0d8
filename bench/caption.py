"""Benchmark: `raycap caption --beam-size 3` against `raycap extract` and a per-image loop, same images, one run.

The per-image loop is the tutorial's `evaluate`: one image at a time through decode, InceptionV3 and
greedy decoding. The model directory is a freshly initialised captioner over the synthetic vocabulary
(speed does not depend on training; an untrained model rarely emits <end>, so every caption runs to
--max-length: the slowest case for the decoder).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch
from PIL import Image

from raycap import synth
from raycap.encoder import FeatureExtractor
from raycap.model import Captioner, ModelConfig, greedy_search
from raycap.modeldir import write_model_dir
from raycap.text import Vocabulary


def _command(*args: str) -> float:
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "raycap.cli", *args], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    return time.perf_counter() - started


def per_image_loop(paths: list[str], model: Captioner, vocab: Vocabulary, max_length: int) -> float:
    extractor = FeatureExtractor("random", precision="fp32", channels_last=False, batch_size=1)
    torch.set_num_threads(os.cpu_count() or 1)
    started = time.perf_counter()
    for p in paths:
        pixels = np.asarray(Image.open(p).convert("RGB").resize((299, 299), Image.BILINEAR))[None]
        greedy_search(model, extractor(pixels), vocab.start_id, vocab.end_id, max_length)
    return len(paths) / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--loop-images", type=int, default=64, help="images for the (slow) per-image loop")
    parser.add_argument("--max-length", type=int, default=20)
    parser.add_argument("--workdir", default="bench-output/caption")
    args = parser.parse_args(argv)
    data = os.path.join(args.workdir, "data")
    if not os.path.exists(os.path.join(data, synth.CAPTIONS_FILE)):
        synth.generate(data, args.images, seed=11)
    images = os.path.join(data, synth.IMAGES_DIR)
    with open(os.path.join(data, synth.CAPTIONS_FILE)) as f:
        vocab = Vocabulary.build(a["caption"] for a in json.load(f)["annotations"])
    torch.manual_seed(0)
    model = Captioner(ModelConfig(vocab_size=len(vocab))).eval()
    model_dir = os.path.join(args.workdir, "model")
    write_model_dir(model_dir, model, vocab, {"encoder_weights": "random", "feature_dtype": "float16"})
    run = str(int(time.time()))
    features, captions = os.path.join(args.workdir, "features-" + run), os.path.join(args.workdir, "captions-" + run)
    extract_s = _command("extract", "--input", images, "--output", features, "--encoder-weights", "random")
    caption_s = _command(
        "caption", "--input", images, "--output", captions, "--model", model_dir,
        "--beam-size", "3", "--max-length", str(args.max_length),
    )  # fmt: skip
    paths = sorted(os.path.join(images, p) for p in os.listdir(images))[: args.loop_images]
    loop = per_image_loop(paths, model, vocab, args.max_length)
    n = len(os.listdir(images))
    print(f"raycap extract:                  {n / extract_s:.2f} images/s ({extract_s:.0f}s)")
    print(f"raycap caption --beam-size 3:    {n / caption_s:.2f} images/s ({caption_s:.0f}s)")
    print(f"per-image loop (greedy):         {loop:.2f} images/s")
    print(f"caption time / extract time: {caption_s / extract_s:.2f} (target <= 1.2)")
    print(f"caption / per-image loop:    {n / caption_s / loop:.2f}x (target >= 10x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
