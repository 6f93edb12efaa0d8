"""bench/gpu.py's CPU-side logic: arguments, the no-GPU exit, and the GPU-vs-CPU comparison on small arrays."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

_spec = importlib.util.spec_from_file_location("bench_gpu", Path(__file__).parent.parent / "bench" / "gpu.py")
gpu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu)


def test_comparison_passes_close_features_and_fails_on_counts_or_distance():
    rng = np.random.default_rng(0)
    cpu = {f"i{k}": rng.random((64, 2048), dtype=np.float32) for k in range(4)}
    close = {k: v + rng.normal(0, 1e-3, v.shape).astype(np.float32) for k, v in cpu.items()}
    result = gpu.compare_features(close, cpu)
    assert result["gpu_rows"] == result["cpu_rows"] == 4 and result["same_ids"]
    assert result["min_cosine"] > 0.999 and gpu.verdict(result, 0.99) == []
    missing = gpu.compare_features({k: close[k] for k in ("i0", "i1", "i2")}, cpu)
    assert gpu.verdict(missing, None) == ["row counts differ: GPU 3, CPU 4"]
    far = gpu.compare_features({k: rng.normal(size=v.shape) for k, v in cpu.items()}, cpu)
    assert far["median_cosine"] < 0.1
    assert gpu.verdict(far, 0.99) and not gpu.verdict(far, None)  # counts still match


def test_without_a_gpu_it_exits_with_one_clear_line(capsys, tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as here, also on a machine with a GPU
    assert gpu.main(["--images", "4", "--cpu-images", "2", "--workdir", str(tmp_path)]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # nothing generated before the check


def test_bad_arguments_are_refused_before_anything_runs(capsys):
    with pytest.raises(SystemExit):
        gpu.parse_args(["--images", "10", "--cpu-images", "20"])
    assert "--cpu-images" in capsys.readouterr().err


def test_it_runs_from_a_checkout_that_is_not_installed(tmp_path):
    """A GPU machine has torch, torchvision and Ray but not raycap: the script finds raycap in its checkout (here
    it gets as far as the GPU check, after importing raycap)."""
    packages = Path(np.__file__).parent.parent  # this environment's site-packages, without their .pth files
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "env")], check=True)
    site = next((tmp_path / "env" / "lib").glob("python3*/site-packages"))
    (site / "installed.pth").write_text(f"{packages}\n")  # torch, Ray, pyarrow; not the editable raycap
    python = str(tmp_path / "env" / "bin" / "python")
    script = Path(gpu.__file__)
    alone = subprocess.run([python, "-c", "import raycap"], capture_output=True, text=True, cwd=tmp_path)
    assert "No module named 'raycap'" in alone.stderr
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([python, str(script), "--workdir", str(tmp_path / "w")], capture_output=True, text=True,
                          cwd=tmp_path, env=env)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (
        "bench/gpu.py: no CUDA GPU here (torch.cuda.is_available() is False); run it on a GPU machine"
    )
