"""bench/gpu.py's five steps: each measures one thing and appends its figures, as it goes, to RAYCAP_FIGURES."""

from __future__ import annotations

import argparse
import glob
import io
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

RANDOM_WEIGHTS_NOTE = (
    "random encoder weights amplify any numeric difference (bf16 vs fp32, TF32, one pixel level), so their "
    "cosines are low by nature; pass --encoder-weights PATH to a trained state dict for a meaningful check"
)


def emit(figures: dict) -> None:
    """Append figures to this step's file at once, so a step stopped at the budget keeps them."""
    print("\n".join(f"  {k}: {v}" for k, v in figures.items()), flush=True)
    with open(os.environ["RAYCAP_FIGURES"], "a") as f:
        f.write(json.dumps(figures) + "\n")


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _rate(fn: Callable[[], object], items: int, repeats: int, device: str) -> float:
    """Items per second of `fn` over `repeats` calls, after the device has finished every earlier call."""
    _sync(device)
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    _sync(device)
    return items * repeats / (time.perf_counter() - started)


# --- step 1: the model alone ---


def model(args: argparse.Namespace) -> None:
    """InceptionV3 (BN folded, bf16, channels_last) on random pixels: eager, then torch.compile'd."""
    import torch

    from raycap.encoder import FeatureExtractor, resolve_weights

    weights = resolve_weights(args.encoder_weights)
    for compiled in [False, True] if args.compile == "on" else [False]:
        extractor = FeatureExtractor(weights, device=args.device, precision="bf16")
        if compiled:
            extractor.trunk = torch.compile(extractor.trunk, dynamic=False)
        for batch in [int(b) for b in args.batch_sizes.split(",")]:
            extractor.batch_size = batch
            pixels = torch.randint(0, 256, (batch, 299, 299, 3), dtype=torch.uint8, device=args.device)
            mode = "torch.compile" if compiled else "eager"
            started = time.perf_counter()
            try:
                for _ in range(3):  # warm-up: cuDNN's algorithm search, and the compilation
                    extractor(pixels)
            except Exception as e:  # noqa: BLE001 - a compiler that fails here is a figure, not the end of the check
                emit({f"model {mode}, batch {batch}: error": f"{type(e).__name__}: {str(e)[:300]}"})
                break
            _sync(args.device)
            warmup = time.perf_counter() - started
            rate = _rate(lambda e=extractor, p=pixels: e(p), batch, args.batches, args.device)
            emit({f"model {mode} bf16 channels_last, batch {batch}: images/s": rate,
                  f"model {mode}, batch {batch}: warm-up s": round(warmup, 1)})  # fmt: skip


# --- step 2: decoding alone ---


def photo(width: int, height: int, seed: int) -> bytes:
    """A photo-like JPEG: smooth colour fields with texture (so chroma subsampling and resizing matter)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    noise = rng.normal(128, 12, (max(1, height // 4), max(1, width // 4), 3))
    img = Image.blend(img, Image.fromarray(np.clip(noise, 0, 255).astype(np.uint8)).resize((width, height)), 0.3)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=90)
    return out.getvalue()


def decode(args: argparse.Namespace) -> None:
    """Per JPEG size: raycap's device decoder on one shard vs Pillow (images.decode_image) on every CPU core."""
    from raycap import devdecode, images, shards

    cores, max_pixels, device = os.cpu_count() or 1, images.DEFAULT_MAX_PIXELS, args.device
    for size in args.photo_sizes.split(","):
        width, height = (int(v) for v in size.split("x"))
        distinct = [photo(width, height, seed) for seed in range(4)]  # encoding is slow; decoding costs the same
        files = [distinct[i % len(distinct)] for i in range(args.photos)]
        names = [f"photo-{i}.jpg" for i in range(len(files))]
        shard = shards.of_files(0, names, names, files)
        devdecode.decode_shard(shards.of_files(0, names[:2], names[:2], files[:2]), device, max_pixels)  # warm-up
        on_device = _rate(lambda s=shard: devdecode.decode_shard(s, device, max_pixels), len(files), 1, device)
        with ThreadPoolExecutor(cores) as pool:  # Pillow releases the GIL while it decodes and resizes
            pillow = _rate(lambda f=files: list(pool.map(images.decode_image, f)), len(files), 1, "cpu")
        emit({f"decode {size} on {args.device}: images/s": on_device,
              f"decode {size} Pillow on {cores} cores: images/s": pillow,
              f"decode {size}: device / Pillow": on_device / pillow})  # fmt: skip


