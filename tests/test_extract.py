"""The extract job on a local Ray: every bad image survives as an error row, resume is exactly once, S3 works."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileSystem
from PIL import Image

from jobs import extract as extract_job
from raycap import markers, pipeline, schema
from tests.helpers import HANG_SECONDS, extract, mean_job


def _save(path: Path, img: Image.Image, fmt: str, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    path.write_bytes(buf.getvalue())


def _noise(w: int, h: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(arr).convert(mode)


def make_corpus(root: Path) -> tuple[set[str], dict[str, str]]:
    """Files every real collection has; returns (good ids, bad id -> expected words in the error)."""
    good = {
        "plain.jpg": lambda p: _save(p, _noise(320, 240), "JPEG"),
        "UPPER.JPG": lambda p: _save(p, _noise(64, 48), "JPEG"),
        "png named.jpg": lambda p: _save(p, _noise(50, 40), "PNG"),
        "nested/deeper/cmyk.jpg": lambda p: _save(p, _noise(60, 40, "CMYK"), "JPEG"),
        "nested/grey.png": lambda p: _save(p, _noise(30, 20, "L"), "PNG"),
        "sixteen.png": lambda p: _save(
            p, Image.fromarray((np.arange(64 * 32).reshape(32, 64) * 30).astype(np.uint16)), "PNG"
        ),
        "palette.png": lambda p: _save(p, _noise(40, 40).convert("P"), "PNG", transparency=0),
        "alpha.png": lambda p: _save(p, _noise(40, 40, "RGBA"), "PNG"),
        "animated.gif": lambda p: _save(
            p, _noise(32, 32).convert("P"), "GIF", save_all=True, append_images=[_noise(32, 32, seed=1).convert("P")]
        ),
        "photo.webp": lambda p: _save(p, _noise(48, 32), "WEBP"),
        "bitmap.bmp": lambda p: _save(p, _noise(48, 32), "BMP"),
        "scan.tiff": lambda p: _save(p, _noise(48, 32), "TIFF"),
        "été à la plage/ünïcode.jpg": lambda p: _save(p, _noise(40, 30), "JPEG"),
        "rotated.jpg": lambda p: _save(p, _noise(80, 40), "JPEG", exif=_orientation(6)),
    }
    bad = {
        "empty.jpg": (lambda p: p.write_bytes(b""), "empty"),
        "notes.txt": (lambda p: p.write_text("not an image at all"), "not an image"),
        "truncated.jpg": (lambda p: p.write_bytes(_jpeg_bytes()[:600]), "truncated"),
        "bomb.png": (lambda p: _save(p, Image.new("1", (4000, 3000)), "PNG"), "pixels"),
    }
    for name, make in good.items():
        make(root / name)
    for name, (make, _) in bad.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        make(root / name)
    return set(good), {k: v[1] for k, v in bad.items()}


def _orientation(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()


def _jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    _noise(200, 200).save(buf, "JPEG")
    return buf.getvalue()


def _rows(out: Path) -> tuple[list[dict], list[dict]]:
    def read(folder: str) -> list[dict]:
        path = out / folder
        return pq.read_table(path).to_pylist() if path.exists() and any(path.iterdir()) else []

    return read(schema.FEATURES_DIR), read(schema.ERRORS_DIR)


def test_every_file_is_exactly_one_feature_or_error_row(ray_session, tmp_path):
    src, out = tmp_path / "corpus", tmp_path / "out"
    good, bad = make_corpus(src)
    (src / ".DS_Store").write_bytes(b"\0")  # hidden: left out, and counted
    code = extract(str(src), str(out), "--shard-size", "5", "--max-pixels", "10000000")
    assert code == 0
    features, errors = _rows(out)
    assert sorted(r[schema.IMAGE_ID] for r in features) == sorted(good)
    by_name = {os.path.relpath(r[schema.PATH], src): r for r in errors}
    assert sorted(by_name) == sorted(bad)
    for name, words in bad.items():
        assert words in by_name[name][schema.ERROR].lower(), by_name[name]
        assert by_name[name][schema.STAGE] == "decode"
    rotated = next(r for r in features if r[schema.IMAGE_ID] == "rotated.jpg")
    assert (rotated[schema.WIDTH], rotated[schema.HEIGHT]) == (40, 80)  # EXIF orientation applied
    feats = schema.features_to_numpy(pq.read_table(out / schema.FEATURES_DIR)[schema.FEATURES])
    assert np.isfinite(feats.astype(np.float32)).all()
    manifest = json.loads((out / schema.MANIFEST_FILE).read_text())
    assert (manifest["rows"], manifest["errors"], manifest["images"]) == (len(good), len(bad), len(good) + len(bad))
    assert manifest["encoder_weights"] == "random" and manifest["skipped"] == 1


@pytest.mark.parametrize("decode", ["cpu", "device"])
def test_decode_tasks_feeding_actors_two_shards_at_a_time_give_each_file_once(ray_session, tmp_path, decode):
    """The GPU nodes' topology on CPUs: decode tasks in front of an actor that takes two shards at a time (its
    forward passes take turns) and writes them; every file is one row or one error row."""
    src, out = tmp_path / "corpus", tmp_path / "out"
    good, bad = make_corpus(src)
    job = mean_job(src, out, shard_size=3, decode=decode, decode_tasks=True, max_pixels=10_000_000)
    manifest = pipeline.run(job, progress=lambda _: None)
    assert manifest["resources"]["decode_tasks"] and manifest["resources"]["in_flight"] == 2
    rows, errors = _rows(out)
    assert sorted(r[schema.IMAGE_ID] for r in rows) == sorted(good)
    assert sorted(os.path.relpath(r[schema.PATH], src) for r in errors) == sorted(bad)
    assert (manifest["rows"], manifest["errors"]) == (len(good), len(bad))
    plain = next(r for r in rows if r[schema.IMAGE_ID] == "plain.jpg")
    assert plain[schema.WIDTH] == 320 and 100 < plain["mean"] < 155  # uniform noise averages ~127


@pytest.mark.slow
def test_max_errors_fails_fast_with_one_line(ray_session, tmp_path, capsys):
    src = tmp_path / "corpus"
    make_corpus(src)
    code = extract(
        str(src), str(tmp_path / "out"), "--shard-size", "20", "--max-errors", "0", "--max-pixels", "10000000"
    )
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "over --max-errors 0" in err[0]


def test_auto_shard_size_gives_each_actor_about_eight_shards():
    assert pipeline.auto_shard_size(1000, actors=2) == 63
    assert pipeline.auto_shard_size(10_000_000, actors=8) == 256  # large inputs: the largest shard
    assert pipeline.auto_shard_size(40, actors=2) == 32  # small inputs: shards worth scheduling
    assert pipeline.inflight_bytes(100, 2, 0) == 8 * 100 * 299 * 299 * 3  # decoded shards queued in the store
    assert pipeline.inflight_bytes(100, 2, 0, decode_tasks=False) == 2 * 100 * 299 * 299 * 3  # one per actor


@pytest.mark.slow
def test_rerun_resumes_only_unfinished_shards_exactly_once(ray_session, tiny_synth, tmp_path):
    out = tmp_path / "out"
    assert extract(tiny_synth / "images", out, "--shard-size", "8") == 0
    first = {r[schema.IMAGE_ID]: r[schema.FEATURES] for r in _rows(out)[0]}
    # Simulate a crash mid-run: one shard lost its marker, another never wrote anything.
    next((out / schema.SHARDS_DIR).glob("shard-000001.*.json")).unlink()
    next((out / schema.SHARDS_DIR).glob("shard-000003.*.json")).unlink()
    (out / schema.FEATURES_DIR / "shard-000003.parquet").unlink()
    (out / schema.MANIFEST_FILE).unlink()
    assert extract(tiny_synth / "images", out) == 0  # the stored plan decides the shards, not the default
    manifest = json.loads((out / schema.MANIFEST_FILE).read_text())
    assert manifest["shards_this_run"] == 2 and manifest["rows"] == 40 and manifest["shard_size"] == 8
    assert manifest["resources"]["inflight_bytes"] == pipeline.inflight_bytes(8, 2, 64 * 2048 * 2, decode_tasks=False)
    rows = _rows(out)[0]
    assert len(rows) == 40 and {r[schema.IMAGE_ID] for r in rows} == set(first)
    assert all(first[r[schema.IMAGE_ID]] == r[schema.FEATURES] for r in rows)  # same encoder, same features
    assert extract(tiny_synth / "images", out, "--shard-size", "8") == 0  # a finished output is left alone
    assert json.loads((out / schema.MANIFEST_FILE).read_text())["shards_this_run"] == 0


@pytest.mark.slow
def test_rerun_with_another_input_is_refused(ray_session, tiny_synth, tmp_path, capsys):
    out = tmp_path / "out"
    other = tmp_path / "other"
    shutil.copytree(tiny_synth / "images", other)
    assert extract(str(tiny_synth / "images"), str(out), "--shard-size", "40") == 0
    assert extract(str(other), str(out)) == 2
    assert "another input" in capsys.readouterr().err


@pytest.mark.slow
def test_s3_round_trip_through_moto_server(ray_session, tiny_synth, s3_server):
    import s3fs

    fs = s3fs.S3FileSystem(**s3_server)
    fs.mkdir("raycap-test")
    fs.put(str(tiny_synth / "images"), "raycap-test/in/images", recursive=True)
    options = json.dumps(s3_server)
    assert (
        extract_job.main(
            [
                "--input",
                "s3://raycap-test/in/images",
                "--output",
                "s3://raycap-test/out",
                "--encoder-weights",
                "random",
                "--shard-size",
                "16",
                "--storage-options",
                options,
            ]
        )
        == 0
    )
    files = sorted(fs.ls("raycap-test/out/features"))
    assert [f.rsplit("/", 1)[1] for f in files] == [f"shard-{i:06d}.parquet" for i in range(3)]
    table = pq.read_table(files, filesystem=fs)
    assert sorted(table[schema.IMAGE_ID].to_pylist()) == sorted(p.name for p in (tiny_synth / "images").iterdir())
    assert all(p.startswith("s3://raycap-test/in/images/") for p in table[schema.PATH].to_pylist())
    manifest = json.loads(fs.cat_file("raycap-test/out/_manifest.json"))
    assert manifest["rows"] == 40 and manifest["output"] == "s3://raycap-test/out"


@pytest.mark.slow
def test_killed_driver_then_rerun_is_exactly_once(ray_session, tiny_synth, tmp_path):
    """SIGKILL the whole driver (embedded Ray included) after its first finished shard, then rerun (through the
    job's entry point on the session's Ray: what a rerun finds is on disk, not in any process)."""
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "raycap.cli",
        "extract",
        "--input",
        str(tiny_synth / "images"),
        "--output",
        str(out),
        "--encoder-weights",
        "random",
        "--shard-size",
        "4",
    ]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + HANG_SECONDS
    while not markers.any_committed(LocalFileSystem(), str(out)):  # a marker, not the attempts/ folder
        assert proc.poll() is None and time.monotonic() < deadline, "the driver never finished a shard"
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=0.2)  # wakes when the driver exits, or to look for the first marker again
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / schema.MANIFEST_FILE).exists()
    assert extract(tiny_synth / "images", out, "--shard-size", "4") == 0
    manifest = json.loads((out / schema.MANIFEST_FILE).read_text())
    assert manifest["rows"] == 40 and manifest["shards_this_run"] < 10  # finished shards were not redone
    ids = [r[schema.IMAGE_ID] for r in _rows(out)[0]]
    assert len(ids) == len(set(ids)) == 40
