"""GPU check in one command, sized for a short lease: its steps in order of value, stopped cleanly at a budget.

    python bench/gpu.py --bundle gpu-bundle/raycap-gpu-cp312.tar.xz --budget-s 420     # on the GPU machine
    python bench/gpu.py --device cpu --budget-s 60 --batch-sizes 2 --compile off ...   # its logic, anywhere

Steps, each a child process whose limit is the time left (a step cut at the budget keeps what it measured):

1. model: InceptionV3 alone, images/s in bf16 + channels_last, eager and torch.compile, batch 128 and 256;
2. decode: decoding on the device (nvJPEG, batched, resized there) vs Pillow on every CPU core, photo sizes;
3. pipeline: `raycap extract` and `raycap caption` in the steady state (the difference of two input sizes, free
   of fixed costs) with CPU and device decoding, and each command's fixed cost;
4. train: `raycap train` samples/s on one GPU (Ray Train, NCCL, world size 1);
5. agreement: the row counts of a CPU run, and features close to it (fp32 on both, TF32 off).

Steps 1-2 need no Ray, so they give figures even when the bundle does not work. It prints a table and writes
every figure to one JSON (--json). Runs offline from a checkout that is not installed (synthetic data, encoder
weights `random` unless --encoder-weights names a local state dict). Exits 2 with one line without the device.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable

# Run as a script, a fresh checkout need not be installed: raycap is imported from it here, and through
# PYTHONPATH by the steps, the raycap commands they run and those commands' Ray workers.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # imported by the tests: its steps beside it
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))

from gpu_steps import STEPS  # noqa: E402 - bench/ is on the path

RESERVE_S = 3.0  # kept back from the budget to write the table and the JSON
MIN_STEP_S = 10.0  # a step is not started with less time left than this


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--bundle", help="the file `make gpu-bundle` wrote (Ray and what the machine lacks), or its unpacked folder")
    add("--budget-s", type=float, default=420.0, help="stop cleanly after this many seconds, with what was measured")
    add("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: the same steps on CPU (tests, dry runs)")
    add("--steps", default=",".join(STEPS), help="which steps, in this order")
    add("--batch-sizes", default="128,256", help="step 1: the batch sizes timed")
    add("--compile", choices=["on", "off"], default="on", help="step 1: also time the torch.compile'd model")
    add("--batches", type=int, default=20, help="step 1: timed batches per configuration")
    add("--photo-sizes", default="640x480,1600x1200,4032x3024", help="step 2: JPEG sizes, WIDTHxHEIGHT")
    add("--photos", type=int, default=128, help="step 2: JPEGs decoded per size")
    add("--images", type=int, default=8000, help="step 3: synthetic images of the larger input (the smaller: 1/4)")
    add("--epochs", type=int, default=2, help="step 4: training epochs")
    add("--cpu-images", type=int, default=256, help="step 5: images the CPU comparison extracts")
    add("--encoder-weights", default="random", help="random, or a local InceptionV3 state dict")
    add("--min-cosine", type=float, default=0.99, help="step 5: median per-image cosine GPU vs CPU (fp32)")
    add("--workdir", default="bench-output/gpu")
    add("--json", help="where every figure goes (default WORKDIR/gpu-check.json)")
    add("--run-step", help=argparse.SUPPRESS)  # internal: run one step in this process
    args = parser.parse_args(argv)
    unknown = [s for s in args.steps.split(",") if s not in STEPS]
    if unknown:
        parser.error(f"--steps: unknown {', '.join(unknown)}; choose among {', '.join(STEPS)}")
    if args.images < 4 or not 1 <= args.cpu_images <= args.images // 4:
        parser.error("need --images >= 4 and 1 <= --cpu-images <= --images / 4 (the smaller input)")
    if args.budget_s <= RESERVE_S + MIN_STEP_S:
        parser.error(f"--budget-s must exceed {RESERVE_S + MIN_STEP_S:g} s")
    return args


def device_missing(device: str) -> str | None:
    """One line when the device to check is not here, else None."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        return "bench/gpu.py: no CUDA GPU here (torch.cuda.is_available() is False); run it on a GPU machine"
    return None


def unpack_bundle(bundle: str, into: str) -> str:
    """A bundle (tar.xz, or its unpacked folder) -> the folder to put first on the path."""
    if os.path.isdir(bundle):
        return os.path.abspath(bundle)
    with tarfile.open(bundle, "r:xz") as tar:
        tar.extractall(into, filter="data")
    return into


