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

from raycap import listing as listing_module
from raycap import schema, storage
from raycap.modeldir import COMMIT, latest_checkpoint
from tests.helpers import HANG_SECONDS

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
    """Stop only this test's head (`ray stop` would also stop the test session's own Ray). Killed in rounds: a
    raylet may start a worker between one listing of the processes and its own end, and a worker it forked as it
    died shows its temp dir only once it has opened its logs, so three empty listings in a row end it."""
    empty = 0
    for _ in range(50):
        pids = _cluster_processes(temp)
        empty = 0 if pids else empty + 1
        if empty == 3:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _submit(port: str, env: dict, aws: dict, script: str, *args: str) -> subprocess.CompletedProcess:
    """`ray job submit`, retried while the new head's job agent is still starting (Ray answers 500 until then).

    The S3 endpoint and credentials travel in the runtime environment (`aws`), as docs/operations.md shows
    for data outside the instance profile's reach; the head itself was started without them."""
    runtime_env = json.dumps(
        {"excludes": [".venv", ".git", "demo-output", "bench-output", "*.egg-info"], "env_vars": aws}
    )
    command = [
        RAY,
        "job",
        "submit",
        "--address",
        f"http://127.0.0.1:{port}",
        "--working-dir",
        str(ROOT),
        "--runtime-env-json",
        runtime_env,
        "--",
        sys.executable,
        script,
        *args,
    ]
    for _ in range(10):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=HANG_SECONDS)
        if "No available agent to submit job" not in done.stderr:
            break
    return done


@pytest.fixture(scope="module")
def s3_images(tiny_synth, s3_server):
    """The tiny dataset's images, captions and splits on the moto S3 server, and the AWS_* variables a job on
    AWS would see."""
    fs, _ = storage.filesystem("s3://cluster", s3_server)
    fs.mkdir("cluster")
    fs.put(str(tiny_synth / "images"), "cluster/images", recursive=True)
    for name in ("captions.json", "splits.json"):
        fs.put_file(str(tiny_synth / name), f"cluster/{name}")
    env = {
        "AWS_ENDPOINT_URL": s3_server["client_kwargs"]["endpoint_url"],
        "AWS_ACCESS_KEY_ID": s3_server["key"],
        "AWS_SECRET_ACCESS_KEY": s3_server["secret"],
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    return "s3://cluster/images", env


def _options(env: dict) -> dict:
    """s3fs options for the endpoint and credentials in AWS_* variables."""
    return {
        "key": env["AWS_ACCESS_KEY_ID"],
        "secret": env["AWS_SECRET_ACCESS_KEY"],
        "client_kwargs": {"endpoint_url": env["AWS_ENDPOINT_URL"]},
    }


def _s3_ids(uri: str, rows_dir: str, env: dict, listing: bool = False) -> list[str]:
    """The image ids of an output's rows on S3 (or, with `listing`, the files under an input prefix)."""
    fs, root = storage.filesystem(uri, _options(env))
    fs.invalidate_cache()
    if listing:
        return sorted(listing_module.iter_files(fs, root))
    return pq.read_table(storage.join(root, rows_dir), filesystem=fs, columns=[schema.IMAGE_ID])[
        schema.IMAGE_ID
    ].to_pylist()


@pytest.mark.multinode
@pytest.mark.slow
def test_job_submit_with_token_auth(s3_images, tmp_path):
    """docs/operations.md's "From zero to captions on AWS" after `ray up`: a token-authenticated head, then
    `ray job submit --working-dir .` of jobs/extract.py, jobs/train.py and jobs/caption.py, every path on S3:
    images, features, captions JSON, split file, model directory (checkpoints in MODEL.runs) and captions."""
    from raycap.train import RUNS_SUFFIX

    images, aws = s3_images
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("AWS_")},
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
            "2",  # room for train's 2 DDP workers (a CPU each)
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
        features, model, captions = (f"s3://cluster/submit/{name}" for name in ("features", "model", "captions"))
        done = _submit(
            port, env, aws, "jobs/extract.py", "--input", images, "--output", features, "--encoder-weights", "random"
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "extract: 40 rows, 0 errors" in done.stdout and f"-> {features}" in done.stdout
        assert sorted(_s3_ids(features, schema.FEATURES_DIR, aws)) == sorted(_s3_ids(images, "", aws, listing=True))
        # The doc's step 5 at the smallest size: one epoch, batches of 8.
        done = _submit(
            port,
            env,
            aws,
            "jobs/train.py",
            "--features",
            features,
            "--captions",
            "s3://cluster/captions.json",
            "--split-file",
            "s3://cluster/splits.json",
            "--output",
            model,
            "--workers",
            "2",
            "--epochs",
            "1",
            "--batch-size",
            "8",
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "train: {" in done.stdout and f"-> {model}" in done.stdout
        fs, _ = storage.filesystem(model, _options(aws))
        fs.invalidate_cache()
        commit = json.loads(fs.cat_file(f"cluster/submit/model/{COMMIT}"))
        assert latest_checkpoint(f"{model}{RUNS_SUFFIX}", _options(aws)).startswith(f"{model}{RUNS_SUFFIX}/")
        done = _submit(
            port,
            env,
            aws,
            "jobs/caption.py",
            "--input",
            images,
            "--model",
            model,
            "--output",
            captions,
            "--max-length",
            "5",
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "caption: 40 rows, 0 errors" in done.stdout
        manifest = json.loads(fs.cat_file(f"cluster/submit/captions/{schema.MANIFEST_FILE}"))
        assert manifest["model"] == model and manifest["model_id"] == commit["model_id"]  # the model trained above
        ids = _s3_ids(captions, schema.CAPTIONS_DIR, aws)
        assert sorted(ids) == sorted(_s3_ids(images, "", aws, listing=True)) and len(ids) == len(set(ids))
        (tmp_path / "wrong-token").write_text(secrets.token_hex(32))
        no_token = {**env, "RAY_AUTH_TOKEN_PATH": str(tmp_path / "wrong-token")}
        denied = subprocess.run(
            [RAY, "job", "list", "--address", f"http://127.0.0.1:{port}"],
            env=no_token,
            capture_output=True,
            text=True,
            timeout=HANG_SECONDS,
        )
        assert denied.returncode != 0  # with another token the head refuses
    finally:
        _stop_cluster(temp)
        shutil.rmtree(temp, ignore_errors=True)
    assert not _cluster_processes(temp)


@pytest.mark.multinode
def test_zero_cpu_head_one_cpu_workers_too_small_nodes_fail_fast_and_a_lost_node_loses_no_image(s3_images):
    """cluster.yaml's shape in miniature, all data on S3: nodes too small for any actor are refused at once with
    one line; extract and caption each lose a worker node mid-run and still write every image exactly once.
    The caption actors read their model directory from S3, as on a cluster whose nodes share no disk."""
    images, aws = s3_images
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **aws}
    env.pop("RAY_ADDRESS", None)
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "multinode_pipeline.py"), images, "s3://cluster/multinode"],
        env=env,
        capture_output=True,
        text=True,
        timeout=HANG_SECONDS,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
    small = report["too_small"]
    assert small["message"] and "\n" not in small["message"], small
    assert small["message"].startswith("no node can hold a model actor") and "2x(1 CPU" in small["message"], small
    # Nothing written: refused by the plan, before the input was listed or any actor started. The bound is a
    # hang guard below the stall watchdog's 300 s (the refusal itself takes well under a second).
    assert not small["wrote"] and small["seconds"] < 120, small
    for job, rows_dir in (("extract", schema.FEATURES_DIR), ("caption", schema.CAPTIONS_DIR)):
        assert report[job]["removed"] and report[job]["manifest"]["rows"] == 40, job
        assert report[job]["manifest"]["resources"]["actors"] == [2, 2], report[job]["manifest"]["resources"]
        ids = _s3_ids(f"s3://cluster/multinode/{'features' if job == 'extract' else 'captions'}", rows_dir, aws)
        assert len(ids) == len(set(ids)) == 40, job
    assert report["caption"]["manifest"]["model"] == "s3://cluster/multinode/model"
    seconds = {job: report[job]["manifest"]["seconds"] for job in ("extract", "caption")}
    print(f"multinode run: {time.monotonic() - started:.0f}s, too small refused in {small['seconds']:.1f}s, {seconds}")


