"""GPU check, one command: model, extract, caption and training speed on this machine's GPU, and outputs vs a CPU run.

Runs offline from a fresh checkout with the installed torch, torchvision and Ray (synthetic data, encoder
weights `random` unless --encoder-weights names a local state dict). Prints:

- model alone: images/s of InceptionV3 in bf16 + channels_last on the GPU, without and with torch.compile;
- `raycap extract` and `raycap caption` images/s with CPU decoding and with decoding on the GPU (nvJPEG);
- `raycap train` samples/s with one GPU (Ray Train, NCCL, world size 1);
- the same extraction on CPU actors: row counts must be equal, and the features close (per-image cosine).

Usage: python bench/gpu.py [--images 1000] [--workdir bench-output/gpu], from the checkout, installed or not.
Exits 2 with one line without a GPU.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq

# Run as a script, a fresh checkout need not be installed: raycap is imported from it here, and through
# PYTHONPATH by the raycap commands this runs and by their Ray workers.
if __name__ == "__main__":
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, root)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))

from raycap import schema  # noqa: E402 - after the checkout is on the path

RANDOM_WEIGHTS_NOTE = (
    "random encoder weights amplify any numeric difference (bf16 vs fp32, TF32, one pixel level), so their "
    "cosines are low by nature; pass --encoder-weights PATH to a trained state dict for a meaningful check"
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000, help="synthetic JPEGs to extract and caption")
    parser.add_argument("--cpu-images", type=int, default=256, help="of those, how many the CPU comparison runs")
    parser.add_argument("--workdir", default="bench-output/gpu")
    parser.add_argument("--encoder-weights", default="random", help="random, or a local InceptionV3 state dict")
    parser.add_argument("--min-cosine", type=float, default=0.99, help="median per-image cosine GPU vs CPU (fp32)")
    parser.add_argument("--batches", type=int, default=20, help="timed batches of 128 for the model-only rates")
    args = parser.parse_args(argv)
    if args.images < 1 or not 1 <= args.cpu_images <= args.images:
        parser.error("need --images >= 1 and 1 <= --cpu-images <= --images")
    return args


def read_features(root: str) -> dict[str, np.ndarray]:
    """image_id -> (64, 2048) float32 from an extract output root."""
    out = {}
    for path in sorted(glob.glob(os.path.join(root, schema.FEATURES_DIR, "*.parquet"))):
        table = pq.read_table(path)
        features = schema.features_to_numpy(table[schema.FEATURES]).astype(np.float32)
        out.update(zip(table[schema.IMAGE_ID].to_pylist(), features))
    return out


def compare_features(gpu: dict[str, np.ndarray], cpu: dict[str, np.ndarray]) -> dict[str, float | int | bool]:
    """Counts and closeness of two runs' features over the images both hold (cosine of each image's features)."""
    common = sorted(gpu.keys() & cpu.keys())
    cosines = []
    for image_id in common:
        a, b = gpu[image_id].ravel(), cpu[image_id].ravel()
        norm = float(np.linalg.norm(a) * np.linalg.norm(b))
        cosines.append(float(a @ b) / norm if norm else float(np.array_equal(a, b)))
    return {"gpu_rows": len(gpu), "cpu_rows": len(cpu), "same_ids": gpu.keys() == cpu.keys(),
            "median_cosine": float(np.median(cosines)) if cosines else float("nan"),
            "min_cosine": float(min(cosines)) if cosines else float("nan")}  # fmt: skip


def verdict(comparison: dict, min_cosine: float | None) -> list[str]:
    """The failed checks, as readable lines (empty: all passed); min_cosine None checks the counts only."""
    failed = []
    if not comparison["same_ids"] or comparison["gpu_rows"] != comparison["cpu_rows"]:
        failed.append(f"row counts differ: GPU {comparison['gpu_rows']}, CPU {comparison['cpu_rows']}")
    if min_cosine is not None and not comparison["median_cosine"] >= min_cosine:
        failed.append(f"features not close: median cosine {comparison['median_cosine']:.4f} < {min_cosine}")
    return failed


def cli(*args: str, env: dict[str, str] | None = None) -> float:
    """Run one raycap command; returns its wall seconds."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "raycap.cli", *args], check=True, env={**os.environ, **(env or {})})
    return time.perf_counter() - started


def manifest(root: str) -> dict:
    with open(os.path.join(root, schema.MANIFEST_FILE)) as f:
        return json.load(f)