def machine(bundle_path: str | None, bundle_error: str | None) -> dict:
    """What ran the check: device, CPU, torch, the Ray the steps import (the bundle's or an installed one) and the
    bundle's own manifest."""
    import torch

    from raycap.encoder import cpu_description

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "cpu": cpu_description(), "python": sys.version}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["bf16_supported"] = torch.cuda.is_bf16_supported()
    probe = "import ray, os; print(ray.__version__, 'from', os.path.dirname(ray.__file__))"
    found = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)  # as the steps see it
    info["ray"] = found.stdout.strip() if found.returncode == 0 else f"not importable: {found.stderr.strip()[-300:]}"
    if bundle_path:
        manifest = os.path.join(bundle_path, "BUNDLE.json")
        if os.path.exists(manifest):
            with open(manifest) as f:
                info["bundle"] = json.load(f)["packages"]
    if bundle_error:
        info["bundle_error"] = bundle_error
    return info


def run_step(name: str, argv: list[str], figures_file: str, seconds: float) -> tuple[str, float]:
    """One step as a child process (its own process group, so its raycap commands and their Ray go with it),
    for at most `seconds`; returns its status and wall seconds. Its figures are in `figures_file`."""
    started = time.monotonic()
    command = [sys.executable, os.path.abspath(__file__), *argv, "--run-step", name]
    child = subprocess.Popen(command, start_new_session=True, env={**os.environ, "RAYCAP_FIGURES": figures_file})
    try:
        code = child.wait(timeout=seconds)
        status = "done" if code == 0 else f"failed (exit {code}; its output is above)"
    except subprocess.TimeoutExpired:
        status = "stopped at budget"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)  # the step's raycap commands and their Ray processes too
        child.wait()
    return status, time.monotonic() - started


def read_figures(path: str) -> dict:
    """A step's figures: one JSON object per line, written as each was measured."""
    if not os.path.exists(path):
        return {}
    figures = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                figures.update(json.loads(line))
    return figures


def table(report: dict) -> str:
    """The report as aligned text: one line per figure, each step's status first."""
    lines = []
    for step in report["steps"]:
        lines.append(f"{step['step']}: {step['status']} ({step['seconds']:.0f} s)")
        for name, value in step["figures"].items():
            shown = (f"{value:,.3f}" if abs(value) < 10 else f"{value:,.0f}") if isinstance(value, float) else value
            lines.append(f"  {name:<58} {shown}")
    return "\n".join(lines)


def check(args: argparse.Namespace, argv: list[str], now: Callable[[], float] = time.monotonic) -> dict:
    """Every step in order while the budget lasts; returns the report (also written to --json)."""
    deadline = now() + args.budget_s - RESERVE_S
    os.makedirs(args.workdir, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="raycap-bundle-") as unpacked:
        bundle_path, bundle_error = None, None
        if args.bundle:
            try:
                bundle_path = unpack_bundle(args.bundle, unpacked)
                sys.path.insert(0, bundle_path)
                os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [bundle_path, os.environ.get("PYTHONPATH")]))
            except (OSError, tarfile.TarError) as e:
                bundle_error = f"{args.bundle}: {e}"  # steps 1-2 still run; the Ray steps will say why they fail
        report = {"machine": machine(bundle_path, bundle_error), "budget_s": args.budget_s, "steps": []}
        print("\n".join(f"{k}: {v}" for k, v in report["machine"].items()), flush=True)
        started = now()
        for name in args.steps.split(","):
            figures_file = os.path.join(args.workdir, f"figures-{name}.jsonl")
            if os.path.exists(figures_file):
                os.remove(figures_file)
            left = deadline - now()
            if left < MIN_STEP_S:
                status, seconds = f"skipped: the budget is spent ({max(0.0, left):.0f} s left)", 0.0
            else:
                status, seconds = run_step(name, argv, figures_file, left)
            report["steps"].append({"step": name, "status": status, "seconds": round(seconds, 1),
                                    "figures": read_figures(figures_file)})  # fmt: skip
        report["elapsed_s"] = round(now() - started, 1)
    path = args.json or os.path.join(args.workdir, "gpu-check.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    print(table(report))
    print(f"every figure: {path}")
    return report


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.run_step:
        STEPS[args.run_step](args)
        return 0
    missing = device_missing(args.device)
    if missing:
        print(missing, file=sys.stderr)
        return 2
    report = check(args, argv)
    failed = [f"{s['step']}: {line}" for s in report["steps"] for line in s["figures"].get("failed", [])]
    failed += [f"{s['step']}: {s['status']}" for s in report["steps"] if s["status"].startswith("failed")]
    for line in failed:
        print(f"FAILED {line}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
