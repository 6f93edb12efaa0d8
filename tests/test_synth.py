"""Unit tests of raycap.synth: files, COCO schema, captions, object boxes, splits and determinism."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from raycap import synth
from raycap.synth import COLOURS, POSITIONS, SHAPES, SynthObject, canonical_caption, generate

N = 20


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth")
    return out, generate(str(out), num_images=N, seed=7)


def load(out: Path, name: str):
    return json.loads((out / name).read_text())


def by_image(captions: dict) -> dict[int, list[str]]:
    grouped: dict[int, list[str]] = {}
    for ann in captions["annotations"]:
        grouped.setdefault(ann["image_id"], []).append(ann["caption"])
    return grouped


def as_objects(entries: list[dict]) -> list[SynthObject]:
    return [SynthObject(e["shape"], e["colour"], e["position"], tuple(e["box"])) for e in entries]


def test_canonical_caption_names_objects_in_position_order():
    red_circle = SynthObject("circle", "red", "left", (0.1, 0.4, 0.4, 0.6))
    blue_square = SynthObject("square", "blue", "top", (0.4, 0.1, 0.6, 0.4))
    expected = "a red circle on the left and a blue square on the top"
    assert canonical_caption([red_circle, blue_square]) == expected
    assert canonical_caption([blue_square, red_circle]) == expected


def test_files_exist_and_counts_match(bench):
    out, summary = bench
    files = sorted(p.name for p in (out / "images").iterdir())
    assert files == [f"img_{i:06d}.jpg" for i in range(N)]
    assert summary["num_images"] == N and summary["num_captions"] == 5 * N
    for key in ("captions", "objects", "splits"):
        assert Path(summary[key]).is_file()


def test_captions_json_is_coco(bench):
    out, _ = bench
    captions = load(out, "captions.json")
    assert set(captions) == {"images", "annotations"}
    ids = set()
    for entry in captions["images"]:
        assert set(entry) == {"id", "file_name", "width", "height"} and isinstance(entry["id"], int)
        with Image.open(out / "images" / entry["file_name"]) as img:
            assert img.format == "JPEG" and img.size == (entry["width"], entry["height"])
        ids.add(entry["id"])
    assert len(ids) == N
    ann_ids = [a["id"] for a in captions["annotations"]]
    assert len(set(ann_ids)) == len(ann_ids) == 5 * N
    assert all(a["image_id"] in ids and isinstance(a["caption"], str) for a in captions["annotations"])


def test_five_captions_with_canonical_the_most_frequent(bench):
    out, _ = bench
    captions, objects = load(out, "captions.json"), load(out, "objects.json")
    names = {e["id"]: e["file_name"] for e in captions["images"]}
    forms = Counter()
    for image_id, texts in by_image(captions).items():
        assert len(texts) == 5
        canonical = canonical_caption(as_objects(objects[names[image_id]]))
        (most, count), *rest = Counter(texts).most_common()
        assert most == canonical and count == 3 and all(c < count for _, c in rest)
        for text in texts:
            words = text.split()
            forms["there is" if text.startswith("there is") else "is on" if "is on" in text else "plain"] += 1
            assert sum(w in COLOURS for w in words) == 2 and sum(w in SHAPES for w in words) == 2
    assert forms["there is"] > 0 and forms["is on"] > 0  # paraphrases do occur


def test_objects_at_distinct_positions_with_boxes_in_range(bench):
    out, _ = bench
    objects = load(out, "objects.json")
    assert len(objects) == N
    seen_shapes = set()
    for entries in objects.values():
        assert len(entries) == 2
        assert entries[0]["position"] != entries[1]["position"]
        for e in entries:
            assert e["shape"] in SHAPES and e["colour"] in COLOURS and e["position"] in POSITIONS
            x0, y0, x1, y1 = e["box"]
            assert 0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0
            seen_shapes.add(e["shape"])
    assert seen_shapes == set(SHAPES)


def nearest_colour(rgb: np.ndarray) -> str:
    distances = {name: np.abs(rgb.astype(int) - base).sum() for name, base in synth._BASE_RGB.items()}
    return min(distances, key=distances.get)


def test_each_box_contains_its_colour_at_the_position(bench):
    out, _ = bench
    for name, entries in load(out, "objects.json").items():
        with Image.open(out / "images" / name) as img:
            pixels = np.asarray(img.convert("RGB"))
        height, width = pixels.shape[:2]
        for e in entries:
            x0, y0, x1, y1 = e["box"]
            cx, cy = (x0 + x1) / 2 * width, (y0 + y1) / 2 * height
            patch = pixels[int(cy) - 2 : int(cy) + 3, int(cx) - 2 : int(cx) + 3].reshape(-1, 3)
            centre = np.median(patch, axis=0)
            assert nearest_colour(centre) == e["colour"], (name, e, centre)
            assert np.abs(centre.astype(int) - synth._BASE_RGB[e["colour"]]).max() <= 45
            ex, ey = synth._CENTRES[e["position"]]
            assert abs(cx - ex * width) < 1 and abs(cy - ey * height) <= 0.05 * min(width, height)
            for corner in ((2, 2), (width - 3, 2), (2, height - 3), (width - 3, height - 3)):
                grey = pixels[corner[1], corner[0]].astype(int)
                assert grey.min() >= 190 and grey.max() - grey.min() <= 20  # light grey background


def test_each_box_is_tight_around_its_shape(bench):
    out, _ = bench
    checked = 0
    for name, entries in load(out, "objects.json").items():
        if entries[0]["colour"] == entries[1]["colour"]:
            continue  # boxes (not shapes) may overlap: only measure objects with a colour of their own
        with Image.open(out / "images" / name) as img:
            pixels = np.asarray(img.convert("RGB")).astype(int)
        height, width = pixels.shape[:2]
        for e in entries:
            x0, y0, x1, y1 = box = np.array(e["box"]) * (width, height, width, height)
            left, top = max(int(x0) - 4, 0), max(int(y0) - 4, 0)
            region = pixels[top : int(y1) + 5, left : int(x1) + 5]
            ys, xs = np.nonzero(np.abs(region - synth._BASE_RGB[e["colour"]]).max(axis=2) <= 60)
            found = (xs.min() + left, ys.min() + top, xs.max() + left + 1, ys.max() + top + 1)
            assert np.allclose(found, box, atol=2.5), (name, e, found)
            checked += 1
    assert checked >= N


def test_splits_partition_80_10_10(bench):
    out, _ = bench
    splits = load(out, "splits.json")
    assert set(splits) == {"train", "val", "test"}
    assert [len(splits[s]) for s in ("train", "val", "test")] == [16, 2, 2]
    everything = splits["train"] + splits["val"] + splits["test"]
    assert sorted(everything) == sorted(load(out, "objects.json")) and len(set(everything)) == N


def test_sizes_in_range_and_not_all_square(bench):
    out, _ = bench
    sizes = [(e["width"], e["height"]) for e in load(out, "captions.json")["images"]]
    assert all(256 <= w <= 512 and 256 <= h <= 512 for w, h in sizes)
    assert sum(w != h for w, h in sizes) > N // 2


def test_same_seed_same_bytes_other_seed_differs(bench, tmp_path):
    out, _ = bench
    again = tmp_path / "again"
    generate(again, num_images=N, seed=7)
    first = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert first == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in first:
        assert (out / rel).read_bytes() == (again / rel).read_bytes(), rel
    other = tmp_path / "other"
    generate(other, num_images=3, seed=8)
    assert (other / "images/img_000000.jpg").read_bytes() != (out / "images/img_000000.jpg").read_bytes()


def test_image_depends_on_seed_and_index_not_count(bench, tmp_path):
    out, _ = bench
    generate(tmp_path, num_images=3, seed=7)
    for i in range(3):
        name = f"images/img_{i:06d}.jpg"
        assert (tmp_path / name).read_bytes() == (out / name).read_bytes()


def test_rerun_with_fewer_images_removes_stale_files(tmp_path):
    generate(tmp_path, num_images=4, seed=1)
    (tmp_path / "images" / "keep_me.txt").write_text("not ours")
    generate(tmp_path, num_images=2, seed=1)
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == [
        "img_000000.jpg",
        "img_000001.jpg",
        "keep_me.txt",
    ]


def test_rejects_no_images(tmp_path):
    with pytest.raises(ValueError, match="num_images"):
        generate(tmp_path, num_images=0)


def test_synth_writes_the_same_bytes_to_s3_as_to_a_folder(s3_server, tmp_path):
    import s3fs

    fs = s3fs.S3FileSystem(**s3_server, skip_instance_cache=True)
    fs.mkdir("synth-bucket")
    synth.generate(str(tmp_path), num_images=3, seed=2)
    summary = synth.generate("s3://synth-bucket/bench", num_images=3, seed=2, storage_options=s3_server)
    assert summary["images_dir"] == "s3://synth-bucket/bench/images"
    for name in ("captions.json", "splits.json", "images/img_000002.jpg"):
        assert fs.cat_file(f"synth-bucket/bench/{name}") == (tmp_path / name).read_bytes()
