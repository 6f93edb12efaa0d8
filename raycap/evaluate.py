"""Caption metrics over a whole prediction set (pycocoevalcap) and attention grounding on synthetic shapes."""

from __future__ import annotations

import contextlib
import io
import json
import posixpath
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from raycap import schema
from raycap.synth import COLOURS, POSITIONS, SHAPES
from raycap.text import standardize

Result = dict[str, float | str | int]
Triple = tuple[str, str, str]

_EPS = 1e-6  # a box edge within this of a cell edge does not make the box overlap that cell
_CLAUSE_BREAKS = frozenset({"and"})


# ---------------------------------------------------------------- predictions


def open_predictions(predictions: str) -> ds.Dataset:
    """The caption Parquet at `predictions`: one file, a captions folder, or a job output root with captions/.

    Files and folders whose names start with '_' or '.' (commit markers, temporary files) are skipped.
    """
    fs, root = fsspec.core.url_to_fs(predictions)
    if not fs.exists(root):
        raise ValueError(f"predictions not found: {predictions}")
    if fs.isdir(root) and fs.isdir(posixpath.join(root, schema.CAPTIONS_DIR)):
        root = posixpath.join(root, schema.CAPTIONS_DIR)
    dataset = ds.dataset(root, filesystem=fs, format="parquet", ignore_prefixes=[".", "_"])
    if not dataset.files:
        raise ValueError(f"no caption Parquet files under {predictions}")
    missing = [name for name in (schema.IMAGE_ID, schema.CAPTION) if name not in dataset.schema.names]
    if missing:
        raise ValueError(f"{predictions} is not a captions table: no column {', '.join(missing)}")
    return dataset


def load_predictions(
    predictions: str, columns: Sequence[str] | None = None, filter: pc.Expression | None = None
) -> pa.Table:
    """Read caption predictions (all of `schema.CAPTIONS_SCHEMA`'s columns unless `columns` names some)."""
    dataset = open_predictions(predictions)
    wanted = list(columns) if columns is not None else list(schema.CAPTIONS_SCHEMA.names)
    missing = [name for name in wanted if name not in dataset.schema.names]
    if missing:
        raise ValueError(f"{predictions} has no column {', '.join(missing)}")
    return dataset.to_table(columns=wanted, filter=filter)


def attention_matrices(column: pa.Array | pa.ChunkedArray) -> list[np.ndarray]:
    """The attention column as one float32 ``(T, 64)`` array per row."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy(zero_copy_only=False)
    values = column.flatten().flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    values = values.reshape(-1, schema.NUM_REGIONS)
    bounds = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return [values[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


# ---------------------------------------------------------------- matching image ids


def _normalise_name(name: str) -> str:
    name = name.replace("\\", "/")
    while name.startswith("./"):
        name = name[2:]
    return name


def name_matcher(names: Iterable[str]) -> Callable[[str], str | None]:
    """A lookup from a prediction's image id to one of `names`: exact match first, then a unique basename."""
    exact = {_normalise_name(n): n for n in names}
    by_base: dict[str, str | None] = {}
    for norm, name in exact.items():
        base = posixpath.basename(norm)
        by_base[base] = None if base in by_base else name  # an ambiguous basename matches nothing

    def match(image_id: str) -> str | None:
        norm = _normalise_name(image_id)
        if norm in exact:
            return exact[norm]
        return by_base.get(posixpath.basename(norm))

    return match


def _read_json(uri: str) -> Any:
    with fsspec.open(uri, "r", encoding="utf-8") as f:
        return json.load(f)


def load_references(references: str) -> dict[str, list[str]]:
    """COCO captions JSON as ``{file_name: [caption, ...]}``."""
    data = _read_json(references)
    names = {image["id"]: image["file_name"] for image in data.get("images", [])}
    refs: dict[str, list[str]] = {}
    for ann in data.get("annotations", []):
        name = names.get(ann["image_id"])
        if name is not None:
            refs.setdefault(name, []).append(str(ann["caption"]))
    if not refs:
        raise ValueError(f"no reference captions in {references}")
    return refs


# ---------------------------------------------------------------- caption metrics


def _tokenize_ptb(captions: dict[str, list[str]]) -> dict[str, list[str]]:
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    with contextlib.redirect_stdout(io.StringIO()):
        out = PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in captions.items()})
    # The tokenizer drops trailing empty lines, so only an empty last caption may come back missing.
    if any(k not in out and any(c.strip() for c in v) for k, v in captions.items()):
        raise OSError("PTBTokenizer returned fewer captions than it was given")
    return {k: out.get(k, [""] * len(v)) for k, v in captions.items()}


