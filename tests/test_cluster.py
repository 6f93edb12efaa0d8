"""Cluster operations: cluster.yaml validates, `ray job submit` with token auth, a node lost mid-job."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import tomllib
import yaml

from raycap import schema
from raycap.model import Captioner, ModelConfig
from raycap.modeldir import write_model_dir
from raycap.text import Vocabulary

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def test_cluster_yaml_passes_rays_own_validator():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(config))  # raises on a schema violation
    assert config["available_node_types"]["head"]["resources"] == {"CPU": 0}
    text = (ROOT / "cluster.yaml").read_text()
    assert "RAY_AUTH_MODE=token" in text and "aws_secret_access_key" not in text.lower()


def _setup_commands(config: dict) -> list[str]:
    keys = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands")
    commands = [c for k in keys for c in config.get(k) or []]
    for node_type in config["available_node_types"].values():
        commands += [c for k in keys for c in node_type.get(k) or []]
    return commands


def test_cluster_yaml_installs_pinned_dependencies_and_never_raycap_by_name():
    """Nodes install what pyproject.toml asks for, each pinned (==) to a version it allows; raycap itself travels
    with each job (`ray job submit --working-dir .`): a package called raycap on an index is never installed."""
    from packaging.requirements import Requirement

    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    commands = _setup_commands(config)
    pins = {}
    for command in commands:
        for word in shlex.split(command):
            if word.startswith("-") or word in ("python", "python3", "-m", "pip", "install"):
                continue
            requirement = Requirement(word)
            assert requirement.name.lower() != "raycap", command
            assert str(requirement.specifier).startswith("=="), word
            pins[requirement.name.lower()] = requirement
    assert "raycap" not in " ".join(commands).lower()  # nor a wheel, a git URL or `pip install .`
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    for dependency in map(Requirement, project["project"]["dependencies"]):
        pinned = pins[dependency.name.lower()]
        version = str(pinned.specifier).removeprefix("==")
        assert dependency.specifier.contains(version), (dependency, version)
        assert dependency.extras <= pinned.extras, dependency
    assert config["docker"]["image"].startswith(f"rayproject/ray:{str(pins['ray'].specifier).removeprefix('==')}-")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cluster_processes(temp: Path) -> list[int]:
    """Pids of the processes of the Ray cluster whose --temp-dir is `temp`: their command lines name it, or
    (the agents and the client server, whose titles Ray rewrites) their logs are open under it."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if str(temp).encode() in (entry / "cmdline").read_bytes() or any(
                    os.readlink(fd).startswith(str(temp)) for fd in (entry / "fd").iterdir()
                ):
                    pids.append(int(entry.name))
            except OSError:
                continue  # exited meanwhile
    return pids


def _stop_cluster(temp: Path) -> None:
    """Stop only this test's head (`ray stop` would also stop the test session's own Ray)."""
    for pid in _cluster_processes(temp):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _submit(port: str, env: dict, script: str, *args: str) -> subprocess.CompletedProcess:
    """`ray job submit`, retried while the new head's job agent is still starting (Ray answers 500 until then)."""
    excludes = json.dumps({"excludes": [".venv", ".git", "demo-output", "bench-output", "*.egg-info"]})
    command = [RAY, "job", "submit", "--address", f"http://127.0.0.1:{port}", "--working-dir", str(ROOT),
               "--runtime-env-json", excludes, "--", sys.executable, script, *args]
    for _ in range(10):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
        if "No available agent to submit job" not in done.stderr:
            break
    return done


@pytest.mark.multinode
def test_job_submit_with_token_auth(tiny_synth, tmp_path):
    """A token-authenticated head, then `ray job submit` of jobs/extract.py and jobs/caption.py from this
    checkout (its .venv and outputs excluded from the upload)."""
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
            # Its own agent port: the default (52365) belongs to the test session's Ray when one runs.
            f"--dashboard-agent-listen-port={_free_port()}",
            "--disable-usage-stats",
        ],
        env=env,
        check=True,
        capture_output=True,
    )
    try:
        out = tmp_path / "features"
        done = _submit(port, env, "jobs/extract.py", "--input", str(tiny_synth / "images"), "--output", str(out),
                       "--encoder-weights", "random")
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "extract: 40 rows, 0 errors" in done.stdout
        assert pq.read_table(out / schema.FEATURES_DIR).num_rows == 40
        model = tmp_path / "model"  # an untrained captioner: the test is about the submission
        vocab = Vocabulary.build(["a red circle on the left and a blue square on the right"])
        write_model_dir(str(model), Captioner(ModelConfig(vocab_size=len(vocab))), vocab,
                        {"encoder_weights": "random", "feature_dtype": "float16"})
        captions = tmp_path / "captions"
        done = _submit(port, env, "jobs/caption.py", "--input", str(tiny_synth / "images"), "--output",
                       str(captions), "--model", str(model), "--max-length", "5")
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "caption: 40 rows, 0 errors" in done.stdout
        assert pq.read_table(captions / schema.CAPTIONS_DIR).num_rows == 40
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
        _stop_cluster(temp)
        shutil.rmtree(temp, ignore_errors=True)
    assert not _cluster_processes(temp)


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


def _raycap(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, "-m", "raycap.cli", *args], env={**base, **(env or {})}, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def test_a_dead_address_fails_within_seconds_with_one_line(tiny_synth, tmp_path):
    from raycap.cli import _check_reachable

    closed = _free_port()  # nothing listens there once the probe socket is closed
    started = time.monotonic()
    done = _raycap("extract", "--input", str(tiny_synth / "images"), "--output", str(tmp_path / "out"),
                   "--encoder-weights", "random", "--address", f"127.0.0.1:{closed}")
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        f"raycap extract: error: --address 127.0.0.1:{closed}: no Ray cluster answers at 127.0.0.1:{closed} "
        "(Connection refused); start one with `ray start --head`, or leave --address out for an embedded Ray"
    ], done.stderr[-3000:]
    assert time.monotonic() - started < 60  # the interpreter's and torch's start-up; the probe gives up after 5 s
    assert not (tmp_path / "out").exists()
    for address, flag in ((f"ray://127.0.0.1:{closed}", "--address"), (f"127.0.0.1:{closed}", "RAY_ADDRESS")):
        with pytest.raises(ValueError, match=rf"^{flag} {address}: no Ray cluster answers at 127.0.0.1:{closed} "):
            _check_reachable(address, flag)
    with pytest.raises(ValueError, match="expected HOST:PORT"):
        _check_reachable("nowhere", "--address")


def test_without_an_address_raycap_starts_its_own_ray_even_where_a_dead_cluster_was_the_last(tmp_path):
    """Ray's own rule would join the last cluster started on the machine (ray_current_cluster) and retry it."""
    temp = Path(tempfile.mkdtemp(prefix="rd", dir="/tmp"))  # Ray's socket paths must stay short
    try:
        dead = f"127.0.0.1:{_free_port()}"
        (temp / "ray_current_cluster").write_text(dead)
        code = ("from raycap.cli import init_ray; import ray; init_ray(None); "
                "print('GCS', ray.get_runtime_context().gcs_address); ray.shutdown()")
        done = subprocess.run([sys.executable, "-c", code], env={
            **{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_TMPDIR": str(temp)},
            cwd=ROOT, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stderr[-3000:]
        gcs = next(line for line in done.stdout.splitlines() if line.startswith("GCS "))[4:]
        assert gcs and gcs != dead
    finally:
        _stop_cluster(temp)
        shutil.rmtree(temp, ignore_errors=True)
