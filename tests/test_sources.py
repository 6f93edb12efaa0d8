"""Bulk stores read in place: WebDataset tars (written by webdataset's TarWriter), Parquet written by Hugging Face
datasets, an index of URIs across buckets; planned and read through the model stage without Ray."""

from __future__ import annotations

import io
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.memory import MemoryFileSystem
from PIL import Image

from raycap import markers, plan, schema, stages, storage
from raycap.sources import SourceSpec
from tests.helpers import MeanModel


def _jpeg(value: int, size: int = 24) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (value, value, value)).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def write_webdataset(root, cut: bool = True) -> dict[str, str]:
    """img2dataset's layout: NNNNN.tar of (KEY.jpg, KEY.txt, KEY.json) with NNNNN.parquet and NNNNN_stats.json
    beside it. Returns the expected outcome per image id: the caption of a good sample, or "error"."""
    import webdataset as wds

    os.makedirs(root, exist_ok=True)
    expected: dict[str, str] = {}

    def sample(key: str, text: str, image: bytes | None, ext: str = "jpg") -> dict:
        meta = {"url": f"http://example.com/{key}", "status": "success", "exif": {"w": 24}}
        s = {"__key__": key, "txt": text, "json": json.dumps(meta)}
        if image is not None:
            s[ext] = image
        return s

    with wds.TarWriter(str(root / "00000.tar")) as tar:
        for i in range(4):
            tar.write(sample(f"00000{i:04d}", f"a grey square number {i}", _jpeg(40 * i)))
            expected[f"00000.tar/00000{i:04d}"] = f"a grey square number {i}"
        tar.write(sample("000000004", "random bytes", os.urandom(300)))
        tar.write(sample("000000005", "empty", b""))
        tar.write(sample("000000006", "no image at all", None))
        tar.write(sample("000000007", "a png", _png(), ext="png"))
        expected["00000.tar/000000007"] = "a png"
        expected.update({f"00000.tar/00000000{i}": "error" for i in (4, 5, 6)})
    with wds.TarWriter(str(root / "00001.tar")) as tar:
        for i in range(3):
            tar.write(sample(f"00001{i:04d}", f"second tar {i}", _jpeg(30 + i)))
            expected[f"00001.tar/00001{i:04d}"] = f"second tar {i}"
    if cut:  # the last sample's image is cut in the middle of its bytes
        data = (root / "00001.tar").read_bytes()
        last = data.rindex(_jpeg(32)[:64])
        (root / "00001.tar").write_bytes(data[: last + 100])
        expected["00001.tar/000010002"] = "error"
    pq.write_table(pa.table({"key": ["000000000"]}), root / "00000.parquet")
    (root / "00000_stats.json").write_text("{}")
    return expected


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (10, 12), (1, 2, 3)).save(buf, "PNG")
    return buf.getvalue()


def run_stage(inp: str, out: str, spec: SourceSpec, options: dict | None = None, piece: int = 256, **prepare) -> tuple:
    """Plan `inp` and run every shard through a model stage (no Ray); returns (rows, errors, plan, said)."""
    in_fs, in_root = storage.filesystem(inp, options)
    out_fs, out_root = storage.filesystem(out, options)
    said: list[str] = []
    made = plan.prepare(in_fs, in_root, out_fs, out_root, prepare.pop("shard_size", None), 1, say=said.append,
                        source=spec, **prepare)  # fmt: skip
    io_ = stages.ShardIO(inp, out, schema.FEATURES_DIR, options or {}, source=made.spec, piece=piece)
    model = MeanModel(io_, batch_size=4)
    items = plan.pending_parts(made, markers.finished_shards(out_fs, out_root))
    for shard_row in plan.expand_parts(pa.Table.from_pylist(items), out, options or {}):
        model(shard_row)
    rows = _read_dir(out_fs, storage.join(out_root, schema.FEATURES_DIR))
    errors = _read_dir(out_fs, storage.join(out_root, schema.ERRORS_DIR))
    return rows, errors, made, said


