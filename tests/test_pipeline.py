"""The pipeline's stages and wire format on plain Arrow tables, without Ray: read, decode, model, write."""

from __future__ import annotations

import dataclasses
import io
import json
from unittest.mock import ANY

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from raycap import markers, pipeline, schema, shards, stages
from tests.helpers import MeanModel


def _jpeg(width: int, height: int, value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (value, value, value)).save(buf, "JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    (root / "a.jpg").write_bytes(_jpeg(64, 48, 200))
    (root / "b.jpg").write_bytes(_jpeg(30, 40, 10))
    png = io.BytesIO()
    Image.new("RGBA", (20, 20), (0, 0, 0, 0)).save(png, "PNG")  # transparent: white after compositing
    (root / "c.png").write_bytes(png.getvalue())
    (root / "bad.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (root / "notes.txt").write_bytes(b"hello")
    return root


UNITS = [["a.jpg", "bad.jpg", "c.png"], ["b.jpg", "gone.jpg"], ["notes.txt"]]
PLAN = pa.table({"shard": [0, 1, 2], "units": UNITS, "fields": [[None] * len(u) for u in UNITS]})


@pytest.fixture
def keep_torch_threads():
    """A model stage sets torch's thread count for its process: here, the test process's, put back after."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _io(folder, out, max_pixels: int = 10_000) -> stages.ShardIO:
    return stages.ShardIO(str(folder), str(out), "rows", {}, max_pixels)


@pytest.mark.parametrize("decode", ["cpu", "device"])
@pytest.mark.parametrize("decode_tasks", [False, True], ids=["actor-reads", "decode-tasks"])
def test_read_decode_model_write_gives_each_file_one_row_or_error_and_a_marker(
    folder, tmp_path, decode, decode_tasks, keep_torch_threads
):
    io = _io(folder, tmp_path)
    model = MeanModel(io, batch_size=2, threads=2, decode=decode)
    written = model(stages.decode_shards(PLAN, io, decode) if decode_tasks else PLAN).to_pylist()
    assert [(m["shard"], m["rows"], m["errors"]) for m in written] == [(0, 2, 1), (1, 1, 1), (2, 0, 1)]
    rows = pq.read_table(tmp_path / "rows" / "shard-000000.parquet").to_pydict()
    assert rows[schema.IMAGE_ID] == ["a.jpg", "c.png"]
    assert rows[schema.WIDTH] == [64, 20]
    assert rows["mean"][0] == pytest.approx(200, abs=2) and rows["mean"][1] == 255  # PNG alpha over white
    assert not (tmp_path / "rows" / "shard-000002.parquet").exists()  # no image decoded: no rows file
    errors = pq.read_table(tmp_path / schema.ERRORS_DIR / "shard-000001.parquet").to_pylist()
    assert errors[0]["stage"] == "read" and errors[0]["path"].endswith("gone.jpg")
    errors = pq.read_table(tmp_path / schema.ERRORS_DIR / "shard-000002.parquet").to_pylist()
    assert errors[0]["stage"] == "decode" and "not an image" in errors[0]["error"]
    marker = json.loads((tmp_path / schema.SHARDS_DIR / markers.marker_name(0, rows=2, errors=1)).read_text())
    assert marker["rows"] == 2 and marker["errors"] == 1 and marker["bytes"] > 0


def test_a_redone_shard_leaves_no_file_of_an_earlier_attempt(tmp_path):
    """An image read on the first attempt and failing on the redo is an error only: the old rows file goes."""
    io = _io(tmp_path / "in", tmp_path / "out")
    rows = pa.table({schema.IMAGE_ID: ["a.jpg"]})
    failed = shards.error_table([str(tmp_path / "in" / "a.jpg")], ["read"], ["TimeoutError: S3 did not answer"])
    stages.write_shard(io, 4, rows, shards.EMPTY_ERRORS)
    marker = stages.write_shard(io, 4, None, failed)
    assert marker["rows"] == 0 and marker["errors"] == 1
    assert not (tmp_path / "out" / "rows" / "shard-000004.parquet").exists()
    assert pq.read_table(tmp_path / "out" / schema.ERRORS_DIR / "shard-000004.parquet").num_rows == 1
    stages.write_shard(io, 4, rows, shards.EMPTY_ERRORS)  # and the other way round
    assert not (tmp_path / "out" / schema.ERRORS_DIR / "shard-000004.parquet").exists()


def test_bomb_guard_applies_before_decoding(folder, tmp_path):
    batch = pa.table({"shard": [0], "units": [["a.jpg", "b.jpg"]], "fields": [[None, None]]})
    (shard,) = shards.unpack(stages.decode_shards(batch, _io(folder, tmp_path, max_pixels=1_500)))
    assert shard.meta[schema.IMAGE_ID].to_pylist() == ["b.jpg"]  # 30 x 40 = 1,200 pixels; a.jpg has 3,072
    assert "decompression bomb" in shard.errors["error"][0].as_py()


def test_pack_wraps_pixels_without_copying_and_marks_missing_parts():
    pixels = np.random.default_rng(0).integers(0, 256, (3, *shards.PIXEL_SHAPE), dtype=np.uint8)
    meta = pa.table(
        {schema.IMAGE_ID: ["x", "y", "z"], schema.PATH: ["p"] * 3, schema.WIDTH: [1, 2, 3], schema.HEIGHT: [4, 5, 6]},
        schema=shards.META_SCHEMA,
    )
    packed = shards.pack([shards.Shard(7, meta, pixels=pixels), shards.Shard(8, meta.slice(0, 0))])
    first, empty = shards.unpack(packed)
    assert first.shard == 7 and first.meta.equals(meta) and len(first.errors) == 0
    np.testing.assert_array_equal(first.pixels, pixels)
    assert empty.pixels is None and len(empty.meta) == 0
    (alone,) = shards.unpack(shards.pack([shards.Shard(7, meta, pixels=pixels)]))
    assert np.shares_memory(alone.pixels, pixels)  # one shard per row: its pixels are never copied


def test_job_takes_the_shared_settings_from_its_config():
    from raycap.config import ExtractConfig

    config = ExtractConfig(
        input="in",
        output="out",
        shard_size=9,
        batch_size=3,
        decode="device",
        actors=(1, 2),
        max_errors=4,
        max_pixels=99,
        storage_options={"anon": True},
    )
    job = pipeline.ShardJob.from_config(config, rows_dir="rows", model_cls=MeanModel, model_kwargs={})
    assert (
        job.input,
        job.output,
        job.shard_size,
        job.batch_size,
        job.decode,
        job.actors,
        job.max_errors,
        job.max_pixels,
        job.storage_options,
    ) == ("in", "out", 9, 3, "device", (1, 2), 4, 99, {"anon": True})


def test_real_model_stages_take_the_wire_format_with_cpu_or_device_decoding(folder, tmp_path):
    """extract's FeatureModel and caption's CaptionModel, built as the pipeline builds them (no Ray)."""
    import torch

    from raycap.caption import CaptionModel
    from raycap.extract import FeatureModel
    from raycap.model import Captioner, ModelConfig
    from raycap.modeldir import write_model_dir
    from raycap.text import Vocabulary

    vocab = Vocabulary.build(["a red circle", "a blue square"])
    torch.manual_seed(0)
    write_model_dir(str(tmp_path / "model"), Captioner(ModelConfig(vocab_size=len(vocab))).eval(), vocab,
                    {"encoder_weights": "random", "feature_dtype": "float16"})  # fmt: skip
    io = _io(folder, tmp_path / "out")
    stage = {"io": io, "batch_size": 2, "threads": None}
    features = FeatureModel(weights="random", precision="fp32", feature_dtype="float16", **stage)
    captions = CaptionModel(model=str(tmp_path / "model"), weights="random", beam_size=2, max_length=4,
                            length_penalty=1.0, precision="fp32", **stage)  # fmt: skip
    captions.extractor = features.extractor  # the same random encoder: build InceptionV3 once
    batch = PLAN.slice(0, 1)  # a.jpg, bad.jpg, c.png
    for decode in ("cpu", "device"):
        decoded = stages.decode_shards(batch, io, decode=decode)
        for model, rows_dir in ((features, schema.FEATURES_DIR), (captions, schema.CAPTIONS_DIR)):
            # A job per output root (a committed shard is never redone there).
            model.io = dataclasses.replace(io, rows_dir=rows_dir, output=str(tmp_path / decode / rows_dir))
            assert model(decoded).to_pylist() == [{"shard": 0, "rows": 2, "errors": 1, "bytes": ANY}]
        rows = pq.read_table(tmp_path / decode / schema.FEATURES_DIR / schema.FEATURES_DIR / "shard-000000.parquet")
        assert rows[schema.IMAGE_ID].to_pylist() == ["a.jpg", "c.png"]
        assert schema.features_to_numpy(rows[schema.FEATURES]).shape == (2, 64, 2048)
        rows = pq.read_table(tmp_path / decode / schema.CAPTIONS_DIR / schema.CAPTIONS_DIR / "shard-000000.parquet")
        assert rows.schema.equals(schema.CAPTIONS_SCHEMA) and rows.num_rows == 2


@pytest.mark.parametrize(
    ("gpus", "decode", "expected"),
    [
        (1, "auto", ("device", False, 2)),  # the GPU actor reads its own shard's bytes and decodes them there
        (1, "device", ("device", False, 2)),
        (1, "cpu", ("cpu", True, 2)),  # Pillow's pixels come from CPU tasks, so the GPU never waits for them
        (0, "auto", ("cpu", False, 1)),  # CPU actors read and decode their own shards
        (0, "device", ("device", False, 1)),
    ],
)
def test_only_pillow_decoding_puts_cpu_tasks_in_front_of_gpu_actors(gpus, decode, expected):
    job = pipeline.ShardJob("in", "out", schema.FEATURES_DIR, MeanModel, {}, decode=decode)
    settled = pipeline.settle_resources(job, {"num_gpus": gpus})
    assert (settled["decode"], settled["decode_tasks"], settled["in_flight"]) == expected
    assert settled["batch_size"] == (pipeline.GPU_BATCH if gpus else pipeline.CPU_BATCH)


ODD_NAMES = ["photo [1].jpg", "photo 1.jpg", "a*b.jpg", "ab.jpg", "q?.png", "q1.png", "été 100%.jpg", "#1+2.jpg"]


def _read_files(io: stages.ShardIO, names: list[str]) -> shards.Shard:
    """One shard of loose files read as the model stage reads it (bytes, not decoded): a single piece."""
    (piece,) = stages.read_shard(io, 0, [{"unit": n, "fields": None} for n in names], decode=False)
    return piece


@pytest.mark.parametrize("where", ["local", "s3"])
def test_every_file_name_is_read_literally_never_as_a_pattern(where, tmp_path, request):
    """fsspec's cat expands [, * and ? as glob patterns: `photo [1].jpg` read as missing, `a*b.jpg` matched
    `ab.jpg` too. Each file must come back with its own bytes."""
    import s3fs

    files = {name: _jpeg(8 + i, 8, 10 * i) for i, name in enumerate(ODD_NAMES)}
    if where == "local":
        root = str(tmp_path)
        for name, data in files.items():
            (tmp_path / name).write_bytes(data)
        options = {}
    else:
        options = request.getfixturevalue("s3_server")
        fs = s3fs.S3FileSystem(**options)
        fs.mkdir("odd-names")
        for name, data in files.items():
            fs.pipe_file(f"odd-names/{name}", data)
        root = "s3://odd-names"
    io = stages.ShardIO(root, str(tmp_path / "out"), "rows", options, 10_000)
    shard = _read_files(io, ODD_NAMES)
    assert shard.errors.num_rows == 0, shard.errors.to_pylist()
    assert shard.meta[schema.IMAGE_ID].to_pylist() == ODD_NAMES
    assert shard.meta[shards.DATA].to_pylist() == [files[n] for n in ODD_NAMES]


def test_a_killed_write_leaves_nothing_that_readers_of_the_folder_see(tmp_path, monkeypatch):
    """A write killed between its temporary file and the rename (here: a SystemExit in fsync, as a kill would
    leave it) leaves a hidden temporary: pyarrow's and pandas' readers of the folder see only complete files."""
    import os

    import pandas as pd

    from raycap import storage

    fs, root = storage.filesystem(str(tmp_path / "features"))
    table = pa.table({"image_id": ["a.jpg", "b.jpg"], "x": [1, 2]})
    storage.write_parquet_atomic(fs, storage.join(root, "shard-000000.parquet"), table, "none")
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(SystemExit("killed")))
    with pytest.raises(SystemExit):
        storage.write_parquet_atomic(fs, storage.join(root, "shard-000001.parquet"), table, "none")
    monkeypatch.undo()
    left = sorted(os.listdir(tmp_path / "features"))
    assert len(left) == 2 and left[0].startswith(".shard-000001.parquet.") and left[0].endswith(".tmp"), left
    assert pq.read_table(tmp_path / "features").num_rows == 2
    assert len(pd.read_parquet(tmp_path / "features")) == 2
    (tmp_path / "features" / ".notes.txt").write_text("a user's hidden file")
    assert storage.remove_stale_temporaries(fs, str(tmp_path)) == 1  # as a rerun does before it writes
    assert sorted(os.listdir(tmp_path / "features")) == [".notes.txt", "shard-000000.parquet"]


class _FlakyStore:
    """An object store whose GETs fail `failures` times per object first (403 ExpiredToken, as s3fs raises it)."""

    def __init__(self, objects: dict[str, bytes], failures: int) -> None:
        self.objects, self.failures, self.calls = objects, failures, {}

    def unstrip_protocol(self, path: str) -> str:
        return f"s3://{path}"

    def cat_file(self, path: str) -> bytes:
        self.calls[path] = self.calls.get(path, 0) + 1
        if self.calls[path] <= self.failures:
            raise PermissionError("An error occurred (ExpiredToken) when calling the GetObject operation")
        if path not in self.objects:
            raise FileNotFoundError(path)
        return self.objects[path]


def test_a_transient_store_failure_is_retried_and_never_recorded_as_data(monkeypatch):
    from raycap import cli, storage

    monkeypatch.setattr(storage, "READ_BACKOFF_S", 0.0)  # the waits, not their length, are under test
    objects = {f"bucket/{i}.jpg": bytes([i]) * 4 for i in range(20)}
    flaky = _FlakyStore(objects, failures=storage.READ_ATTEMPTS - 1)
    got = storage.read_objects(flaky, [*objects, "bucket/gone.jpg"])
    assert got == [*objects.values(), None]  # every object after its retries; a missing one is missing at once
    assert flaky.calls["bucket/gone.jpg"] == storage.READ_ATTEMPTS  # 403s first, then the 404
    expired = _FlakyStore(objects, failures=10**6)
    with pytest.raises(storage.StoreUnavailable) as raised:
        storage.read_objects(expired, list(objects))
    assert max(expired.calls.values()) == storage.READ_ATTEMPTS
    message = cli._user_error(raised.value)
    assert message.startswith("cannot read s3://bucket/") and "ExpiredToken" in message and "rerun" in message


def test_a_local_file_that_cannot_be_read_is_its_own_error_row(tmp_path):
    import os

    (tmp_path / "ok.jpg").write_bytes(_jpeg(8, 8, 1))
    (tmp_path / "locked.jpg").write_bytes(_jpeg(8, 8, 2))
    os.chmod(tmp_path / "locked.jpg", 0)
    try:
        if os.access(tmp_path / "locked.jpg", os.R_OK):  # root reads anything: a folder cannot be read as a file
            os.chmod(tmp_path / "locked.jpg", 0o644)
            (tmp_path / "locked.jpg").unlink()
            (tmp_path / "locked.jpg").mkdir()
        io = stages.ShardIO(str(tmp_path), str(tmp_path / "out"), "rows", {}, 10_000)
        shard = _read_files(io, ["ok.jpg", "locked.jpg", "gone.jpg"])
    finally:
        os.chmod(tmp_path / "locked.jpg", 0o755)
    assert shard.meta[schema.IMAGE_ID].to_pylist() == ["ok.jpg"]
    reasons = {e["path"].rpartition("/")[2]: e["error"] for e in shard.errors.to_pylist()}
    assert reasons["gone.jpg"] == "missing" and reasons["locked.jpg"].split(":")[0] in (
        "PermissionError", "IsADirectoryError"
    ), reasons  # fmt: skip