def _raycap(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run(
        [sys.executable, "-m", "raycap.cli", *args],
        env={**base, **(env or {})},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=HANG_SECONDS,
    )


def test_a_dead_address_fails_within_seconds_with_one_line(tiny_synth, tmp_path):
    from raycap.session import _check_reachable

    closed = _free_port()  # nothing listens there once the probe socket is closed
    ray_temp = tmp_path / "ray-temp"  # where a Ray this command started or joined would keep its session
    ray_temp.mkdir()
    done = _raycap(
        "extract",
        "--input",
        str(tiny_synth / "images"),
        "--output",
        str(tmp_path / "out"),
        "--encoder-weights",
        "random",
        "--address",
        f"127.0.0.1:{closed}",
        env={"RAY_TMPDIR": str(ray_temp)},
    )
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        f"raycap extract: error: --address 127.0.0.1:{closed}: no Ray cluster answers at 127.0.0.1:{closed} "
        "(Connection refused); start one with `ray start --head`, or leave --address out for an embedded Ray"
    ], done.stderr[-3000:]
    assert not (tmp_path / "out").exists() and not any(ray_temp.iterdir())  # refused before Ray was touched
    for address, flag in ((f"ray://127.0.0.1:{closed}", "--address"), (f"127.0.0.1:{closed}", "RAY_ADDRESS")):
        with pytest.raises(ValueError, match=rf"^{flag} {address}: no Ray cluster answers at 127.0.0.1:{closed} "):
            _check_reachable(address, flag)
    with pytest.raises(ValueError, match="expected HOST:PORT"):
        _check_reachable("nowhere", "--address")


@pytest.mark.slow
def test_without_an_address_raycap_starts_its_own_ray_even_where_a_dead_cluster_was_the_last(tmp_path):
    """Ray's own rule would join the last cluster started on the machine (ray_current_cluster) and retry it."""
    temp = Path(tempfile.mkdtemp(prefix="rd", dir="/tmp"))  # Ray's socket paths must stay short
    try:
        dead = f"127.0.0.1:{_free_port()}"
        (temp / "ray_current_cluster").write_text(dead)
        code = (
            "from raycap.session import init_ray; import ray; init_ray(None); "
            "print('GCS', ray.get_runtime_context().gcs_address); ray.shutdown()"
        )
        done = subprocess.run(
            [sys.executable, "-c", code],
            env={**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_TMPDIR": str(temp)},
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=HANG_SECONDS,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        gcs = next(line for line in done.stdout.splitlines() if line.startswith("GCS "))[4:]
        assert gcs and gcs != dead
    finally:
        _stop_cluster(temp)
        shutil.rmtree(temp, ignore_errors=True)