def _read_dir(fs, path) -> list[dict]:
    if not fs.exists(path):
        return []
    return [r for f in sorted(fs.ls(path, detail=False)) for r in pq.read_table(f, filesystem=fs).to_pylist()]


def test_webdataset_store_every_sample_once_bad_ones_named_and_a_cut_tar_keeps_what_came_before(tmp_path):
    root = tmp_path / "laion"
    expected = write_webdataset(root)
    spec = SourceSpec("auto", keep_columns=("txt", "url", "exif"))
    rows, errors, made, said = run_stage(str(root), str(tmp_path / "out"), spec, piece=2)
    assert made.spec.format == "webdataset" and made.shards == 2 and made.images is None
    assert said[0].endswith("webdataset input (auto: 2 .tar files; --input-format to choose)")
    assert any("2 names not planned (2 not a .tar" in line for line in said), said  # img2dataset's files beside
    good = {k: v for k, v in expected.items() if v != "error"}
    assert {r[schema.IMAGE_ID]: r["txt"] for r in rows} == good  # once each, with its own text
    assert len(rows) == len(good)
    first = next(r for r in rows if r[schema.IMAGE_ID] == "00000.tar/000000001")
    assert first["key"] == "000000001" and first["url"] == "http://example.com/000000001"
    assert first["exif"] == '{"w": 24}'  # a JSON field that is not text, as its JSON
    named = {e[schema.PATH]: e for e in errors}
    assert sorted(named) == sorted(f"{root}/{k.replace('/', '#')}" for k, v in expected.items() if v == "error")
    assert named[f"{root}/00000.tar#000000006"]["error"].startswith("no image: the sample has no an image member")
    assert named[f"{root}/00000.tar#000000004"][schema.STAGE] == "decode"
    assert "tar cut short" in named[f"{root}/00001.tar#000010002"]["error"]
    # Streamed a piece (2 images) at a time: the first tar's rows file holds several row groups.
    assert pq.ParquetFile(tmp_path / "out" / schema.FEATURES_DIR / "shard-000000.parquet").num_row_groups == 3


def test_a_parquet_store_written_by_hugging_face_datasets(tmp_path):
    import datasets

    root = tmp_path / "hf"
    root.mkdir()
    images = [Image.new("RGB", (20 + i, 16), (10 * i, 0, 0)) for i in range(5)]
    cells = [*images, {"bytes": os.urandom(200), "path": None}, None]
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    ds = datasets.Dataset.from_dict({"image": cells, "caption": [f"c{i}" for i in range(7)]}, features=features)
    ds.to_parquet(str(root / "train-00000-of-00001.parquet"))
    (root / "broken.parquet").write_bytes(b"PAR1 this is not a parquet file")
    rows, errors, made, said = run_stage(str(root), str(tmp_path / "out"), SourceSpec(keep_columns=("caption",)))
    assert made.spec.format == "parquet" and made.shards == 2
    assert sorted((r[schema.IMAGE_ID], r["caption"], r["row"]) for r in rows) == [
        (f"train-00000-of-00001.parquet/{i}", f"c{i}", i) for i in range(5)
    ]
    assert [r[schema.WIDTH] for r in sorted(rows, key=lambda r: r["row"])] == [20, 21, 22, 23, 24]
    named = {e[schema.PATH]: e for e in errors}
    assert sorted(named) == [f"{root}/broken.parquet", f"{root}/train-00000-of-00001.parquet#5",
                             f"{root}/train-00000-of-00001.parquet#6"]  # fmt: skip
    assert named[f"{root}/broken.parquet"]["error"].startswith("not a readable Parquet image file")
    assert named[f"{root}/train-00000-of-00001.parquet#6"]["error"].startswith("no image bytes")
    # An id column instead of FILE/ROW.
    rows, _, _, _ = run_stage(str(root), str(tmp_path / "out2"), SourceSpec("parquet", id_column="caption"))
    assert sorted(r[schema.IMAGE_ID] for r in rows) == [f"c{i}" for i in range(5)]


