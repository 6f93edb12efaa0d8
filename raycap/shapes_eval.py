"""The synthetic shapes benchmark's scores: objects a caption states correctly, and attention grounding per object."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from raycap import schema
from raycap.synth import COLOURS, POSITIONS, SHAPES
from raycap.text import standardize

Triple = tuple[str, str, str]

_EPS = 1e-6  # a box edge within this of a cell edge does not make the box overlap that cell
_CLAUSE_BREAKS = frozenset({"and"})


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


@dataclass
class ObjectTally:
    """Object accuracy and grounding summed over the images scored so far."""

    images: int = 0  # images with ground-truth objects that were scored
    objects: int = 0  # objects in those images
    correct: int = 0  # objects a caption stated with the right colour, shape and position
    ratios: list[float] = field(default_factory=list)  # one grounding ratio per object measured

    def add(self, caption: str, tokens: Sequence[str], attention: np.ndarray, objects: Sequence[dict]) -> None:
        scored = object_scores(caption, tokens, attention, objects)
        self.images += 1
        self.objects += scored["objects"]
        self.correct += scored["correct"]
        self.ratios.extend(scored["ratios"])

    def result(self) -> dict[str, float | int]:
        """ "object_images", "object_accuracy", "grounded_objects" and, when any object was measured, "grounding"."""
        out: dict[str, float | int] = {
            "object_images": self.images,
            "object_accuracy": self.correct / self.objects if self.objects else 0.0,
            "grounded_objects": len(self.ratios),
        }
        if self.ratios:
            out["grounding"] = float(np.mean(self.ratios))
        return out
