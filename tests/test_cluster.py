"""Cluster operations: cluster.yaml validates, `ray job submit` with token auth, a node lost mid-extraction."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from raycap import schema

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def test_cluster_yaml_passes_rays_own_validator():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(config))  # raises on a schema violation
    assert config["available_node_types"]["head"]["resources"] == {"CPU": 0}
    text = (ROOT / "cluster.yaml").read_text()
    assert "RAY_AUTH_MODE=token" in text and "aws_secret_access_key" not in text.lower()


@pytest.mark.multinode
def test_job_submit_with_token_auth(tiny_synth, tmp_path):
    """A token-authenticated head, then `ray job submit` of jobs/extract.py from this checkout."""
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_TOKEN_PATH": str(tmp_path / "token"),
    }
    env.pop("RAY_ADDRESS", None)
    (tmp_path / "token").write_text(secrets.token_hex(32))
    temp = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))  # Ray's socket paths must stay short
    port = "8299"
    subprocess.run(
        [
            RAY,
            "start",
            "--head",
            "--num-cpus",
            "2",
            "--port",
            "6391",
            "--dashboard-port",
            port,
            "--dashboard-host",
            "127.0.0.1",
            f"--temp-dir={temp}",
            "--disable-usage-stats",
        ],
        env=env,
        check=True,
        capture_output=True,
    )
    try:
        out = tmp_path / "features"
        excludes = json.dumps({"excludes": [".venv", ".git", "demo-output", "bench-output", "*.egg-info"]})
        submit = [
            RAY,
            "job",
            "submit",
            "--address",
            f"http://127.0.0.1:{port}",
            "--working-dir",
            str(ROOT),
            "--runtime-env-json",
            excludes,
            "--",
            sys.executable,
            "jobs/extract.py",
            "--input",
            str(tiny_synth / "images"),
            "--output",
            str(out),
            "--encoder-weights",
            "random",
        ]
        done = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=400)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "extract: 40 rows, 0 errors" in done.stdout
        assert pq.read_table(out / schema.FEATURES_DIR).num_rows == 40
        (tmp_path / "wrong-token").write_text(secrets.token_hex(32))
        no_token = {**env, "RAY_AUTH_TOKEN_PATH": str(tmp_path / "wrong-token")}
        denied = subprocess.run(
            [RAY, "job", "list", "--address", f"http://127.0.0.1:{port}"],
            env=no_token,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert denied.returncode != 0  # with another token the head refuses
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.multinode
def test_worker_node_lost_mid_extraction_and_mid_captioning_every_image_exactly_once(tiny_synth, tmp_path):
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "multinode_pipeline.py"), str(tiny_synth / "images"), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
    for job, rows_dir in (("extract", schema.FEATURES_DIR), ("caption", schema.CAPTIONS_DIR)):
        assert report[job]["removed"] and report[job]["manifest"]["rows"] == 40, job
        ids = pq.read_table(tmp_path / ("features" if job == "extract" else "captions") / rows_dir)[
            schema.IMAGE_ID].to_pylist()
        assert len(ids) == len(set(ids)) == 40, job