def model_only(weights: str, compile_model: bool, batches: int) -> float:
    import torch

    from raycap.encoder import FeatureExtractor

    extractor = FeatureExtractor(weights, device="cuda", precision="bf16", batch_size=128)
    if compile_model:
        extractor.trunk = torch.compile(extractor.trunk)
    pixels = torch.randint(0, 256, (128, 299, 299, 3), dtype=torch.uint8, device="cuda")
    for _ in range(3):  # warm-up (and compilation)
        extractor(pixels)
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(batches):
        extractor(pixels)
    torch.cuda.synchronize()
    return batches * 128 / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA GPU here (torch.cuda.is_available() is False); run it on a GPU machine",
              file=sys.stderr)  # fmt: skip
        return 2
    from raycap import synth
    from raycap.encoder import cpu_description

    print(f"GPU: {torch.cuda.get_device_name(0)}; CPU: {cpu_description()}; torch {torch.__version__}")
    for compiled in (False, True):
        rate = model_only(args.encoder_weights, compiled, args.batches)
        print(f"model alone, bf16 channels_last{' + torch.compile' if compiled else ''}: {rate:,.0f} images/s")
    data = os.path.join(args.workdir, "data")
    if not os.path.exists(os.path.join(data, synth.CAPTIONS_FILE)):
        synth.generate(data, args.images, seed=3)
    images = os.path.join(data, synth.IMAGES_DIR)
    subset = os.path.join(args.workdir, "subset")
    os.makedirs(subset, exist_ok=True)
    for name in sorted(os.listdir(images))[: args.cpu_images]:
        if not os.path.exists(os.path.join(subset, name)):
            os.symlink(os.path.abspath(os.path.join(images, name)), os.path.join(subset, name))
    run = os.path.join(args.workdir, f"run-{int(time.time())}")
    weights = ("--encoder-weights", args.encoder_weights)
    for decode in ("cpu", "device"):
        out = os.path.join(run, f"features-{decode}")
        seconds = cli("extract", "--input", images, "--output", out, "--decode", decode, *weights)
        m = manifest(out)
        print(f"extract, decode on {decode}: {m['rows'] / seconds:,.1f} images/s whole command, "
              f"{m['images_per_second']:,.1f} pipeline alone ({m['rows']} rows, {m['errors']} errors)")  # fmt: skip
    model = os.path.join(run, "model")
    cli("train", "--features", os.path.join(run, "features-cpu"), "--captions", os.path.join(data, synth.CAPTIONS_FILE),
        "--output", model, "--epochs", "2", "--workers", "1", "--use-gpu")  # fmt: skip
    with open(os.path.join(model, "metrics.jsonl")) as f:
        epochs = [json.loads(line) for line in f if line.strip()]
    rates = [e["samples_per_second"] for e in epochs if "samples_per_second" in e]
    print(f"train, 1 GPU (NCCL, world size 1): {rates[-1] if rates else float('nan'):,.0f} samples/s (last epoch)")
    for decode in ("cpu", "device"):
        out = os.path.join(run, f"captions-{decode}")
        seconds = cli("caption", "--input", images, "--output", out, "--model", model, "--decode", decode)
        m = manifest(out)
        print(f"caption, decode on {decode}: {m['rows'] / seconds:,.1f} images/s whole command, "
              f"{m['images_per_second']:,.1f} pipeline alone")  # fmt: skip
    fp32 = ("--precision", "fp32", "--decode", "cpu", *weights)
    # True fp32 on the GPU too: without TF32 in cuDNN/cuBLAS (NVIDIA's switch, inherited by the Ray workers).
    cli(
        "extract",
        "--input",
        subset,
        "--output",
        os.path.join(run, "gpu-fp32"),
        *fp32,
        env={"NVIDIA_TF32_OVERRIDE": "0"},
    )
    cli("extract", "--input", subset, "--output", os.path.join(run, "cpu-fp32"), "--gpus-per-actor", "0", *fp32)
    checks = {  # name -> (GPU run, CPU run, the cosine it must reach: None for counts only)
        "GPU fp32 vs CPU fp32, same pixels": ("gpu-fp32", "cpu-fp32", args.min_cosine),
        # Device pixels differ from Pillow's by a level or two (tests/test_devdecode.py): counts must match,
        # the cosine is reported (meaningful with trained weights).
        "GPU decode vs CPU decode, GPU bf16": ("features-device", "features-cpu", None),
    }
    failed = []
    for name, (gpu_run, cpu_run, min_cosine) in checks.items():
        comparison = compare_features(
            read_features(os.path.join(run, gpu_run)), read_features(os.path.join(run, cpu_run))
        )
        print(f"{name}: {comparison}")
        failed += [f"{name}: {line}" for line in verdict(comparison, min_cosine)]
    for line in failed:
        print(f"FAILED {line}")
    if failed and args.encoder_weights == "random":
        print(f"note: {RANDOM_WEIGHTS_NOTE}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
