"""The shard plan: streaming listing, parts, incremental reruns, one-listing resume, progress lines, bad inputs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raycap import listing, markers, plan, progress, schema, storage
from tests.helpers import extract


def _touch(root: Path, names: list[str]) -> None:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"")


def _planned(out: Path) -> list[list[str]]:
    """Every shard's ids, read back the way the pipeline's tasks read them."""
    fs, root = storage.filesystem(str(out))
    header = plan.read_plan(fs, root)
    items = plan.pending_parts(header, {})
    table = pa.concat_tables(plan.expand_parts(pa.Table.from_pylist(items), str(out), {}))
    assert table["shard"].to_pylist() == list(range(header.shards))
    return table["units"].to_pylist()


def test_local_and_object_store_listings_stream_the_same_order(tmp_path):
    names = ["b/2.jpg", "a.jpg", "b/1/x.jpg", "c.png", "a/z.jpg", ".hidden.jpg", "_DSC0001.JPG", "_raw/y.jpg",
             "b/.k/q", "_shards/shard-000000.json", "_manifest.json", "_plan/_plan.json"]  # fmt: skip
    _touch(tmp_path, names)
    skipped = listing.Skipped()
    local = list(listing.iter_files(*storage.filesystem(str(tmp_path)), skipped=skipped))
    # Whole ids in order (S3's key order: 'a.jpg' < 'a/'); only hidden names and raycap's own bookkeeping skipped.
    assert local == ["_DSC0001.JPG", "_raw/y.jpg", "a.jpg", "a/z.jpg", "b/1/x.jpg", "b/2.jpg", "c.png"]
    mem = fsspec.filesystem("memory")
    for name in names:
        mem.pipe(f"/bucket/in/{name}", b"")
    # Counted, never silent: .hidden.jpg, b/.k, _shards, _manifest.json, _plan.
    assert skipped.count == 5 and sorted(skipped.examples)[0] == ".hidden.jpg", skipped
    remote_skipped = listing.Skipped()
    assert list(listing.iter_files(mem, "/bucket/in", threads=3, skipped=remote_skipped)) == local
    assert remote_skipped.count == 5
    with pytest.raises(ValueError, match="does not exist"):
        listing.iter_files(mem, "/bucket/nothing")


def test_plan_incremental_reruns_keep_every_file_exactly_once(tmp_path, monkeypatch):
    monkeypatch.setattr(plan, "SHARDS_PER_PART", 2)  # several parts from a few files
    src, out = tmp_path / "in", tmp_path / "out"
    first = [f"d{i}/{j}.jpg" for i in range(3) for j in range(4)]
    _touch(src, first)
    said: list[str] = []
    args = (*storage.filesystem(str(src)), *storage.filesystem(str(out)))
    made = plan.prepare(*args, shard_size=3, actors=1, say=said.append)
    assert (made.files, made.shards, len(made.parts)) == (12, 4, 2)
    assert _planned(out) == [first[i : i + 3] for i in range(0, 12, 3)]
    parts_before = {p: (out / schema.PLAN_DIR / p).read_bytes() for p in ("part-000000.parquet", "part-000001.parquet")}

    _touch(src, ["d0/9.jpg", "e/1.jpg"])
    os.remove(src / "d1/0.jpg")
    again = plan.prepare(*args, shard_size=5, actors=1, say=said.append)
    assert again.shards == 4 and "not relisted" in said[-1]  # a plain rerun keeps the plan as it is
    grown = plan.prepare(*args, shard_size=5, actors=1, incremental=True, say=said.append)
    assert (grown.files, grown.shards, grown.shard_size) == (14, 5, 3)
    assert any("1 planned files are gone" in s and "d1/0.jpg" in s for s in said)
    shards = _planned(out)
    assert shards[4] == ["d0/9.jpg", "e/1.jpg"]  # only the new files, in a new shard
    flat = [i for s in shards for i in s]
    assert len(flat) == len(set(flat)) == 14
    assert all((out / schema.PLAN_DIR / p).read_bytes() == b for p, b in parts_before.items())
    assert [i["files"] for i in grown.increments] == [12, 2] and grown.increments[1]["removed"] == 1
    assert plan.prepare(*args, shard_size=5, actors=1, incremental=True, say=said.append).shards == 5  # idempotent

    other = tmp_path / "other"
    shutil.copytree(src, other)
    with pytest.raises(ValueError, match="another input"):
        plan.prepare(*storage.filesystem(str(other)), *storage.filesystem(str(out)), 5, 1)


def test_finished_shards_come_from_one_listing_and_double_commits_are_redone(tmp_path):
    fs, root = storage.filesystem(str(tmp_path))
    marker_dir = tmp_path / schema.SHARDS_DIR
    _touch(
        marker_dir,
        [
            markers.marker_name(0, 250, 6),
            markers.marker_name(1, 256, 0),
            markers.marker_name(2, 3, 1),
            markers.marker_name(2, 4, 0),
            "shard-000003.json.1a2b.tmp",
        ],
    )
    assert markers.finished_shards(fs, root) == {0: (250, 6), 1: (256, 0)}
    assert sorted(os.listdir(marker_dir))[:2] == [markers.marker_name(0, 250, 6), markers.marker_name(1, 256, 0)]
    assert not any(n.startswith("shard-000002") for n in os.listdir(marker_dir))


def test_progress_prints_every_tenth_of_the_shards_or_interval():
    lines: list[str] = []
    now = [0.0]
    p = progress.Progress(25, 400, {0: (16, 0)}, lines.append, every_seconds=30, clock=lambda: now[0])
    for _ in range(1, 25):
        now[0] += 1.0
        p.shard_finished(15, 1)
    assert len(lines) == 8  # 24 shards in steps of 3 (10% of 25, rounded up)
    assert lines[3] == "progress: 13/25 shards, 208 images, 12 errors, 16.0 images/s, ETA 12s"
    assert lines[-1].startswith("progress: 25/25 shards, 400 images")
    slow = progress.Progress(100, 100, {}, lines.append, every_seconds=30, clock=lambda: now[0])
    now[0] += 31
    slow.shard_finished(1, 0)
    assert lines[-1].startswith("progress: 1/100 shards")  # 30 s passed, though only 1% finished


@pytest.mark.slow
def test_incremental_run_processes_new_files_once_and_prints_progress(ray_session, tiny_synth, tmp_path, capsys):
    src, out = tmp_path / "in", tmp_path / "out"
    images = sorted((tiny_synth / "images").iterdir())
    src.mkdir()
    for path in images[:24]:
        shutil.copy(path, src / path.name)
    assert extract(src, out, "--shard-size", "4") == 0
    printed = capsys.readouterr().out
    progress = [line for line in printed.splitlines() if line.startswith("progress: ")]
    assert len(progress) == 6 and progress[-1].startswith("progress: 6/6 shards, 24 images, 0 errors")
    old = {p.name: p.read_bytes() for p in (out / schema.FEATURES_DIR).iterdir()}

    for path in images[24:]:
        shutil.copy(path, src / path.name)
    os.remove(src / images[0].name)
    assert extract(src, out) == 0  # without --incremental the plan stays and nothing is left
    assert "not relisted" in capsys.readouterr().out
    assert extract(src, out, "--incremental") == 0
    assert "1 planned files are gone" in capsys.readouterr().out
    manifest = json.loads((out / schema.MANIFEST_FILE).read_text())
    assert (manifest["shards_this_run"], manifest["shards"], manifest["rows"]) == (4, 10, 40)
    assert [i["files"] for i in manifest["increments"]] == [24, 16]
    assert all((out / schema.FEATURES_DIR / name).read_bytes() == data for name, data in old.items())
    ids = pq.read_table(out / schema.FEATURES_DIR)[schema.IMAGE_ID].to_pylist()
    assert sorted(ids) == sorted(p.name for p in images)
    assert extract(src, out, "--incremental") == 0
    assert "nothing to do" in capsys.readouterr().out


def _plan_only_peak_rss(src: Path, out: Path) -> tuple[int, str]:
    """Peak RSS (KiB) and last line of `raycap extract --plan-only` in a child process."""
    cmd = [
        sys.executable,
        "-m",
        "raycap.cli",
        "extract",
        "--plan-only",
        "--input",
        str(src),
        "--output",
        str(out),
        "--encoder-weights",
        "random",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)  # the child's own rusage (its output is a few lines)
    assert os.waitstatus_to_exitcode(status) == 0, proc.stderr.read()
    return usage.ru_maxrss, proc.stdout.read().strip().splitlines()[-1]


@pytest.mark.slow
def test_plan_only_memory_does_not_grow_with_the_listing(tmp_path):
    peaks = {}
    for n in (10_000, 100_000):
        src = tmp_path / f"in{n}"
        for k in range(n):
            folder = src / f"{k // 1000:03d}"
            if k % 1000 == 0:
                folder.mkdir(parents=True)
            os.close(os.open(folder / f"{k:06d}.jpg", os.O_CREAT | os.O_WRONLY))
        peaks[n], line = _plan_only_peak_rss(src, tmp_path / f"out{n}")
        assert line == f"extract: {n} files in {-(-n // 256)} shards"
        shutil.rmtree(src)
    assert peaks[100_000] <= 1.5 * peaks[10_000], peaks


def test_empty_or_unlistable_inputs_fail_with_one_line(ray_session, tmp_path, s3_server, capsys, monkeypatch):
    empty = tmp_path / "empty"
    _touch(empty, [".DS_Store", ".hidden/a.jpg"])  # hidden names only (`_SUCCESS` would be an input: an error row)
    assert extract(empty, tmp_path / "out") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no files under" in err[0]
    from moto import settings

    monkeypatch.setattr(settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # moto checks credentials from now on
    wrong = {**s3_server, "key": "wrong", "secret": "wrong"}
    code = extract("s3://raycap-test/in", tmp_path / "out2", "--storage-options", json.dumps(wrong))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "s3://raycap-test/in" in err[0] and "Forbidden" in err[0], err
    assert not (tmp_path / "out2" / schema.SHARDS_DIR).exists()
