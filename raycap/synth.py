"""The synthetic shapes benchmark: seeded JPEGs of two coloured shapes, COCO captions, boxes and splits."""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import fsspec
import numpy as np
from PIL import Image, ImageDraw

from raycap import storage

COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("left", "right", "top", "bottom")  # also the order objects are drawn and named in

IMAGES_DIR = "images"
CAPTIONS_FILE = "captions.json"  # COCO captions format
OBJECTS_FILE = "objects.json"  # {file_name: [object, ...]} with boxes normalised to [0, 1]
SPLITS_FILE = "splits.json"  # {"train" | "val" | "test": [file_name, ...]}

MIN_SIDE, MAX_SIDE = 256, 512  # each side drawn independently, so most images are not square
CAPTIONS_PER_IMAGE = 5
CANONICAL_COPIES = 3  # of the 5 captions; the other two are distinct paraphrases, so canonical is the mode
SPLIT_FRACTIONS = (0.8, 0.1)  # train, val; test gets the rest

_BASE_RGB = {  # saturated, and far enough apart that JPEG, jitter and noise cannot confuse them
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 215),
    "yellow": (230, 210, 30),
}
_COLOUR_JITTER = 20  # +- per channel, per object
_CENTRES = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75)}
_RADIUS = (0.13, 0.17)  # fraction of the shorter side
_SQUARE_HALF_SIDE = 0.75  # x radius: two squares at adjacent positions (e.g. left, top) barely touch
_TRIANGLE_CIRCUMRADIUS = 1.1  # x radius: an equilateral triangle, apex up, of similar area to the circle
_BACKGROUND = (200, 250)  # grey level, inclusive
_NOISE = 4  # background noise, uniform in +-_NOISE per channel
_QUALITY = (80, 95)  # JPEG quality, inclusive
_FILE_NAME = re.compile(r"img_\d+\.jpg")


@dataclass(frozen=True)
class SynthObject:
    """One drawn shape; ``box`` is ``[x0, y0, x1, y1]`` normalised by the image width and height."""

    shape: str
    colour: str
    position: str
    box: tuple[float, float, float, float]


def file_name(index: int) -> str:
    return f"img_{index:06d}.jpg"


def _in_position_order(objects: Sequence[SynthObject]) -> list[SynthObject]:
    return sorted(objects, key=lambda o: POSITIONS.index(o.position))


def _sentence(objects: Sequence[SynthObject], verb: str = "") -> str:
    link = f" {verb} on the " if verb else " on the "
    return " and ".join(f"a {o.colour} {o.shape}{link}{o.position}" for o in objects)


def canonical_caption(objects: Sequence[SynthObject]) -> str:
    """``a red circle on the left and a blue square on the top``: objects named in POSITIONS order.

    The order depends only on the positions, so the canonical caption is a function of the image
    (whatever order the objects are passed in) and a model can learn to produce it exactly.
    """
    return _sentence(_in_position_order(objects))


def paraphrases(objects: Sequence[SynthObject]) -> list[str]:
    """The non-canonical caption forms: the other object order, 'there is …', '… is on the …'."""
    forward = _in_position_order(objects)
    backward = forward[::-1]
    return [
        _sentence(backward),
        "there is " + _sentence(forward),
        "there is " + _sentence(backward),
        _sentence(forward, "is"),
        _sentence(backward, "is"),
    ]


def _draw_image(rng: np.random.Generator) -> tuple[Image.Image, list[SynthObject]]:
    width, height = (int(v) for v in rng.integers(MIN_SIDE, MAX_SIDE + 1, size=2))
    level = int(rng.integers(_BACKGROUND[0], _BACKGROUND[1] + 1))
    pixels = rng.integers(0, 2 * _NOISE + 1, size=(height, width, 3), dtype=np.uint8)
    pixels += np.uint8(level - _NOISE)  # at most 250 + 4: no overflow
    image = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(image)

    positions = sorted(rng.choice(len(POSITIONS), size=2, replace=False).tolist())
    shapes = rng.integers(0, len(SHAPES), size=2)
    colours = rng.integers(0, len(COLOURS), size=2)
    radii = rng.uniform(*_RADIUS, size=2) * min(width, height)
    jitter = rng.integers(-_COLOUR_JITTER, _COLOUR_JITTER + 1, size=(2, 3))

    objects = []
    for k in range(2):
        shape, colour, position = SHAPES[shapes[k]], COLOURS[colours[k]], POSITIONS[positions[k]]
        fill = tuple(int(c) for c in np.clip(np.array(_BASE_RGB[colour]) + jitter[k], 0, 255))
        cx, cy = _CENTRES[position][0] * width, _CENTRES[position][1] * height
        box = _draw_shape(draw, shape, cx, cy, float(radii[k]), fill)
        norm = (box[0] / width, box[1] / height, box[2] / width, box[3] / height)
        objects.append(SynthObject(shape, colour, position, tuple(round(v, 6) for v in norm)))
    return image, objects


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple) -> tuple:
    """Draw one filled shape centred at (cx, cy); return its pixel box (x0, y0, x1, y1)."""
    if shape == "circle":
        box = (cx - r, cy - r, cx + r, cy + r)
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        q = _SQUARE_HALF_SIDE * r
        box = (cx - q, cy - q, cx + q, cy + q)
        draw.rectangle(box, fill=fill)
    else:  # equilateral triangle, apex up, centred on its circumcentre
        c = _TRIANGLE_CIRCUMRADIUS * r
        half = c * np.sqrt(3) / 2
        draw.polygon([(cx, cy - c), (cx + half, cy + c / 2), (cx - half, cy + c / 2)], fill=fill)
        box = (cx - half, cy - c, cx + half, cy + c / 2)
    return box