# --- steps 3-5: raycap commands ---


def raycap(args: argparse.Namespace, name: str, *argv: str, env: dict[str, str] | None = None) -> float:
    """Run one raycap command (its output to WORKDIR/logs/NAME.log); its wall seconds. A failure raises with
    the log's last lines."""
    logs = os.path.join(args.workdir, "logs")
    os.makedirs(logs, exist_ok=True)
    log = os.path.join(logs, f"{name}.log")
    started = time.perf_counter()
    with open(log, "w") as out:
        done = subprocess.run([sys.executable, "-m", "raycap.cli", *argv], stdout=out, stderr=subprocess.STDOUT,
                              env={**os.environ, **(env or {})})  # fmt: skip
    if done.returncode:
        with open(log) as f:
            tail = f.read()[-3000:]
        raise SystemExit(f"raycap {' '.join(argv[:1])} failed (exit {done.returncode}); {log} ends:\n{tail}")
    return time.perf_counter() - started


def on_device(args: argparse.Namespace) -> list[str]:
    """The flags that put a command's model on the checked device."""
    return ["--gpus-per-actor", "0"] if args.device == "cpu" else []


def manifest(root: str) -> dict:
    from raycap import schema

    with open(os.path.join(root, schema.MANIFEST_FILE)) as f:
        return json.load(f)


