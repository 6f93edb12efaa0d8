"""Tests of evaluation: predictions, caption metrics, object parsing, cells and attention grounding."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from raycap.evaluate import evaluate
from raycap.predictions import attention_matrices, load_predictions
from raycap.shapes_eval import grounding_ratio, object_cells, parse_objects
from tests.helpers import write_predictions, write_references

CAPTIONS = {
    "img/0.png": ["a red circle on the left and a blue square on the top", "there is a red circle left"],
    "img/1.png": ["a green triangle on the right and a yellow circle on the bottom", "two shapes"],
    "img/2.png": ["a blue square on the bottom and a red triangle on the top", "a square and a triangle"],
    "img/3.png": ["a yellow circle on the top and a green square on the left", "a yellow circle and more"],
}


def perfect(captions: dict[str, list[str]] = CAPTIONS) -> list[dict[str, Any]]:
    return [{"image_id": name, "caption": caps[0]} for name, caps in captions.items()]


@pytest.fixture
def refs(tmp_path: Path) -> Path:
    return write_references(tmp_path / "refs.json", CAPTIONS)


def test_perfect_captions_score_high_and_a_wrong_caption_lower(tmp_path: Path, refs: Path) -> None:
    good = evaluate(str(write_predictions(tmp_path / "good" / "a.parquet", perfect())), str(refs), java=False)
    assert good["tokenizer"] == "standardize" and "METEOR" not in good
    assert good["images"] == 4 and good["unmatched"] == 0
    assert good["BLEU-1"] == pytest.approx(1.0, abs=1e-6)
    assert good["BLEU-4"] == pytest.approx(1.0, abs=1e-6)
    assert good["ROUGE-L"] == pytest.approx(1.0, abs=1e-6)
    assert good["CIDEr"] > 1.0
    rows = perfect()
    rows[2]["caption"] = "a dog running on the grass"
    bad = evaluate(str(write_predictions(tmp_path / "bad" / "a.parquet", rows)), str(refs), java=False)
    for key in ("BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr"):
        assert bad[key] < good[key] - 0.05, key


def test_metrics_are_over_the_whole_set_not_per_shard(tmp_path: Path, refs: Path) -> None:
    rows = perfect()
    rows[1]["caption"] = "a green triangle on the left"
    write_predictions(tmp_path / "one" / "all.parquet", rows)
    write_predictions(tmp_path / "out" / "captions" / "part-0.parquet", rows[:1])
    write_predictions(tmp_path / "out" / "captions" / "sub" / "part-1.parquet", rows[1:])
    write_predictions(tmp_path / "out" / "captions" / "_tmp" / "junk.parquet", [{"image_id": "x", "caption": "x"}])
    write_predictions(tmp_path / "out" / "captions" / ".part-2.parquet", rows[:1])
    (tmp_path / "out" / "captions" / "_manifest.json").write_text("{}")
    whole = evaluate(str(tmp_path / "one"), str(refs), java=False)
    sharded = evaluate(str(tmp_path / "out"), str(refs), java=False)  # the job root: captions/ is found
    assert sharded == whole
    assert load_predictions(str(tmp_path / "out")).num_rows == 4


def test_ids_match_by_path_or_basename_and_extras_are_counted(tmp_path: Path, refs: Path) -> None:
    rows = perfect()
    rows[0]["image_id"] = "0.png"  # basename of img/0.png
    rows.append({"image_id": "img/1.png", "caption": "a duplicate that must not count"})
    rows.append({"image_id": "other/9.png", "caption": "no reference"})
    out = evaluate(str(write_predictions(tmp_path / "p.parquet", rows)), str(refs), java=False)
    assert out["images"] == 4 and out["unmatched"] == 1
    assert out["BLEU-4"] == pytest.approx(1.0, abs=1e-6)


def test_bad_inputs_fail_with_a_clear_error(tmp_path: Path, refs: Path) -> None:
    empty = write_predictions(tmp_path / "empty.parquet", [])
    with pytest.raises(ValueError, match="no predictions"):
        evaluate(str(empty), str(refs), java=False)
    stray = write_predictions(tmp_path / "stray.parquet", [{"image_id": "z.png", "caption": "a cat"}])
    with pytest.raises(ValueError, match="none of the 1 predictions"):
        evaluate(str(stray), str(refs), java=False)
    with pytest.raises(ValueError, match="not found"):
        evaluate(str(tmp_path / "missing"), str(refs), java=False)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValueError, match="no caption Parquet"):
        evaluate(str(tmp_path / "nothing"), str(refs), java=False)


@pytest.mark.skipif(shutil.which("java") is None, reason="needs java for PTBTokenizer and METEOR")
def test_java_adds_ptb_tokenisation_and_meteor(tmp_path: Path, refs: Path, capfd) -> None:
    rows = perfect()
    rows[0]["caption"] = "A red circle, on the left; and a blue square on the top."
    out = evaluate(str(write_predictions(tmp_path / "p.parquet", rows)), str(refs))
    assert out["tokenizer"] == "ptb"
    assert 0.9 < out["METEOR"] <= 1.0
    assert out["BLEU-4"] == pytest.approx(1.0, abs=1e-6)  # punctuation is removed by the tokenizer
    assert capfd.readouterr().err == ""  # java's tokenizer does not report its speed on the terminal


RED_LEFT, BLUE_TOP = ("red", "circle", "left"), ("blue", "square", "top")


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        ("a red circle on the left and a blue square on the top", [RED_LEFT, BLUE_TOP]),
        ("There is a red circle on the left and a blue square at the top.", [RED_LEFT, BLUE_TOP]),
        ("a red circle is on the left and a blue square is on the top", [RED_LEFT, BLUE_TOP]),
        ("A red circle on the left, a blue square on the top", [RED_LEFT, BLUE_TOP]),
        ("on the left is a red circle and on the top is a blue square", [RED_LEFT, BLUE_TOP]),
        (
            "a green triangle on the right and a yellow circle on the bottom",
            [("green", "triangle", "right"), ("yellow", "circle", "bottom")],
        ),
        ("a red circle and a blue square on the top", [BLUE_TOP]),
        ("a blue circle on the left", [("blue", "circle", "left")]),
        ("a dog on a couch", []),
    ],
)
def test_parse_objects(caption: str, expected: list[tuple[str, str, str]]) -> None:
    assert parse_objects(caption) == expected


def test_object_cells_cover_every_overlapped_cell() -> None:
    assert np.flatnonzero(object_cells([0.0, 0.0, 0.25, 0.25])).tolist() == [0, 1, 8, 9]  # edges don't count
    assert np.flatnonzero(object_cells([0.1, 0.1, 0.12, 0.12])).tolist() == [0]
    cells = object_cells([0.2, 0.6, 0.55, 0.9]).reshape(8, 8)
    assert cells.sum() == 16 and cells[4:8, 1:5].all()
    assert object_cells([0.5, 0.5, 0.5, 0.5]).sum() == 1  # a degenerate box still has a cell


def test_grounding_ratio() -> None:
    box = [0.0, 0.0, 0.25, 0.25]
    assert grounding_ratio(np.full(64, 1 / 64), box) == pytest.approx(1.0)
    on = object_cells(box) / 4.0
    assert grounding_ratio(on, box) == pytest.approx(16.0)
    assert grounding_ratio(1.0 - object_cells(box), box) == pytest.approx(0.0)
    with pytest.raises(ValueError):
        grounding_ratio(np.ones(63), box)


def test_object_accuracy_and_grounding_end_to_end(tmp_path: Path) -> None:
    left = {"shape": "circle", "colour": "red", "position": "left", "box": [0.0, 0.25, 0.25, 0.5]}
    top = {"shape": "square", "colour": "blue", "position": "top", "box": [0.5, 0.0, 0.75, 0.25]}
    right = {"shape": "triangle", "colour": "green", "position": "right", "box": [0.75, 0.5, 1.0, 0.75]}
    objects = {"a.png": [left, top], "b.png": [left, right], "c.png": [top, right]}
    caps = {
        "a.png": "a blue square is on the top and a red circle is on the left",  # both, reversed order
        "b.png": "a red circle on the left and a yellow triangle on the right",  # wrong colour: 1 of 2
        "c.png": "a blue square on the top",  # 1 of 2
    }
    refs = write_references(tmp_path / "refs.json", {k: [v] for k, v in caps.items()})
    (tmp_path / "objects.json").write_text(json.dumps(objects))
    elsewhere = np.zeros(64)
    elsewhere[63] = 1.0
    rows = []
    for name, caption in caps.items():
        tokens = caption.split()
        att = np.tile(elsewhere, (len(tokens), 1))  # every other step looks at the bottom-right corner
        rows.append({"image_id": name, "caption": caption, "tokens": tokens, "attention": att})
    a = rows[0]["attention"]
    a[tokens_index(rows[0], "square")] = object_cells(top["box"]) / object_cells(top["box"]).sum()
    a[tokens_index(rows[0], "circle")] = 1 / 64  # uniform
    rows[1]["attention"][tokens_index(rows[1], "circle")] = 1 / 64
    rows[1]["attention"][tokens_index(rows[1], "triangle")] = 1 / 64  # colour is wrong, shape still measured
    preds = str(write_predictions(tmp_path / "p.parquet", rows))
    out = evaluate(preds, str(refs), str(tmp_path / "objects.json"), java=False)
    assert out["object_images"] == 3
    assert out["object_accuracy"] == pytest.approx(4 / 6)
    assert out["grounded_objects"] == 5
    n_top = object_cells(top["box"]).sum()
    assert out["grounding"] == pytest.approx((64 / n_top + 1 + 1 + 1 + 0) / 5, rel=1e-3)


def tokens_index(row: dict[str, Any], word: str) -> int:
    return row["caption"].split().index(word)


def test_attention_matrices_round_trip(tmp_path: Path) -> None:
    att = np.random.default_rng(0).random((3, 64)).astype(np.float16)
    rows = [
        {"image_id": "a", "caption": "one two three", "attention": att},
        {"image_id": "b", "caption": "x"},
    ]
    table = pq.read_table(write_predictions(tmp_path / "p.parquet", rows))
    mats = attention_matrices(table.slice(0, 2).column("attention"))
    assert [m.shape for m in mats] == [(3, 64), (1, 64)]
    np.testing.assert_array_equal(mats[0], att.astype(np.float32))
    assert attention_matrices(table.slice(1, 1).column("attention"))[0].shape == (1, 64)
