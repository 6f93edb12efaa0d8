"""Faults: a store that refuses or drops reads mid-job, a shard that kills its worker, killed writes, Ray's lines."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raycap import attempts, cli, markers, pipeline, schema, storage
from tests.faults import FaultProxy, PoisonModel
from tests.helpers import HANG_SECONDS, mean_job

ROOT = Path(__file__).resolve().parents[1]


def _bucket(s3_server: dict, tiny_synth: Path, name: str, n: int) -> list[str]:
    """`n` of the tiny dataset's images in a new bucket of the moto server; their names."""
    import s3fs

    fs = s3fs.S3FileSystem(**s3_server)
    fs.mkdir(name)
    names = sorted(os.listdir(tiny_synth / "images"))[:n]
    fs.pipe({f"{name}/{i}": (tiny_synth / "images" / i).read_bytes() for i in names})
    return names


def _through(s3_server: dict, proxy: FaultProxy) -> dict:
    return {**s3_server, "client_kwargs": {"endpoint_url": proxy.endpoint}}


def _feature_ids(out: Path) -> list[str]:
    return pq.read_table(out / schema.FEATURES_DIR, columns=[schema.IMAGE_ID])[schema.IMAGE_ID].to_pylist()


@pytest.mark.parametrize("mode", ["expired", "reset"])
def test_a_window_of_refused_or_dropped_reads_mid_job_loses_no_image(
    mode, ray_session, s3_server, tiny_synth, tmp_path
):
    """12 images in shards of 4; object GETs 5..16 answer 403 ExpiredToken (credentials rotated mid-job) or reset
    the connection: every image ends as a features row, none as a read error."""
    names = _bucket(s3_server, tiny_synth, f"window-{mode}", 12)
    with FaultProxy(s3_server["client_kwargs"]["endpoint_url"], mode, after=4, window=12) as proxy:
        job = mean_job(
            f"s3://window-{mode}", tmp_path / "out", shard_size=4, storage_options=_through(s3_server, proxy)
        )
        manifest = pipeline.run(job, progress=lambda line: None)
    assert proxy.failed == 12  # the whole window was served, mid-job
    assert (manifest["rows"], manifest["errors"]) == (12, 0)
    assert sorted(_feature_ids(tmp_path / "out")) == names
    assert not (tmp_path / "out" / schema.ERRORS_DIR).exists()


@pytest.mark.slow
def test_persistently_expired_credentials_end_the_job_with_one_line_and_no_marker(s3_server, tiny_synth, tmp_path):
    """From the 5th object GET on every read is a 403: `raycap extract` ends with its one error line (no
    traceback), the shard it was reading has no marker, and no image is recorded as an error."""
    _bucket(s3_server, tiny_synth, "expired", 12)
    out = tmp_path / "out"
    with FaultProxy(s3_server["client_kwargs"]["endpoint_url"], "expired", after=4, window=None) as proxy:
        env = os.environ | {
            "PYTHONPATH": str(ROOT),
            "RAYCAP_READ_ATTEMPTS": "2",  # the retries, not their length, are under test
            "RAYCAP_READ_BACKOFF_S": "0",
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        options = json.dumps(_through(s3_server, proxy))
        argv = ["extract", "--input", "s3://expired", "--output", str(out), "--encoder-weights", "random"]
        argv += ["--shard-size", "4", "--actors", "1", "--storage-options", options]
        done = subprocess.run(
            [sys.executable, "-m", "raycap.cli", *argv], env=env, capture_output=True, text=True, timeout=HANG_SECONDS
        )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("raycap extract: error: cannot read s3://expired/") and "token has expired" in last, last
    assert "after 2 tries" in last and "rerun" in last
    fs, root = storage.filesystem(str(out))
    assert set(markers.finished_shards(fs, root)) == {0}  # shard 1 met the 403s: no marker, so a rerun reads it
    assert not (out / schema.ERRORS_DIR).exists()


@pytest.mark.slow
def test_a_shard_that_kills_its_worker_fails_alone_and_a_rerun_retries_only_it(ray_session, tiny_synth, tmp_path):
    """40 images in 4 shards, one actor; the shard holding the poison image kills the worker each time: it is
    tried SHARD_ATTEMPTS times, then failed with one line naming it, the other 3 commit; a rerun without the fault
    processes only that shard, and every image is one row."""
    images, out = tiny_synth / "images", tmp_path / "out"
    poison = sorted(os.listdir(images))[17]
    job = mean_job(images, out, model_cls=PoisonModel, shard_size=10)
    job.model_kwargs["poison"] = poison
    with pytest.raises(attempts.ShardsFailed) as raised:
        pipeline.run(job, progress=lambda line: None)
    fs, root = storage.filesystem(str(out))
    finished = markers.finished_shards(fs, root)
    assert len(finished) == 3
    (failed,) = set(range(4)) - set(finished)
    line = cli._user_error(raised.value)
    assert line is not None and "\n" not in line
    assert line.startswith("1 shard(s) failed") and markers.shard_name(failed) in line and "worker died" in line, line
    assert attempts.tried(fs, root, failed) == attempts.SHARD_ATTEMPTS
    assert (out / schema.SHARDS_DIR / attempts.FAILED_DIR / f"{markers.shard_name(failed)}.json").exists()
    job.model_kwargs["poison"] = None
    manifest = pipeline.run(job, progress=lambda line: None)
    assert manifest["shards_this_run"] == 1 and (manifest["rows"], manifest["errors"]) == (40, 0)
    ids = _feature_ids(out)
    assert len(ids) == 40 and set(ids) == set(os.listdir(images)) and poison in ids
    assert not (out / schema.SHARDS_DIR / attempts.FAILED_DIR).exists()


def test_duckdb_reads_the_output_folder_after_a_killed_write(tmp_path, monkeypatch):
    """A write killed between its temporary and the rename leaves the temporary beside the shards; DuckDB's
    read of the folder's Parquet files sees only the complete shard."""
    import duckdb

    fs, root = storage.filesystem(str(tmp_path / "features"))
    table = pa.table({"image_id": ["a.jpg", "b.jpg"], "x": [1, 2]})
    storage.write_parquet_atomic(fs, storage.join(root, "shard-000000.parquet"), table, "none")
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(SystemExit("killed")))
    with pytest.raises(SystemExit):
        storage.write_parquet_atomic(fs, storage.join(root, "shard-000001.parquet"), table, "none")
    monkeypatch.undo()
    assert len(os.listdir(tmp_path / "features")) == 2  # the shard and the killed write's temporary
    files = (tmp_path / "features" / "*.parquet").as_posix()
    assert duckdb.sql(f"SELECT count(*) FROM read_parquet('{files}')").fetchall() == [(2,)]


