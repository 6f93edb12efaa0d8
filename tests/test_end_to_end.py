"""synth -> extract -> train -> caption -> evaluate through the real entry points, on one local Ray."""

from __future__ import annotations

import json

import pyarrow.parquet as pq

from jobs import caption as caption_job
from jobs import extract as extract_job
from jobs import train as train_job
from raycap import cli, schema
from tests.helpers import extract


def test_pipeline_end_to_end(ray_session, tiny_synth, tiny_features, tmp_path):
    data, features = tiny_synth, tiny_features  # extracted through jobs/extract.py with --shard-size 16
    model, out = tmp_path / "model", tmp_path / "captions"
    manifest = json.loads((features / schema.MANIFEST_FILE).read_text())
    assert manifest["rows"] == 40 and manifest["errors"] == 0 and manifest["shards"] == 3
    table = pq.read_table(features / schema.FEATURES_DIR)
    assert sorted(table[schema.IMAGE_ID].to_pylist()) == sorted(p.name for p in (data / "images").iterdir())
    feats = schema.features_to_numpy(table[schema.FEATURES])
    assert feats.shape == (40, 64, 2048) and feats.dtype.name == "float16"

    assert (
        train_job.main(
            [
                "--features",
                str(features),
                "--captions",
                str(data / "captions.json"),
                "--split-file",
                str(data / "splits.json"),
                "--output",
                str(model),
                "--epochs",
                "2",
                "--workers",
                "2",
                "--batch-size",
                "8",
            ]
        )
        == 0
    )
    assert {"model.safetensors", "vocab.json", "config.json", "metrics.jsonl"} <= {p.name for p in model.iterdir()}
    history = [json.loads(line) for line in (model / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in history] == [0, 1]
    assert history[1]["train_loss"] < history[0]["train_loss"]
    assert {"val_loss", "val_bleu4", "val_cider", "samples_per_second"} <= set(history[-1])

    assert (
        caption_job.main(
            [
                "--input",
                str(data / "images"),
                "--output",
                str(out),
                "--model",
                str(model),
                "--beam-size",
                "2",
                "--max-length",
                "12",
            ]
        )
        == 0
    )
    captions = pq.read_table(out / schema.CAPTIONS_DIR).to_pylist()
    assert len(captions) == 40
    for row in captions:
        assert row[schema.CAPTION] == " ".join(row[schema.TOKENS])
        assert len(row[schema.ATTENTION]) == len(row[schema.TOKENS]) <= 12
        assert all(abs(sum(a) - 1) < 0.02 for a in row[schema.ATTENTION])
        assert row[schema.SCORE] <= 0

    metrics_path = tmp_path / "metrics.json"
    assert (
        cli.main(
            [
                "evaluate",
                "--predictions",
                str(out),
                "--references",
                str(data / "captions.json"),
                "--objects",
                str(data / "objects.json"),
                "--output",
                str(metrics_path),
            ]
        )
        == 0
    )
    metrics = json.loads(metrics_path.read_text())
    assert metrics["images"] == 40 and 0 <= metrics["object_accuracy"] <= 1 and "CIDEr" in metrics


def test_user_mistakes_are_one_line_errors(ray_session, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert extract(str(empty), str(tmp_path / "o")) == 2
    assert extract_job.main(["--input", str(tmp_path / "missing"), "--output", str(tmp_path / "o")]) == 2
    assert caption_job.main(["--input", str(empty), "--output", str(tmp_path / "c"), "--model", str(empty)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3
    assert "no files under" in err[0]
    assert "input does not exist" in err[1] or "encoder-weights" in err[1]
    assert "not a raycap model directory" in err[2]
