"""The `raycap` command without Ray: user mistakes caught before Ray starts, evaluate/show/report on S3, verbosity."""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from pathlib import Path
from unittest import mock

import pytest
from PIL import Image

from raycap import cli, markers, pipeline, schema, session, storage, synth
from tests.helpers import FullDiskModel, fsync_on_a_full_disk, mean_job, write_predictions, write_references

CAPTIONS = {"a.png": ["a red circle on the left"], "b.png": ["a blue square on the top"]}


@pytest.fixture(autouse=True)
def environment(monkeypatch):
    """The variables `cli.main` sets are restored after each test; no EC2 metadata lookups.

    botocore would spend ~10 s asking the EC2 metadata endpoint for a region before the first S3 call.
    """
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    for name in [cli.VERBOSE_ENV, *session.QUIET_RAY_ENV]:
        monkeypatch.delenv(name, raising=False)


def one_error_line(capsys, argv: list[str]) -> str:
    """`raycap ARGV` exits 2 with one error line, and never got as far as starting or joining a Ray (what a
    wall-clock bound could only suggest: Ray's start takes seconds)."""
    import ray

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started or joined before the mistake was reported")

    with (
        mock.patch.object(ray, "init", refuse),
        mock.patch.object(cli, "init_ray", refuse),
        mock.patch.object(cli, "init_ray_while", refuse),
    ):
        assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"raycap {argv[0]}: error: ")
    return err[0]


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """A predictions root, its references and objects, and a plain-text file that is not JSON."""
    images = tmp_path / "images"
    images.mkdir()
    rows = []
    for name, caps in CAPTIONS.items():
        Image.new("RGB", (64, 48), "white").save(images / name)
        rows.append({"image_id": name, "path": str(images / name), "caption": caps[0]})
    write_predictions(tmp_path / "out" / "captions" / "part-0.parquet", rows)
    write_references(tmp_path / "captions.json", CAPTIONS)
    (tmp_path / "notes.txt").write_text("these are notes, not JSON\n")
    return tmp_path


def test_a_missing_input_is_one_line_before_ray_starts(tmp_path, capsys) -> None:
    missing = str(tmp_path / "nonexistent")
    line = one_error_line(capsys, ["extract", "--input", missing, "--output", str(tmp_path / "o")])
    assert "--input" in line and missing in line
    line = one_error_line(
        capsys, ["extract", "--input", str(tmp_path), "--output", str(tmp_path / "o"), "--encoder-weights", missing]
    )
    assert "--encoder-weights" in line and missing in line
    line = one_error_line(
        capsys, ["caption", "--input", str(tmp_path), "--output", str(tmp_path / "o"), "--model", missing]
    )
    assert "--model" in line and missing in line
    (tmp_path / "features").mkdir()
    line = one_error_line(
        capsys, ["train", "--features", str(tmp_path), "--captions", missing, "--output", str(tmp_path / "m")]
    )
    assert "--captions" in line and missing in line
    line = one_error_line(
        capsys, ["train", "--features", missing, "--captions", str(tmp_path), "--output", str(tmp_path / "m")]
    )
    assert "--features" in line and missing in line


def test_an_s3_input_that_does_not_exist_is_one_line_before_ray_starts(s3_server, tmp_path, capsys) -> None:
    options = json.dumps(s3_server)
    line = one_error_line(
        capsys,
        [
            "extract",
            "--input",
            "s3://no-such-bucket/images",
            "--output",
            str(tmp_path / "o"),
            "--storage-options",
            options,
        ],
    )
    assert "--input" in line and "s3://no-such-bucket/images" in line


def test_evaluate_names_the_file_that_is_not_json(data: Path, capsys) -> None:
    notes = str(data / "notes.txt")
    line = one_error_line(capsys, ["evaluate", "--predictions", str(data / "out"), "--references", notes])
    assert "--references" in line and notes in line and "not a JSON file" in line
    line = one_error_line(
        capsys,
        [
            "evaluate",
            "--predictions",
            str(data / "out"),
            "--references",
            str(data / "captions.json"),
            "--objects",
            notes,
        ],
    )
    assert "--objects" in line and notes in line
    missing = str(data / "missing.json")
    line = one_error_line(capsys, ["evaluate", "--predictions", str(data / "out"), "--references", missing])
    assert "--references" in line and missing in line and "no such file" in line
    line = one_error_line(capsys, ["evaluate", "--predictions", missing, "--references", str(data / "captions.json")])
    assert "--predictions" in line and missing in line


def test_evaluate_show_and_report_read_and_write_s3(s3_server, data: Path, monkeypatch) -> None:
    import s3fs

    fs = s3fs.S3FileSystem(**s3_server)
    fs.mkdir("eval-bucket")
    fs.put(str(data / "captions.json"), "eval-bucket/run/captions.json")
    for name in CAPTIONS:  # the images the captions point at are on S3 too
        fs.put(str(data / "images" / name), f"eval-bucket/images/{name}")
    rows = [{"image_id": n, "path": f"s3://eval-bucket/images/{n}", "caption": c[0]} for n, c in CAPTIONS.items()]
    write_predictions(data / "s3rows.parquet", rows)
    fs.put(str(data / "s3rows.parquet"), "eval-bucket/run/out/captions/part-0.parquet")
    monkeypatch.setattr("raycap.metrics.shutil.which", lambda name: None)  # no JVM start-ups: storage is the point
    # Endpoint and keys from the AWS variables for evaluate; --storage-options for show and report.
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server["client_kwargs"]["endpoint_url"])
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    argv = [
        "evaluate",
        "--predictions",
        "s3://eval-bucket/run/out",
        "--references",
        "s3://eval-bucket/run/captions.json",
    ]
    assert cli.main([*argv, "--output", "s3://eval-bucket/run/metrics.json"]) == 0
    metrics = json.loads(fs.cat_file("eval-bucket/run/metrics.json"))
    assert metrics["images"] == 2 and metrics["BLEU-1"] == pytest.approx(1.0, abs=1e-6)
    options = ["--storage-options", json.dumps(s3_server)]
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    show = ["show", "--predictions", "s3://eval-bucket/run/out", "--image", "a.png"]
    assert cli.main([*show, "--output", "s3://eval-bucket/run/a.png", *options]) == 0
    assert fs.cat_file("eval-bucket/run/a.png").startswith(b"\x89PNG")
    report = ["report", "--predictions", "s3://eval-bucket/run/out", "--output", "s3://eval-bucket/run/index.html"]
    assert cli.main([*report, *options]) == 0
    page = fs.cat_file("eval-bucket/run/index.html").decode()
    assert page.count("<section>") == 2 and "image unavailable" not in page