def _captions(objects: Sequence[SynthObject], rng: np.random.Generator) -> list[str]:
    alternatives = paraphrases(objects)
    picked = rng.choice(len(alternatives), size=CAPTIONS_PER_IMAGE - CANONICAL_COPIES, replace=False)
    captions = [canonical_caption(objects)] * CANONICAL_COPIES + [alternatives[i] for i in picked]
    return [captions[i] for i in rng.permutation(len(captions))]


def _splits(names: list[str], seed: int) -> dict[str, list[str]]:
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1,)))
    order = rng.permutation(len(names))
    n_train = round(SPLIT_FRACTIONS[0] * len(names))
    n_val = round(SPLIT_FRACTIONS[1] * len(names))
    cuts = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, len(names))}
    return {split: sorted(names[i] for i in order[a:b]) for split, (a, b) in cuts.items()}


def _write_json(fs: fsspec.AbstractFileSystem, path: str, obj: object) -> None:
    storage.write_bytes_atomic(fs, path, json.dumps(obj, ensure_ascii=False).encode("utf-8"))


def generate(
    output: str | os.PathLike[str], num_images: int = 2000, seed: int = 0, storage_options: dict | None = None
) -> dict:
    """Write the benchmark to ``output`` (a folder or URI); the same seed gives byte-identical files.

    Image ``i`` draws from its own seed ``SeedSequence(seed, spawn_key=(0, i))``, so it is the same
    whatever ``num_images`` is. Earlier ``img_*.jpg`` files beyond this run's count are removed, so
    the images folder always matches ``captions.json``. Returns a summary (counts and paths).
    """
    if num_images < 1:
        raise ValueError(f"num_images must be at least 1, got {num_images}")
    fs, root = storage.filesystem(os.fspath(output), storage_options)
    image_dir = storage.join(root, IMAGES_DIR)
    names = [file_name(i) for i in range(num_images)]
    images, annotations, objects_by_name = [], [], {}
    for i, name in enumerate(names):
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0, i)))
        image, objects = _draw_image(rng)
        quality = int(rng.integers(_QUALITY[0], _QUALITY[1] + 1))
        jpeg = io.BytesIO()
        image.save(jpeg, "JPEG", quality=quality)
        storage.write_bytes_atomic(fs, storage.join(image_dir, name), jpeg.getvalue())
        images.append({"id": i, "file_name": name, "width": image.width, "height": image.height})
        for caption in _captions(objects, rng):
            annotations.append({"id": len(annotations), "image_id": i, "caption": caption})
        objects_by_name[name] = [{**asdict(o), "box": list(o.box)} for o in objects]

    keep = set(names)
    for stale in fs.ls(image_dir, detail=False):
        name = stale.rsplit("/", 1)[-1]
        if _FILE_NAME.fullmatch(name) and name not in keep:
            fs.rm_file(stale)

    splits = _splits(names, seed)
    _write_json(fs, storage.join(root, CAPTIONS_FILE), {"images": images, "annotations": annotations})
    _write_json(fs, storage.join(root, OBJECTS_FILE), objects_by_name)
    _write_json(fs, storage.join(root, SPLITS_FILE), splits)
    root = storage.uri(fs, root)
    image_dir = storage.join(root, IMAGES_DIR)
    return {
        "output": root,
        "images_dir": image_dir,
        "captions": storage.join(root, CAPTIONS_FILE),
        "objects": storage.join(root, OBJECTS_FILE),
        "splits": storage.join(root, SPLITS_FILE),
        "num_images": num_images,
        "num_captions": len(annotations),
        "split_sizes": {split: len(files) for split, files in splits.items()},
        "seed": seed,
    }


def write_captioned_features(
    root: str,
    images: int,
    captions: int = 1,
    dim: int = 8,
    per_file: int = 10_000,
    row_group: int = 1000,
    seed: int = 0,
) -> None:
    """A captioned feature set of any size for the training scale tests and benches: `root`/features/*.parquet
    (random 64 x `dim` float16 features, `per_file` rows a file in row groups of `row_group`) and
    `root`/captions.csv (`captions` per image: the canonical caption, then paraphrases). Reduced features
    (`dim` < 2048) keep millions of images on one disk."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raycap import schema

    rng = np.random.default_rng(seed)
    folder = os.path.join(root, schema.FEATURES_DIR)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(root, "captions.csv"), "w") as out:
        out.write("file_name,caption\n")
        for f, start in enumerate(range(0, images, per_file)):
            n = min(per_file, images - start)
            ids = [f"{f:05d}/{file_name(start + k)}" for k in range(n)]
            features = rng.standard_normal((n, schema.NUM_REGIONS, dim), dtype=np.float32)
            columns = [ids, ids, schema.features_to_arrow(features), pa.array([299] * n, pa.int32())]
            table = pa.table([*columns, columns[-1]], schema=schema.features_schema("float16", dim))
            pq.write_table(table, os.path.join(folder, f"{f:05d}.parquet"), row_group_size=row_group)
            kinds = rng.integers(0, len(SHAPES) * len(COLOURS), n)
            for image_id, kind in zip(ids, kinds.tolist()):
                shape, colour = SHAPES[kind % len(SHAPES)], COLOURS[kind // len(SHAPES)]
                objects = [SynthObject(shape, colour, "left", (0.0, 0.0, 1.0, 1.0))]
                for caption in [canonical_caption(objects), *paraphrases(objects)][:captions]:
                    out.write(f"{image_id},{caption}\n")
