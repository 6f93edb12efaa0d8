"""synth -> extract -> train -> caption -> evaluate through the real entry points, every path on S3 (moto).

On a real cluster no two nodes share a disk; on one machine only paths on S3 prove that. The run starts in an
empty working directory and afterwards no file may have appeared on local disk outside Ray's temp directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jobs import caption as caption_job
from jobs import extract as extract_job
from jobs import train as train_job
from raycap import cli, schema
from tests.helpers import extract

# Written by others, not by raycap: Python's bytecode of first imports, pytest's cache, the JVM's performance
# counters (pycocoevalcap runs Java's PTB tokenizer), and Ray's own temp directories (this session's, and those of
# any other Ray on a developer's machine).
_NOT_OURS = ("__pycache__", ".pytest_cache", "/hsperfdata_", "/session_", "/ray_current_cluster")


def _new_files(since: Path, allowed: list[str]) -> list[str]:
    """Regular files on local disk modified after `since`, outside `allowed` folders and Python's own caches."""
    found = subprocess.run(
        [
            "find",
            "/",
            "(",
            "-path",
            "/proc",
            "-o",
            "-path",
            "/sys",
            "-o",
            "-path",
            "/dev",
            "-o",
            "-path",
            "/run",
            ")",
            "-prune",
            "-o",
            "-type",
            "f",
            "-newer",
            str(since),
            "-print",
        ],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.splitlines()
    return [f for f in found if not any(part in f for part in _NOT_OURS) and not f.startswith(tuple(allowed))]


@pytest.fixture
def s3_data(s3_server, tiny_synth):
    """The tiny synthetic set (images, captions, splits, objects) uploaded to a fresh bucket."""
    import s3fs

    fs = s3fs.S3FileSystem(**s3_server, use_listings_cache=False, skip_instance_cache=True)
    bucket = f"e2e-{uuid.uuid4().hex[:12]}"
    fs.mkdir(bucket)
    fs.put(str(tiny_synth / "images"), f"{bucket}/data/images", recursive=True)
    for name in ("captions.json", "splits.json", "objects.json"):
        fs.put_file(str(tiny_synth / name), f"{bucket}/data/{name}")
    return fs, f"s3://{bucket}"


@pytest.mark.slow
def test_pipeline_end_to_end_with_every_path_on_s3(
    ray_session, s3_data, s3_server, tmp_path, monkeypatch, random_trunk_cache
):
    import ray

    fs, root = s3_data
    data, features, model, out = f"{root}/data", f"{root}/features", f"{root}/model", f"{root}/captions"
    options = ["--storage-options", json.dumps(s3_server)]
    workdir = tmp_path / "empty"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    marker = tmp_path / "started"
    marker.touch()
    ray_temp = ray._private.worker._global_node.get_temp_dir_path()

    assert extract(f"{data}/images", features, "--shard-size", "16", *options) == 0
    manifest = json.loads(fs.cat_file(f"{features}/{schema.MANIFEST_FILE}"))
    assert manifest["rows"] == 40 and manifest["errors"] == 0 and manifest["shards"] == 3
    table = pq.read_table(f"{features}/{schema.FEATURES_DIR}".removeprefix("s3://"), filesystem=fs)
    assert sorted(table[schema.IMAGE_ID].to_pylist()) == sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{data}/images"))
    assert schema.features_to_numpy(table[schema.FEATURES]).shape == (40, 64, 2048)

    train = ["--features", features, "--captions", f"{data}/captions.json", "--split-file", f"{data}/splits.json"]
    assert (
        train_job.main([*train, "--output", model, "--epochs", "2", "--workers", "2", "--batch-size", "8", *options])
        == 0
    )
    history = [json.loads(line) for line in fs.cat_file(f"{model}/metrics.jsonl").decode().splitlines()]
    assert [m["epoch"] for m in history] == [0, 1]
    assert history[1]["train_loss"] < history[0]["train_loss"]
    assert {"val_loss", "val_bleu4", "val_cider", "samples_per_second"} <= set(history[-1])

    assert (
        caption_job.main(
            [
                "--input",
                f"{data}/images",
                "--output",
                out,
                "--model",
                model,
                "--beam-size",
                "2",
                "--max-length",
                "12",
                *options,
            ]
        )
        == 0
    )
    captions = pq.read_table(f"{out}/{schema.CAPTIONS_DIR}".removeprefix("s3://"), filesystem=fs).to_pylist()
    assert len(captions) == 40
    for row in captions:
        assert row[schema.CAPTION] == " ".join(row[schema.TOKENS])
        assert len(row[schema.ATTENTION]) == len(row[schema.TOKENS]) <= 12
        assert all(abs(sum(a) - 1) < 0.02 for a in row[schema.ATTENTION])
        assert row[schema.SCORE] <= 0

    evaluate = [
        "evaluate",
        "--predictions",
        out,
        "--references",
        f"{data}/captions.json",
        "--objects",
        f"{data}/objects.json",
        "--output",
        f"{root}/metrics.json",
        *options,
    ]
    assert cli.main(evaluate) == 0
    metrics = json.loads(fs.cat_file(f"{root}/metrics.json"))
    assert metrics["images"] == 40 and 0 <= metrics["object_accuracy"] <= 1 and "CIDEr" in metrics

    assert os.listdir(workdir) == []
    written = _new_files(marker, [ray_temp, str(marker), random_trunk_cache])  # a cache, not an output
    assert not written, "written to local disk:\n" + "\n".join(written[:40])


def test_user_mistakes_are_one_line_errors(ray_session, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert extract(str(empty), str(tmp_path / "o")) == 2
    assert extract_job.main(["--input", str(tmp_path / "missing"), "--output", str(tmp_path / "o")]) == 2
    assert caption_job.main(["--input", str(empty), "--output", str(tmp_path / "c"), "--model", str(empty)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3
    assert "no files under" in err[0] or "no images under" in err[0]
    assert "--input" in err[1] and "missing" in err[1]
    assert "not a raycap model directory" in err[2]