def test_quiet_by_default_and_verbose_on_request(monkeypatch, capsys) -> None:
    handler = logging.StreamHandler()
    monkeypatch.setattr(logging.getLogger("ray"), "handlers", [handler])
    session.quiet_ray()
    assert handler.level == logging.ERROR  # Ray's INFO and WARNING lines stay off the console
    assert Path(session.QUIET_RAY_ENV["RAY_DATA_LOGGING_CONFIG"]).is_file()
    for name, value in session.QUIET_RAY_ENV.items():
        assert cli.os.environ[name] == value
        monkeypatch.delenv(name)
    loud = logging.StreamHandler()
    monkeypatch.setattr(logging.getLogger("ray"), "handlers", [loud])
    for command in cli.COMMANDS:
        with pytest.raises(SystemExit):
            cli.build_parser().parse_args([command, "--help"])
        assert "--verbose" in capsys.readouterr().out
    monkeypatch.setattr(cli, "COMMANDS", {**cli.COMMANDS, "synth": lambda a: session.quiet_ray()})
    assert cli.main(["synth", "--output", "unused", "--verbose"]) == 0
    assert loud.level == logging.NOTSET and not any(name in cli.os.environ for name in session.QUIET_RAY_ENV)


def test_a_full_disk_is_one_line_naming_the_file_and_leaves_no_temporary_file(data: Path, capsys, monkeypatch):
    monkeypatch.setattr(os, "fsync", fsync_on_a_full_disk)
    target = data / "metrics" / "scores.json"
    argv = ["evaluate", "--predictions", str(data / "out"), "--references", str(data / "captions.json")]
    line = one_error_line(capsys, [*argv, "--output", str(target)])
    assert line == (
        f"raycap evaluate: error: disk full (No space left on device: {target}); free space, then rerun to resume"
    )
    assert os.listdir(target.parent) == []


def test_a_full_disk_under_a_shard_is_one_line_naming_its_file(ray_session, tiny_synth, tmp_path) -> None:
    """A model actor's disk fills up: the run ends with one line naming the file it could not write, leaving
    neither that file, its temporary sibling nor the shard's commit marker (a rerun redoes the shard)."""
    out = tmp_path / "out"
    job = mean_job(tiny_synth / synth.IMAGES_DIR, out, FullDiskModel, shard_size=40)
    with pytest.raises(OSError) as failed:
        pipeline.run(job, progress=lambda _: None)
    assert not ray_session.data.DataContext.get_current().raise_original_map_exception  # only the job's Dataset
    # The first file the shard writes is its attempt marker (raycap/attempts.py), then its rows.
    line = cli._user_error(failed.value)
    assert re.fullmatch(
        rf"disk full \(No space left on device: {re.escape(str(out))}/\S+\); free space, then rerun to resume", line
    )
    assert not (out / schema.FEATURES_DIR).exists() or os.listdir(out / schema.FEATURES_DIR) == []
    assert markers.finished_shards(*storage.filesystem(str(out))) == {}
    assert not [p for p in out.rglob("*.tmp")]  # no temporary sibling left


def test_an_object_store_that_cannot_spill_is_one_line(ray_session) -> None:
    @ray_session.remote
    def put_a_block() -> None:
        raise ray_session.exceptions.OutOfDiskError()  # what a raylet raises when its disk is over 95% full

    with pytest.raises(ray_session.exceptions.RayTaskError) as failed:
        ray_session.get(put_a_block.remote())
    assert cli._user_error(failed.value) == (
        "disk full: a node's object store had to spill to a disk over Ray's limit (95% full); "
        "free space under its Ray temp folder (`df`), then rerun to resume"
    )


def test_worker_lines_carry_no_colour_codes_when_the_output_is_not_a_terminal(monkeypatch):
    import io as text_io

    from ray._private import worker

    monkeypatch.delenv("RAY_COLOR_PREFIX", raising=False)
    line = {"pid": "4242", "ip": "10.0.0.1", "localhost": "10.0.0.1", "lines": ["epoch epoch=0 train_loss=3.2"],
            "task_name": "RayTrainWorker", "actor_name": "RayTrainWorker"}  # fmt: skip
    coloured = text_io.StringIO()
    worker.print_worker_logs(line, coloured)
    assert "\x1b[" in coloured.getvalue()  # Ray's default: escape codes, terminal or not
    monkeypatch.setattr(sys, "stdout", text_io.StringIO())  # a pipe, a log file, `ray job logs`
    session.plain_worker_prefixes()
    plain = text_io.StringIO()
    worker.print_worker_logs(line, plain)
    assert "\x1b[" not in plain.getvalue() and "epoch epoch=0 train_loss=3.2" in plain.getvalue()