def caption_scores(gts: dict[str, list[str]], res: dict[str, str], java: bool | None = None) -> Result:
    """BLEU-1..4, ROUGE-L, CIDEr (and METEOR with java) of `res` against `gts`, over the whole set at once.

    With java (found on PATH when `java` is None) captions go through pycocoevalcap's PTBTokenizer and
    METEOR is computed; without it, the stated fallback tokenisation is `raycap.text.standardize`.
    """
    if not res:
        raise ValueError("no predictions to score")
    if set(gts) != set(res):
        raise ValueError("references and predictions must cover the same images")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    use_java = shutil.which("java") is not None if java is None else java
    tokenizer = "standardize"
    if use_java:
        try:
            gts_tok = _tokenize_ptb(gts)
            res_tok = {k: v[0] for k, v in _tokenize_ptb({k: [c] for k, c in res.items()}).items()}
            tokenizer = "ptb"
        except OSError:
            use_java = False
    if tokenizer == "standardize":
        gts_tok = {k: [standardize(c) for c in v] for k, v in gts.items()}
        res_tok = {k: standardize(c) for k, c in res.items()}
    hyp = {k: [c] for k, c in res_tok.items()}
    out: Result = {"images": len(res), "tokenizer": tokenizer}
    with contextlib.redirect_stdout(io.StringIO()):
        bleu, _ = Bleu(4).compute_score(gts_tok, hyp, verbose=0)
        out.update({f"BLEU-{i + 1}": float(b) for i, b in enumerate(bleu)})
        out["ROUGE-L"] = float(Rouge().compute_score(gts_tok, hyp)[0])
        out["CIDEr"] = float(Cider().compute_score(gts_tok, hyp)[0])
        if use_java:
            from pycocoevalcap.meteor.meteor import Meteor

            meteor = Meteor()
            out["METEOR"] = float(meteor.compute_score(gts_tok, hyp)[0])
            del meteor  # stops the java process
    return out


# ---------------------------------------------------------------- objects and grounding


@dataclass(frozen=True)
class Mention:
    """One object a caption describes: the shape word's token index and the words found around it."""

    shape: str
    index: int
    colour: str | None
    position: str | None


def mentions(words: Sequence[str]) -> list[Mention]:
    """The objects named in standardised `words`: clauses split on "and", then one segment per shape word.

    Inside a clause holding several shapes, a segment starts at a shape's colour word (or the shape);
    a segment's colour is the colour word nearest its shape (earlier wins a tie), its position the
    first position word in it.
    """
    found: list[Mention] = []
    breaks = [i for i, w in enumerate(words) if w in _CLAUSE_BREAKS]
    for start, stop in zip([0, *(b + 1 for b in breaks)], [*breaks, len(words)], strict=True):
        shapes = [i for i in range(start, stop) if words[i] in SHAPES]
        if not shapes:
            continue
        starts = [start]
        for prev, s in zip(shapes, shapes[1:], strict=False):
            starts.append(s - 1 if s - 1 > prev and words[s - 1] in COLOURS else s)
        for s, a, b in zip(shapes, starts, [*starts[1:], stop], strict=True):
            colours = [i for i in range(a, b) if words[i] in COLOURS]
            colour = min(colours, key=lambda i: (abs(i - s), i > s)) if colours else None
            position = next((words[i] for i in range(a, b) if words[i] in POSITIONS), None)
            found.append(Mention(words[s], s, None if colour is None else words[colour], position))
    return found


def parse_objects(caption: str) -> list[Triple]:
    """The (colour, shape, position) triples a caption fully states, in order."""
    return [
        (m.colour, m.shape, m.position)
        for m in mentions(standardize(caption).split())
        if m.colour is not None and m.position is not None
    ]


def object_cells(box: Sequence[float]) -> np.ndarray:
    """Boolean (64,) mask of the 8x8 cells (row-major) that a normalised [x0, y0, x1, y1] box overlaps.

    Cell (row, col) covers [col/8, (col+1)/8] x [row/8, (row+1)/8]; touching an edge is not overlap.
    A box of zero width or height still selects the cell holding it.
    """
    x0, y0, x1, y1 = (float(np.clip(v, 0.0, 1.0)) for v in box)
    x0, x1 = min(x0, x1), max(x0, x1)
    y0, y1 = min(y0, y1), max(y0, y1)
    edges = np.arange(schema.GRID + 1) / schema.GRID

    def spans(lo: float, hi: float) -> np.ndarray:
        hit = (edges[1:] > lo + _EPS) & (edges[:-1] < hi - _EPS)
        if not hit.any():
            hit[min(int(lo * schema.GRID), schema.GRID - 1)] = True
        return hit

    return np.outer(spans(y0, y1), spans(x0, x1)).reshape(-1)