def test_an_index_of_uris_across_two_buckets_with_a_missing_one(s3_server, tmp_path):
    import s3fs

    fs = s3fs.S3FileSystem(**s3_server)
    for bucket in ("index-a", "index-b"):
        fs.mkdir(bucket)
    fs.pipe_file("index-a/x/one.jpg", _jpeg(10))
    fs.pipe_file("index-b/two [1].jpg", _jpeg(20))
    index = "path,label\ns3://index-a/x/one.jpg,first\ns3://index-b/two [1].jpg,second\ns3://index-a/gone.jpg,third\n"
    fs.pipe_file("index-a/index.csv", index.encode())
    spec = SourceSpec(keep_columns=("label",))
    rows, errors, made, said = run_stage("s3://index-a/index.csv", "s3://index-b/out", spec, s3_server)
    assert made.spec.format == "list" and made.files == 3
    assert sorted((r[schema.IMAGE_ID], r["label"]) for r in rows) == [
        ("s3://index-a/x/one.jpg", "first"),
        ("s3://index-b/two [1].jpg", "second"),
    ]
    assert [(e[schema.PATH], e[schema.STAGE], e["error"]) for e in errors] == [
        ("s3://index-a/gone.jpg", "read", "missing")
    ]


class RecordingFS(MemoryFileSystem):
    """An in-memory store that records every file opened."""

    opened: list[str] = []

    def _open(self, path, *args, **kwargs):
        RecordingFS.opened.append(path)
        return super()._open(path, *args, **kwargs)


def test_planning_ten_thousand_tars_opens_none_of_them(tmp_path):
    fs = RecordingFS()
    for i in range(10_000):
        fs.pipe_file(f"/store/{i // 1000:02d}/{i:05d}.tar", b"")
    RecordingFS.opened.clear()
    out_fs, out_root = storage.filesystem(str(tmp_path / "out"))
    made = plan.prepare(fs, "/store", out_fs, out_root, None, 4, say=lambda _: None, source=SourceSpec("webdataset"))
    assert made.shards == 10_000 and made.files == 10_000
    assert RecordingFS.opened == []


def test_a_mixed_folder_or_a_shard_size_for_tars_is_one_line(tmp_path):
    root = tmp_path / "mixed"
    write_webdataset(root, cut=False)
    (root / "loose.jpg").write_bytes(_jpeg(1))
    out_fs, out_root = storage.filesystem(str(tmp_path / "out"))
    in_fs, in_root = storage.filesystem(str(root))
    with pytest.raises(ValueError, match="holds both loose images and .tar/.parquet files; pass --input-format"):
        plan.prepare(in_fs, in_root, out_fs, out_root, None, 1, say=print, source=SourceSpec())
    with pytest.raises(ValueError, match="--shard-size applies to files and list inputs"):
        plan.prepare(in_fs, in_root, out_fs, out_root, 8, 1, say=print, source=SourceSpec("webdataset"))
    # As files, every file is an input: the tars become error rows, never silently dropped.
    rows, errors, made, _ = run_stage(str(root), str(tmp_path / "files"), SourceSpec("files"))
    assert len(rows) == 1 and len(errors) == 4 and made.files == 5


def test_webdataset_member_names_follow_the_convention():
    from raycap.sources.webdataset import split_name

    assert split_name("000010005.jpg") == ("000010005", "jpg")
    assert split_name("dir/a.b.seg.png") == ("dir/a", "b.seg.png")
    assert split_name("000010005.JSON") == ("000010005", "json")
    assert split_name("README") == ("README", "")


