"""bench/gpu.py on CPU: its arguments, the no-GPU exit, the budget stop, the JSON, and the steps' arithmetic."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).parent.parent / "bench"
_spec = importlib.util.spec_from_file_location("bench_gpu", BENCH / "gpu.py")
gpu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu)
import gpu_steps  # noqa: E402 - bench/ is on the path once gpu.py is loaded

TINY = ["--device", "cpu", "--batch-sizes", "2", "--compile", "off", "--batches", "1", "--photo-sizes", "64x48,96x64",
        "--photos", "3", "--images", "16", "--cpu-images", "4", "--epochs", "1"]  # fmt: skip


def test_comparison_passes_close_features_and_fails_on_counts_or_distance():
    rng = np.random.default_rng(0)
    cpu = {f"i{k}": rng.random((64, 2048), dtype=np.float32) for k in range(4)}
    close = {k: v + rng.normal(0, 1e-3, v.shape).astype(np.float32) for k, v in cpu.items()}
    result = gpu_steps.compare_features(close, cpu)
    assert result["gpu_rows"] == result["cpu_rows"] == 4 and result["same_ids"]
    assert result["min_cosine"] > 0.999 and gpu_steps.verdict(result, 0.99) == []
    missing = gpu_steps.compare_features({k: close[k] for k in ("i0", "i1", "i2")}, cpu)
    assert gpu_steps.verdict(missing, None) == ["row counts differ: GPU 3, CPU 4"]
    far = gpu_steps.compare_features({k: rng.normal(size=v.shape) for k, v in cpu.items()}, cpu)
    assert far["median_cosine"] < 0.1
    assert gpu_steps.verdict(far, 0.99) and not gpu_steps.verdict(far, None)  # counts still match


def test_the_steady_state_is_the_difference_of_two_input_sizes():
    rate, fixed = gpu_steps.steady_state((1000, 20.0), (4000, 26.0))  # 3000 more images in 6 s more
    assert rate == pytest.approx(500.0) and fixed == pytest.approx(18.0)
    assert all(np.isnan(gpu_steps.steady_state((1000, 20.0), (4000, 19.0))))  # noise larger than the work


def test_without_a_gpu_it_exits_with_one_clear_line(capsys, tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as here, also on a machine with a GPU
    assert gpu.main(["--workdir", str(tmp_path)]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing generated before the check


def test_bad_arguments_are_refused_before_anything_runs(capsys):
    for argv, named in ((["--images", "10", "--cpu-images", "20"], "--cpu-images"), (["--steps", "model,gpu"], "gpu"),
                        (["--budget-s", "5"], "--budget-s")):  # fmt: skip
        with pytest.raises(SystemExit):
            gpu.parse_args(argv)
        assert named in capsys.readouterr().err


@pytest.mark.slow
def test_steps_run_in_order_and_stop_cleanly_at_the_budget_with_what_they_measured(tmp_path):
    """On CPU with tiny sizes and 40 s: the model and decode steps finish (13 s here: a machine 2.5x slower still
    fits), the pipeline's raycap commands (tens of seconds each here) are stopped at the budget or skipped, and the
    rest skipped; every figure is in the JSON."""
    report_file = tmp_path / "check.json"
    done = subprocess.run([sys.executable, str(BENCH / "gpu.py"), *TINY, "--budget-s", "40", "--workdir",
                           str(tmp_path / "w"), "--json", str(report_file)], capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(report_file.read_text())
    steps = {s["step"]: s for s in report["steps"]}
    assert list(steps) == ["model", "decode", "pipeline", "train", "agreement"]
    assert steps["model"]["status"] == "done" and steps["decode"]["status"] == "done"
    assert steps["model"]["figures"]["model eager bf16 channels_last, batch 2: images/s"] > 0
    for size in ("64x48", "96x64"):
        figures = steps["decode"]["figures"]
        assert figures[f"decode {size} on cpu: images/s"] > 0 and figures[f"decode {size}: device / Pillow"] > 0
    stopped = [s["status"] for s in report["steps"][2:]]
    assert stopped[0] == "stopped at budget" or stopped[0].startswith("skipped"), stopped
    assert all(s.startswith("skipped") for s in stopped[1:]), stopped
    assert report["elapsed_s"] <= 60  # the budget holds: the stopped step was killed, not waited for
    assert report["machine"]["cpu"] and "ray" in report["machine"]
    assert "model: done" in done.stdout and "every figure:" in done.stdout  # the table


def test_a_bundle_goes_first_on_the_path_of_the_steps(tmp_path, monkeypatch):
    """--bundle FILE: unpacked to a temporary folder that the steps (and the raycap commands, through PYTHONPATH)
    import from before anything installed."""
    import tarfile

    fake = tmp_path / "bundle"
    (fake / "ray").mkdir(parents=True)
    (fake / "ray" / "__init__.py").write_text("__version__ = 'bundled'\n")
    (fake / "BUNDLE.json").write_text(json.dumps({"packages": {"ray": "bundled"}}))
    archive = tmp_path / "bundle.tar.xz"
    with tarfile.open(archive, "w:xz") as tar:
        for path in fake.rglob("*"):
            tar.add(path, arcname=str(path.relative_to(fake)))
    seen = {}

    def fake_step(name, argv, figures_file, seconds):
        seen[name] = os.environ["PYTHONPATH"].split(os.pathsep)[0]
        return "done", 0.0

    monkeypatch.setattr(gpu, "run_step", fake_step)
    monkeypatch.setenv("PYTHONPATH", str(BENCH.parent))
    args = gpu.parse_args(["--device", "cpu", "--bundle", str(archive), "--workdir", str(tmp_path / "w")])
    report = gpu.check(args, [])
    assert report["machine"]["ray"].startswith("bundled from ") and report["machine"]["bundle"] == {"ray": "bundled"}
    unpacked = report["machine"]["ray"].removeprefix("bundled from ").removesuffix("/ray")
    assert set(seen.values()) == {unpacked} and len(seen) == 5
    assert not os.path.exists(unpacked)  # a temporary folder, gone after the check
    sys.path.remove(unpacked)  # check() put it first for the rest of its process


def test_it_runs_from_a_checkout_that_is_not_installed(tmp_path):
    """A GPU machine has torch, torchvision and Ray but not raycap: the script finds raycap in its checkout (here
    it gets as far as the GPU check, after importing raycap)."""
    packages = Path(np.__file__).parent.parent  # this environment's site-packages, without their .pth files
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "env")], check=True)
    site = next((tmp_path / "env" / "lib").glob("python3*/site-packages"))
    (site / "installed.pth").write_text(f"{packages}\n")  # torch, Ray, pyarrow; not the editable raycap
    python = str(tmp_path / "env" / "bin" / "python")
    alone = subprocess.run([python, "-c", "import raycap"], capture_output=True, text=True, cwd=tmp_path)
    assert "No module named 'raycap'" in alone.stderr
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([python, str(BENCH / "gpu.py"), "--workdir", str(tmp_path / "w")], capture_output=True,
                          text=True, cwd=tmp_path, env=env)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (
        "bench/gpu.py: no CUDA GPU here (torch.cuda.is_available() is False); run it on a GPU machine"
    )