def inputs(args: argparse.Namespace) -> dict[str, str]:
    """The synthetic inputs (made once per workdir): the larger set, a quarter of it, the CPU comparison's."""
    from raycap import synth

    data = os.path.join(args.workdir, "data")
    if not os.path.exists(os.path.join(data, synth.CAPTIONS_FILE)):
        synth.generate(data, args.images, seed=3)
    large = os.path.join(data, synth.IMAGES_DIR)
    names = sorted(os.listdir(large))
    sets = {"large": large, "captions": os.path.join(data, synth.CAPTIONS_FILE)}
    for key, count in (("small", args.images // 4), ("comparison", args.cpu_images)):
        sets[key] = os.path.join(args.workdir, key)
        os.makedirs(sets[key], exist_ok=True)
        for name in names[:count]:
            if not os.path.exists(os.path.join(sets[key], name)):
                os.symlink(os.path.abspath(os.path.join(large, name)), os.path.join(sets[key], name))
    return sets


def untrained_model(args: argparse.Namespace, captions: str) -> str:
    """A captioner model directory with untrained weights: caption's speed does not depend on training."""
    import torch

    from raycap.model import Captioner, ModelConfig
    from raycap.modeldir import write_model_dir
    from raycap.text import Vocabulary

    with open(captions) as f:
        texts = [a["caption"] for a in json.load(f)["annotations"]]
    vocab = Vocabulary.build(texts)
    torch.manual_seed(0)
    location = os.path.join(args.workdir, "runs", "untrained-model")
    write_model_dir(location, Captioner(ModelConfig(vocab_size=len(vocab))).eval(), vocab,
                    {"encoder_weights": args.encoder_weights, "feature_dtype": "float16"})  # fmt: skip
    return location


def steady_state(small: tuple[int, float], large: tuple[int, float]) -> tuple[float, float]:
    """(images/s free of fixed costs, the fixed cost in s) from two commands' (rows, seconds)."""
    (rows_small, s_small), (rows_large, s_large) = small, large
    if rows_large <= rows_small or s_large <= s_small:
        return float("nan"), float("nan")
    rate = (rows_large - rows_small) / (s_large - s_small)
    return rate, s_small - rows_small / rate


def pipeline(args: argparse.Namespace) -> None:
    """extract and caption, CPU and device decoding, each on the quarter input then the whole."""
    sets = inputs(args)
    runs = os.path.join(args.workdir, "runs")
    shutil.rmtree(runs, ignore_errors=True)
    model_dir = untrained_model(args, sets["captions"])
    for command in ("extract", "caption"):
        extra = ["--encoder-weights", args.encoder_weights] if command == "extract" else ["--model", model_dir]
        for decode in ("cpu", "device"):
            timed = {}
            for size in ("small", "large"):
                out = os.path.join(runs, f"{command}-{decode}-{size}")
                seconds = raycap(args, f"{command}-{decode}-{size}", command, "--input", sets[size], "--output", out,
                                 "--decode", decode, *extra, *on_device(args))  # fmt: skip
                m = manifest(out)
                timed[size] = (m["rows"], seconds)
            rate, fixed = steady_state(timed["small"], timed["large"])
            emit({f"{command}, decode {decode}: steady images/s": rate,
                  f"{command}, decode {decode}: whole command images/s ({timed['large'][0]} images)":
                      timed["large"][0] / timed["large"][1],
                  f"{command}, decode {decode}: fixed cost s": round(fixed, 1),
                  f"{command}, decode {decode}: rows, errors": f"{m['rows']}, {m['errors']}"})  # fmt: skip


def train(args: argparse.Namespace) -> None:
    """raycap train on step 3's features (or on the quarter input's, extracted here when step 3 did not get there)."""
    sets = inputs(args)
    runs = os.path.join(args.workdir, "runs")
    features = next((d for d in (os.path.join(runs, f"extract-cpu-{s}") for s in ("large", "small"))
                     if os.path.exists(os.path.join(d, "_manifest.json"))), None)  # fmt: skip
    if features is None:
        features = os.path.join(runs, "train-features")
        raycap(args, "train-features", "extract", "--input", sets["small"], "--output", features,
               "--encoder-weights", args.encoder_weights, *on_device(args))  # fmt: skip
    out = os.path.join(runs, "model")
    shutil.rmtree(out, ignore_errors=True)
    gpu = ["--use-gpu"] if args.device == "cuda" else []
    seconds = raycap(args, "train", "train", "--features", features, "--captions", sets["captions"], "--output", out,
                     "--epochs", str(args.epochs), "--workers", "1", *gpu)  # fmt: skip
    with open(os.path.join(out, "metrics.jsonl")) as f:
        epochs = [json.loads(line) for line in f if line.strip()]
    last = epochs[-1] if epochs else {}
    images = manifest(features)["rows"]
    emit({f"train, 1 {args.device} worker: samples/s (last epoch)": last.get("samples_per_second", float("nan")),
          "train: input wait fraction (last epoch)": last.get("input_wait_fraction", float("nan")),
          f"train: whole command s ({args.epochs} epochs, {images} images)": round(seconds, 1)})  # fmt: skip


def read_features(root: str) -> dict[str, np.ndarray]:
    """image_id -> (64, 2048) float32 from an extract output root."""
    import pyarrow.parquet as pq

    from raycap import schema

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


def agreement(args: argparse.Namespace) -> None:
    """The checked device's fp32 features against CPU actors' on the same files; step 3's decoders' counts."""
    sets = inputs(args)
    runs = os.path.join(args.workdir, "runs")
    fp32 = ("extract", "--input", sets["comparison"], "--precision", "fp32", "--decode", "cpu",
            "--encoder-weights", args.encoder_weights)  # fmt: skip
    # True fp32 on the GPU too: without TF32 in cuDNN/cuBLAS (NVIDIA's switch, inherited by the Ray workers).
    raycap(args, "agreement-device", *fp32, "--output", os.path.join(runs, "device-fp32"), *on_device(args),
           env={"NVIDIA_TF32_OVERRIDE": "0"})  # fmt: skip
    raycap(args, "agreement-cpu", *fp32, "--output", os.path.join(runs, "cpu-fp32"), "--gpus-per-actor", "0")
    checks = {"device fp32 vs CPU fp32, same pixels": ("device-fp32", "cpu-fp32", args.min_cosine)}
    if os.path.exists(os.path.join(runs, "extract-device-large", "_manifest.json")):
        # Device pixels differ from Pillow's by a level or two (tests/test_devdecode.py): counts must match.
        checks["device decode vs CPU decode"] = ("extract-device-large", "extract-cpu-large", None)
    failed = []
    for name, (device_run, cpu_run, min_cosine) in checks.items():
        got = compare_features(
            read_features(os.path.join(runs, device_run)), read_features(os.path.join(runs, cpu_run))
        )
        emit({f"{name}: rows (device, CPU)": f"{got['gpu_rows']}, {got['cpu_rows']}",
              f"{name}: median cosine": got["median_cosine"], f"{name}: min cosine": got["min_cosine"]})  # fmt: skip
        failed += [f"{name}: {line}" for line in verdict(got, min_cosine)]
    if failed and args.encoder_weights == "random":
        failed.append(f"note: {RANDOM_WEIGHTS_NOTE}")
    emit({"failed": failed})


STEPS: dict[str, Callable[[argparse.Namespace], None]] = {
    "model": model,
    "decode": decode,
    "pipeline": pipeline,
    "train": train,
    "agreement": agreement,
}