@pytest.mark.slow
def test_a_default_run_prints_only_raycaps_lines(tmp_path):
    """`raycap synth` then `raycap extract` (an embedded Ray, one actor that may restart): none of Ray's
    internal lines (the core worker's note on constructor arguments, the GCS's failed kill) reach the output."""
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    env.pop("RAYCAP_VERBOSE", None)
    commands = [
        ["synth", "--output", str(tmp_path / "synth"), "--num-images", "8"],
        ["extract", "--input", str(tmp_path / "synth" / "images"), "--output", str(tmp_path / "out")]
        + ["--encoder-weights", "random", "--shard-size", "4", "--actors", "1"],
    ]
    for argv in commands:
        done = subprocess.run(
            [sys.executable, "-m", "raycap.cli", *argv], env=env, capture_output=True, text=True, timeout=HANG_SECONDS
        )
        text = done.stdout + done.stderr
        assert done.returncode == 0, text
        assert "has constructor arguments in the object store" not in text, text
        assert "Failed to kill actor" not in text and "core_worker.cc" not in text and "gcs_server" not in text, text
        lines = [line for line in text.splitlines() if line.strip()]
        assert all(line.startswith((argv[0] + ":", str(tmp_path), "progress:")) for line in lines), lines


def test_forgetting_tries_on_s3_whose_objects_vanish_meanwhile_is_not_an_error(s3_server, monkeypatch):
    """A killed driver's last request (its DELETE of a committed shard's tries) can still land while the rerun
    clears the attempts/ folder: found by `exists`, gone by `rm`. Removing nothing is not an error (the rerun
    once failed with the line "raycap extract: error: ['.../_shards/attempts']")."""
    import s3fs

    fs, root = storage.filesystem("s3://vanishing-attempts/out", s3_server)
    fs.mkdir("vanishing-attempts")
    folder = f"{root}/{schema.SHARDS_DIR}/{attempts.ATTEMPTS_DIR}"
    fs.pipe_file(f"{folder}/shard-000000/try-1", b"")
    other = s3fs.S3FileSystem(**s3_server, skip_instance_cache=True, use_listings_cache=False)
    exists = fs.exists

    def exists_then_the_late_delete_lands(path: str, **kwargs) -> bool:
        found = exists(path, **kwargs)
        if found and path.rstrip("/") == folder:
            other.rm(folder, recursive=True)
        return found

    monkeypatch.setattr(fs, "exists", exists_then_the_late_delete_lands)
    attempts.clear(fs, root)
    fs.invalidate_cache()
    assert not exists(folder)
