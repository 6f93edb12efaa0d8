"""Attention pictures: per-word heatmap overlays, the one-image figure and the self-contained HTML report."""

from __future__ import annotations

import base64
import functools
import html
import io
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, ImageDraw, ImageFont, ImageOps

from raycap import schema, storage
from raycap.predictions import attention_matrices, open_predictions

PANEL = 224  # the longest side of one figure panel, pixels
LABEL = 26  # the height of the word label above a panel
PAD = 6  # space between panels
COLUMNS = 5  # panels per figure row
ALPHA = 0.55  # heatmap opacity over the image
THUMB = 256  # the longest side of a report image
WORD_THUMB = 112  # the longest side of a report word heatmap


def jet(values: np.ndarray) -> np.ndarray:
    """Matplotlib's 'jet' colormap: floats in [0, 1] to uint8 RGB (blue, cyan, yellow, red)."""
    x = np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0)[..., None]
    rgb = np.clip(1.5 - np.abs(4.0 * x - np.array([3.0, 2.0, 1.0], dtype=np.float32)), 0.0, 1.0)
    return (rgb * 255.0 + 0.5).astype(np.uint8)


def heatmap(attention_row: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """One 64-vector as an (H, W) float map in [0, 1], min-max scaled, bicubically upsampled to `size`."""
    row = np.asarray(attention_row, dtype=np.float32).reshape(-1)
    if row.size != schema.NUM_REGIONS:
        raise ValueError(f"an attention row has {schema.NUM_REGIONS} values, got {row.size}")
    lo, hi = float(row.min()), float(row.max())
    scaled = (row - lo) / (hi - lo) if hi - lo > 1e-12 else np.full_like(row, 0.5)
    grid = Image.fromarray(scaled.reshape(schema.GRID, schema.GRID))
    return np.clip(np.asarray(grid.resize(size, Image.Resampling.BICUBIC)), 0.0, 1.0)


def attention_overlay(image: Image.Image, attention_row: np.ndarray) -> Image.Image:
    """The image with one word's attention drawn over it as a smooth jet heatmap (8x8 grid over the image)."""
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    heat = jet(heatmap(attention_row, image.size)).astype(np.float32)
    return Image.fromarray(((1.0 - ALPHA) * base + ALPHA * heat + 0.5).astype(np.uint8))


@functools.lru_cache(maxsize=4)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def _fit(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int) -> str:
    """`text`, cut with an ellipsis where it is wider than `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def _check(tokens: Sequence[str], attention: np.ndarray) -> np.ndarray:
    attention = np.asarray(attention, dtype=np.float32)
    if attention.ndim != 2 or attention.shape[1] != schema.NUM_REGIONS or len(attention) != len(tokens):
        raise ValueError(f"need one 64-vector per token: {len(tokens)} tokens, attention {attention.shape}")
    return attention


def attention_figure(image: Image.Image, tokens: Sequence[str], attention: np.ndarray) -> Image.Image:
    """A grid of panels: the image, then one overlay per word with the word above it (TF's plot_attention)."""
    attention = _check(tokens, attention)
    panel = ImageOps.contain(image.convert("RGB"), (PANEL, PANEL), Image.Resampling.LANCZOS)
    overlays = [(t, attention_overlay(panel, a)) for t, a in zip(tokens, attention, strict=True)]
    panels = [("", panel), *overlays]
    cols = min(len(panels), COLUMNS)
    rows = math.ceil(len(panels) / cols)
    w, h = panel.size
    cell_w, cell_h = w + PAD, h + LABEL + PAD
    figure = Image.new("RGB", (cols * cell_w + PAD, rows * cell_h + PAD), "white")
    draw = ImageDraw.Draw(figure)
    font = _font(LABEL - 8)
    for k, (word, picture) in enumerate(panels):
        x, y = PAD + (k % cols) * cell_w, PAD + (k // cols) * cell_h
        label = _fit(draw, word, font, w)
        draw.text((x + w / 2, y + LABEL / 2), label, fill="black", font=font, anchor="mm")
        figure.paste(picture, (x, y + LABEL))
    return figure


def open_image(path: str, draft: int | None = None, storage_options: dict[str, Any] | None = None) -> Image.Image:
    """An image file (local path or URI) as RGB, EXIF-rotated as a person sees it; `draft` speeds large JPEGs."""
    with Image.open(io.BytesIO(storage.read_bytes(path, storage_options))) as img:
        if draft is not None:
            img.draft("RGB", (draft, draft))
        return ImageOps.exif_transpose(img).convert("RGB")


def find_prediction(predictions: str, image: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The row for `image`: its image id or path, else a unique basename match. Attention is (T, 64)."""
    dataset = open_predictions(predictions, storage_options)
    table = dataset.to_table(filter=(pc.field(schema.IMAGE_ID) == image) | (pc.field(schema.PATH) == image))
    if table.num_rows == 0:
        ids = dataset.to_table(columns=[schema.IMAGE_ID]).column(schema.IMAGE_ID)
        base = os.path.basename(image.replace("\\", "/"))
        names = pc.replace_substring_regex(ids, pattern=r"^.*/", replacement="")
        hits = sorted(set(pc.filter(ids, pc.equal(names, base)).to_pylist()))
        if len(hits) > 1:
            raise ValueError(f"{image!r} is ambiguous: {', '.join(hits[:5])}")
        if hits:
            table = dataset.to_table(filter=pc.field(schema.IMAGE_ID) == hits[0])
    if table.num_rows == 0:
        raise ValueError(f"no prediction for {image!r} in {predictions}")
    return _rows(table.slice(0, 1))[0]


def _rows(table: pa.Table) -> list[dict[str, Any]]:
    attention = attention_matrices(table.column(schema.ATTENTION))
    rows = table.drop_columns([schema.ATTENTION]).to_pylist()
    for row, att in zip(rows, attention, strict=True):
        row[schema.ATTENTION] = att
    return rows


def show(predictions: str, image: str, output: str, storage_options: dict[str, Any] | None = None) -> str:
    """Write the attention figure (PNG) of one image's caption to `output` (a path or URI); returns `output`."""
    row = find_prediction(predictions, image, storage_options)
    picture = open_image(row[schema.PATH], storage_options=storage_options)
    figure = attention_figure(picture, row[schema.TOKENS], row[schema.ATTENTION])
    buf = io.BytesIO()
    figure.save(buf, format="PNG")
    storage.write_bytes(output, buf.getvalue(), storage_options)
    return output


def data_uri(image: Image.Image, fmt: str = "JPEG") -> str:
    """The image encoded inline as a base64 ``data:`` URI."""
    buf = io.BytesIO()
    image.save(buf, format=fmt, **({"quality": 85} if fmt == "JPEG" else {}))
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
section { border-top: 1px solid #ccc; padding: 1em 0; }
h2 { font-size: 1em; font-family: monospace; margin: 0 0 .5em; word-break: break-all; }
.top { display: flex; gap: 1em; align-items: flex-start; }
.caption { font-size: 1.2em; margin: 0 0 .4em; }
.meta { color: #666; margin: 0; }
.words { display: flex; flex-wrap: wrap; gap: .4em; margin-top: .6em; }
figure { margin: 0; text-align: center; }
figcaption { font-size: .85em; }
.error { color: #a00; }
"""


def _item(row: dict[str, Any], storage_options: dict[str, Any] | None = None) -> str:
    esc = html.escape
    caption = esc(row[schema.CAPTION])
    meta = f"score {row[schema.SCORE]:.3f} (mean log-probability) · model {esc(row[schema.MODEL_ID])}"
    head = f"<h2>{esc(row[schema.IMAGE_ID])}</h2>"
    try:
        image = open_image(row[schema.PATH], draft=2 * THUMB, storage_options=storage_options)
    except Exception as e:  # an unreadable image still gets its caption in the report
        text = f"<p class='caption'>{caption}</p><p class='meta'>{meta}</p>"
        return f"<section>{head}{text}<p class='error'>image unavailable: {esc(str(e))}</p></section>"
    thumb = ImageOps.contain(image, (THUMB, THUMB), Image.Resampling.LANCZOS)
    small = ImageOps.contain(image, (WORD_THUMB, WORD_THUMB), Image.Resampling.LANCZOS)
    alt = esc(row[schema.IMAGE_ID], quote=True)
    tokens = row[schema.TOKENS]
    words = "".join(
        f"<figure><img src='{data_uri(attention_overlay(small, att))}' alt='{esc(word, quote=True)}'>"
        f"<figcaption>{esc(word)}</figcaption></figure>"
        for word, att in zip(tokens, _check(tokens, row[schema.ATTENTION]), strict=True)
    )
    return (
        f"<section>{head}<div class='top'><img src='{data_uri(thumb)}' alt='{alt}'>"
        f"<div><p class='caption'>{caption}</p><p class='meta'>{meta}</p></div></div>"
        f"<div class='words'>{words}</div></section>"
    )


def write_report(predictions: str, output: str, n: int = 50, storage_options: dict[str, Any] | None = None) -> str:
    """Write one self-contained HTML page for the first `n` images by image id; returns `output`.

    Every picture is an inline base64 data URI and the style sheet is inline: no external assets.
    """
    if n < 1:
        raise ValueError(f"--n must be at least 1, got {n}")
    dataset = open_predictions(predictions, storage_options)
    keys = [(schema.IMAGE_ID, "ascending"), (schema.PATH, "ascending")]
    index = dataset.to_table(columns=[schema.IMAGE_ID, schema.PATH]).sort_by(keys)
    if index.num_rows == 0:
        raise ValueError(f"no predictions in {predictions}")
    chosen = index.column(schema.IMAGE_ID).slice(0, n)
    table = dataset.to_table(filter=pc.field(schema.IMAGE_ID).isin(chosen)).sort_by(keys).slice(0, n)
    items = "".join(_item(row, storage_options) for row in _rows(table))
    title = f"raycap captions: {table.num_rows} of {index.num_rows} images"
    page = (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p class='meta'>sorted by image id; heatmaps show where the model "
        f"looked while writing each word.</p>{items}</body></html>\n"
    )
    storage.write_bytes(output, page.encode("utf-8"), storage_options)
    return output