def grounding_ratio(attention_row: np.ndarray, box: Sequence[float]) -> float:
    """Attention mass on the box's cells over their share of the grid: 1.0 = uniform, 64/n = all on it."""
    row = np.asarray(attention_row, dtype=np.float64).reshape(-1)
    if row.size != schema.NUM_REGIONS:
        raise ValueError(f"an attention row has {schema.NUM_REGIONS} values, got {row.size}")
    total = row.sum()
    if not total > 0:
        raise ValueError("attention row sums to zero")
    cells = object_cells(box)
    return float(row[cells].sum() / total / (cells.sum() / schema.NUM_REGIONS))


def _assign(objects: Sequence[dict[str, Any]], found: Sequence[Mention]) -> dict[int, Mention]:
    """Pair objects with mentions of the same shape, best colour+position agreement first, one each."""
    pairs = [
        (-(m.colour == o["colour"]) - (m.position == o["position"]), i, j)
        for i, o in enumerate(objects)
        for j, m in enumerate(found)
        if m.shape == o["shape"]
    ]
    taken: dict[int, Mention] = {}
    used: set[int] = set()
    for _, i, j in sorted(pairs):
        if i not in taken and j not in used:
            taken[i] = found[j]
            used.add(j)
    return taken


def object_scores(
    caption: str, tokens: Sequence[str], attention: np.ndarray, objects: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    """Per-image counts: objects stated correctly, and the grounding ratio of each object measured."""
    stated = set(parse_objects(caption))
    correct = sum((o["colour"], o["shape"], o["position"]) in stated for o in objects)
    ratios = []
    for i, m in _assign(objects, mentions([t.lower() for t in tokens])).items():
        if m.index < len(attention):
            ratios.append(grounding_ratio(attention[m.index], objects[i]["box"]))
    return {"objects": len(objects), "correct": correct, "ratios": ratios}


# ---------------------------------------------------------------- the whole evaluation


def evaluate(predictions: str, references: str, objects: str | None = None, *, java: bool | None = None) -> Result:
    """Score caption predictions against COCO-format references (and synthetic objects when given).

    Keys: "images" scored, "unmatched" predictions without references, "tokenizer" ("ptb" | "standardize"),
    "BLEU-1".."BLEU-4", "ROUGE-L", "CIDEr", "METEOR" (java only); with `objects`: "object_images",
    "object_accuracy", "grounded_objects" and, when any object was measured, "grounding".
    `java=None` uses java when it is on PATH; False forces the pure-Python path.
    """
    refs = load_references(references)
    match_ref = name_matcher(refs)
    truth: dict[str, list[dict]] = _read_json(objects) if objects is not None else {}
    match_obj = name_matcher(truth)
    columns = [schema.IMAGE_ID, schema.CAPTION]
    if objects is not None:
        columns += [schema.TOKENS, schema.ATTENTION]
    dataset = open_predictions(predictions)
    missing = [c for c in columns if c not in dataset.schema.names]
    if missing:
        raise ValueError(f"{predictions} has no column {', '.join(missing)}")

    res: dict[str, str] = {}
    rows = unmatched = 0
    counts = {"object_images": 0, "objects": 0, "correct": 0}
    ratios: list[float] = []
    for batch in dataset.to_batches(columns=columns):
        ids = batch.column(schema.IMAGE_ID).to_pylist()
        captions = batch.column(schema.CAPTION).to_pylist()
        rows += len(ids)
        tokens: list[list[str]] = []
        attention: list[np.ndarray] = []
        if objects is not None:
            tokens = batch.column(schema.TOKENS).to_pylist()
            attention = attention_matrices(batch.column(schema.ATTENTION))
        for k, (image_id, caption) in enumerate(zip(ids, captions, strict=True)):
            key = match_ref(image_id)
            if key is None:
                unmatched += 1
                continue
            if key in res:
                continue  # a duplicate row: the first one counts
            res[key] = caption
            obj_key = match_obj(image_id)
            if obj_key is not None:
                scored = object_scores(caption, tokens[k], attention[k], truth[obj_key])
                counts["object_images"] += 1
                counts["objects"] += scored["objects"]
                counts["correct"] += scored["correct"]
                ratios.extend(scored["ratios"])
    if rows == 0:
        raise ValueError(f"no predictions in {predictions}")
    if not res:
        raise ValueError(f"none of the {rows} predictions matches an image in {references}")

    out = caption_scores({k: refs[k] for k in res}, res, java=java)
    out["unmatched"] = unmatched
    if objects is not None:
        if counts["objects"] == 0:
            raise ValueError(f"no scored prediction matches an image with objects in {objects}")
        out["object_images"] = counts["object_images"]
        out["object_accuracy"] = counts["correct"] / counts["objects"]
        out["grounded_objects"] = len(ratios)
        if ratios:
            out["grounding"] = float(np.mean(ratios))
    return out