def _random_model(path) -> str:
    """A model directory with untrained weights: caption needs one, not a good one."""
    import torch

    from raycap.model import Captioner, ModelConfig
    from raycap.modeldir import write_model_dir
    from raycap.text import Vocabulary

    vocab = Vocabulary.build(["a grey square", "second tar"])
    torch.manual_seed(0)
    model = Captioner(ModelConfig(vocab_size=len(vocab))).eval()
    write_model_dir(str(path), model, vocab, {"encoder_weights": "random", "feature_dtype": "float16"})
    return str(path)


def test_extract_and_caption_read_a_webdataset_store_and_carry_its_text(ray_session, tmp_path):
    from jobs import caption as caption_job
    from tests.helpers import extract

    root = tmp_path / "laion"
    expected = write_webdataset(root)
    good = {k: v for k, v in expected.items() if v != "error"}
    assert extract(root, tmp_path / "features", "--keep-columns", "txt,url") == 0
    rows = pq.read_table(tmp_path / "features" / schema.FEATURES_DIR).to_pylist()
    assert {r[schema.IMAGE_ID]: r["txt"] for r in rows} == good and len(rows) == len(good)
    assert all(r["url"].endswith(r["key"]) for r in rows)
    errors = pq.read_table(tmp_path / "features" / schema.ERRORS_DIR)
    assert errors.num_rows == len(expected) - len(good)
    manifest = json.loads((tmp_path / "features" / schema.MANIFEST_FILE).read_text())
    assert (manifest["input_format"], manifest["images"], manifest["units"]) == ("webdataset", len(expected), 2)
    # A rerun over the same output resumes: nothing redone, nothing doubled.
    assert extract(root, tmp_path / "features", "--keep-columns", "txt,url") == 0
    assert pq.read_table(tmp_path / "features" / schema.FEATURES_DIR).num_rows == len(good)
    args = ["--input", str(root), "--output", str(tmp_path / "captions"), "--model", _random_model(tmp_path / "m")]
    assert caption_job.main([*args, "--keep-columns", "txt", "--max-length", "3", "--beam-size", "1"]) == 0
    captions = pq.read_table(tmp_path / "captions" / schema.CAPTIONS_DIR).to_pylist()
    assert {r[schema.IMAGE_ID]: r["txt"] for r in captions} == good
    assert all(r[schema.PATH] == f"{root}/{r[schema.IMAGE_ID].replace('/', '#')}" for r in captions)


def test_extract_reads_a_hugging_face_parquet_store(ray_session, tmp_path):
    import datasets

    from tests.helpers import extract

    root = tmp_path / "hf"
    root.mkdir()
    cells = [Image.new("RGB", (30, 20), (i, i, i)) for i in range(0, 250, 50)] + [{"bytes": b"junk", "path": None}]
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    table = {"image": cells, "text": [f"t{i}" for i in range(6)]}
    datasets.Dataset.from_dict(table, features=features).to_parquet(str(root / "data.parquet"))
    assert extract(root, tmp_path / "out", "--input-format", "parquet", "--keep-columns", "text") == 0
    rows = pq.read_table(tmp_path / "out" / schema.FEATURES_DIR).to_pylist()
    assert sorted((r[schema.IMAGE_ID], r["text"]) for r in rows) == [(f"data.parquet/{i}", f"t{i}") for i in range(5)]
    assert pq.read_table(tmp_path / "out" / schema.ERRORS_DIR)[schema.PATH].to_pylist() == [f"{root}/data.parquet#5"]


@pytest.mark.slow
def test_tars_on_s3_after_a_killed_driver_are_read_exactly_once(ray_session, s3_server, tmp_path):
    """SIGKILL the whole driver (embedded Ray included) after its first committed tar, then rerun: on S3 (the rerun
    through the job's entry point on the session's Ray)."""
    import contextlib
    import shutil
    import signal
    import subprocess
    import sys
    import time

    import s3fs

    from tests.helpers import HANG_SECONDS, extract

    root = tmp_path / "laion"
    expected = write_webdataset(root)
    for copy in ("00002.tar", "00003.tar"):
        shutil.copy(root / "00000.tar", root / copy)
        expected |= {k.replace("00000.tar", copy): v for k, v in expected.items() if k.startswith("00000.tar/")}
    fs = s3fs.S3FileSystem(**s3_server)
    fs.mkdir("wds-killed")
    fs.put(str(root), "wds-killed/in", recursive=True)
    env = {**os.environ, "RAYCAP_VERBOSE": ""}
    cmd = [sys.executable, "-m", "raycap.cli", "extract", "--input", "s3://wds-killed/in", "--output",
           "s3://wds-killed/out", "--encoder-weights", "random", "--actors", "1", "--keep-columns", "txt",
           "--storage-options", json.dumps(s3_server)]  # fmt: skip
    proc = subprocess.Popen(cmd, start_new_session=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + HANG_SECONDS

    while not markers.any_committed(fs, "wds-killed/out"):  # a marker, not the attempts/ folder
        assert proc.poll() is None and time.monotonic() < deadline, "the driver never committed a tar"
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=0.2)  # wakes when the driver exits, or to look for the first marker again
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not fs.exists("wds-killed/out/_manifest.json")
    assert extract(cmd[5], cmd[7], *cmd[10:]) == 0  # the same arguments
    manifest = json.loads(fs.cat_file("wds-killed/out/_manifest.json"))
    assert manifest["shards_this_run"] < 4 and manifest["images"] == len(expected)
    rows = pq.read_table("wds-killed/out/features", filesystem=fs).to_pylist()
    good = {k: v for k, v in expected.items() if v != "error"}
    assert {r[schema.IMAGE_ID]: r["txt"] for r in rows} == good and len(rows) == len(good)
    assert pq.read_table("wds-killed/out/errors", filesystem=fs).num_rows == len(expected) - len(good)


def test_tars_and_parquet_files_on_s3_and_an_incremental_rerun_plans_only_new_tars(s3_server, tmp_path):
    import shutil

    import datasets
    import s3fs

    root = tmp_path / "laion"
    expected = write_webdataset(root)
    hf = tmp_path / "hf"
    hf.mkdir()
    features = datasets.Features({"image": datasets.Image()})
    datasets.Dataset.from_dict({"image": [Image.new("RGB", (9, 9))] * 3}, features=features).to_parquet(
        str(hf / "a.parquet")
    )
    fs = s3fs.S3FileSystem(**s3_server)
    fs.mkdir("stores")
    fs.put(str(root), "stores/laion", recursive=True)
    fs.put(str(hf), "stores/hf", recursive=True)
    rows, errors, made, _ = run_stage("s3://stores/laion", "s3://stores/out", SourceSpec(), s3_server, piece=3)
    assert made.spec.format == "webdataset" and len(rows) + len(errors) == len(expected)
    assert {r[schema.IMAGE_ID] for r in rows} == {k for k, v in expected.items() if v != "error"}
    assert all(e[schema.PATH].startswith("s3://stores/laion/0000") for e in errors)
    rows, errors, made, _ = run_stage("s3://stores/hf", "s3://stores/hf-out", SourceSpec(), s3_server)
    assert made.spec.format == "parquet" and sorted(r["row"] for r in rows) == [0, 1, 2] and not errors
    # A tar added later is a new shard; the finished ones are not redone.
    shutil.copy(root / "00000.tar", root / "00002.tar")
    fs.put(str(root / "00002.tar"), "stores/laion/00002.tar")
    rows, errors, made, said = run_stage(
        "s3://stores/laion", "s3://stores/out", SourceSpec(), s3_server, incremental=True
    )
    assert made.shards == 3 and any("1 new files planned in 1 new shards" in line for line in said), said
    assert len(rows) == len([k for k, v in expected.items() if v != "error"]) + 5
