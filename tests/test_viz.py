"""Tests of raycap.viz: heatmap overlays, the per-word figure, `show` and the HTML report."""

from __future__ import annotations

import base64
import html
import io
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from raycap import viz
from tests.helpers import HANG_SECONDS, write_predictions


def one_hot(cell: int) -> np.ndarray:
    row = np.zeros(64, np.float32)
    row[cell] = 1.0
    return row


def is_red(pixel: np.ndarray) -> bool:
    r, g, b = (int(v) for v in pixel)
    return r > 100 and r > g + 50 and r > b + 50


def cell_centre(cell: int, size: tuple[int, int]) -> tuple[int, int]:
    """(x, y) pixel at the centre of grid cell `cell` in an image of `size`."""
    row, col = divmod(cell, 8)
    return int((col + 0.5) * size[0] / 8), int((row + 0.5) * size[1] / 8)


def test_jet_runs_blue_to_red() -> None:
    cold, mid, hot = viz.jet(np.array([0.0, 0.5, 1.0]))
    assert cold[2] > 100 and cold[0] == cold[1] == 0
    assert mid[1] == 255
    assert hot[0] > 100 and hot[1] == hot[2] == 0


def test_overlay_is_red_where_attention_is_and_blue_elsewhere() -> None:
    image = Image.new("RGB", (96, 64), (128, 128, 128))
    overlay = viz.attention_overlay(image, one_hot(8 * 2 + 5))
    assert overlay.size == image.size and overlay.mode == "RGB"
    px = np.asarray(overlay)
    x, y = cell_centre(21, image.size)
    assert is_red(px[y, x])
    x, y = cell_centre(62, image.size)
    assert px[y, x, 2] > px[y, x, 0] + 50  # far away: blue
    with pytest.raises(ValueError):
        viz.attention_overlay(image, np.ones(63))


def test_figure_has_a_panel_per_word_with_heat_in_the_right_place() -> None:
    image = Image.new("RGB", (120, 90), (128, 128, 128))
    small = viz.attention_figure(image, ["a", "b"], np.full((2, 64), 1 / 64))
    big = viz.attention_figure(image, [f"w{i}" for i in range(9)], np.full((9, 64), 1 / 64))
    assert big.width > small.width and big.height > small.height
    tokens = ["a", "red", "circle"]
    attention = np.stack([np.full(64, 1 / 64), np.full(64, 1 / 64), one_hot(0)])
    figure = np.asarray(viz.attention_figure(image, tokens, attention))
    panel = (viz.PANEL, viz.PANEL * 90 // 120)

    def panel_pixels(k: int) -> np.ndarray:  # panel k (0 = the image) without its label
        x = viz.PAD + k * (panel[0] + viz.PAD)
        y = viz.PAD + viz.LABEL
        return figure[y : y + panel[1], x : x + panel[0]]

    cx, cy = cell_centre(0, panel)
    assert is_red(panel_pixels(3)[cy, cx])
    assert not any(is_red(p) for p in panel_pixels(2).reshape(-1, 3))  # uniform attention: no hot spot
    assert (panel_pixels(0) == 128).all()  # the first panel is the plain image
    labels = figure[viz.PAD : viz.PAD + viz.LABEL, viz.PAD + panel[0] + viz.PAD :]
    assert (labels < 100).any()  # a word is drawn above the word panels
    with pytest.raises(ValueError, match="per token"):
        viz.attention_figure(image, ["a"], np.full((2, 64), 1 / 64))


def test_open_image_applies_exif_orientation(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    Image.new("RGB", (60, 40), "white").save(tmp_path / "r.jpg", exif=exif)
    assert viz.open_image(str(tmp_path / "r.jpg")).size == (40, 60)


def test_show_writes_the_figure_for_an_id_or_basename(tmp_path: Path) -> None:
    src = tmp_path / "images" / "cats" / "a.png"
    src.parent.mkdir(parents=True)
    Image.new("RGB", (64, 48), (10, 200, 10)).save(src)
    rows = [
        {"image_id": "cats/a.png", "path": str(src), "caption": "a green thing"},
        {"image_id": "cats/b.png", "path": str(src), "caption": "b"},
    ]
    preds = str(write_predictions(tmp_path / "out" / "captions" / "p.parquet", rows))
    out = viz.show(str(tmp_path / "out"), "cats/a.png", str(tmp_path / "figs" / "a.png"))
    with Image.open(out) as fig:
        assert fig.format == "PNG"
        expected = viz.attention_figure(Image.open(src), ["a", "green", "thing"], np.full((3, 64), 1 / 64))
        assert fig.size == expected.size
    with Image.open(viz.show(preds, "a.png", str(tmp_path / "b.png"))) as fig:
        assert fig.size == expected.size
    with Image.open(viz.show(preds, str(src), str(tmp_path / "c.png"))) as fig:  # by path
        assert fig.size == expected.size
    with pytest.raises(ValueError, match="no prediction"):
        viz.show(preds, "dogs/z.png", str(tmp_path / "z.png"))


def test_report_is_self_contained_and_escaped(tmp_path: Path) -> None:
    paths = []
    for i, colour in enumerate(["red", "blue", "green"]):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (600, 300), colour).save(paths[-1])
    rows = [
        {"image_id": "c.png", "path": str(paths[2]), "caption": "never shown"},
        {"image_id": "a.png", "path": str(paths[0]), "caption": "a <b>red</b> & wide", "model_id": "m<1>"},
        {"image_id": "b.png", "path": str(paths[1]), "caption": "blue \"quoted\" 'word'"},
        {"image_id": "b0.png", "path": str(tmp_path / "missing.png"), "caption": "lost image"},
    ]
    preds = write_predictions(tmp_path / "p.parquet", rows)
    out = viz.write_report(str(preds), str(tmp_path / "report" / "index.html"), n=3)
    page = Path(out).read_text(encoding="utf-8")
    for caption in ("a <b>red</b> & wide", "blue \"quoted\" 'word'", "lost image"):
        assert html.escape(caption) in page
    assert "<b>red</b>" not in page and "never shown" not in page
    assert "model m&lt;1&gt;" in page and "m<1>" not in page  # the model id is escaped too
    assert page.index("a.png") < page.index("b.png") < page.index("b0.png")
    imgs = re.findall(r"<img\b[^>]*>", page)
    assert len(imgs) == (1 + 4) + (1 + 3)  # the missing image has no pictures, only its caption and an error
    assert "image unavailable" in page
    assert not re.search(r"""(?:src|href)\s*=\s*['"](?!data:)""", page)
    assert "<script" not in page and "<link" not in page
    uris = re.findall(r"src='data:image/(\w+);base64,([A-Za-z0-9+/=]+)'", page)
    assert len(uris) == len(imgs)
    sizes = []
    for _, payload in uris:
        with Image.open(io.BytesIO(base64.b64decode(payload))) as img:
            img.load()
            sizes.append(img.size)
    assert sizes[0] == (256, 128)  # the image thumbnail, at most 256 px
    assert all(max(s) <= 256 for s in sizes)
    with pytest.raises(ValueError):
        viz.write_report(str(preds), str(tmp_path / "x.html"), n=0)


def test_report_opens_in_headless_chromium_with_every_image_loaded(tmp_path: Path) -> None:
    """The gallery as a person sees it: Debian's chromium (installed by .ci/run) loads every picture.

    Without chromium the test is skipped and says why, except in CI (CI or RAYCAP_REQUIRE_CHROMIUM set), where
    a skipped browser check would hide a broken report, so it fails.
    """
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if not browser:
        reason = "needs chromium on PATH: apt-get install chromium (.ci/run does)"
        if os.environ.get("RAYCAP_REQUIRE_CHROMIUM") or os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    rows = []
    for i in range(3):
        path = tmp_path / f"img{i}.png"
        Image.new("RGB", (64, 48), (40 * i, 100, 200)).save(path)
        rows.append({"image_id": path.name, "path": str(path), "caption": f"a <b>shape</b> number {i}"})
    predictions = write_predictions(tmp_path / "out", rows)
    report = Path(viz.write_report(str(predictions), str(tmp_path / "report.html")))
    probe = tmp_path / "probe.html"
    check = (
        "<script>window.addEventListener('load', () => { const imgs = [...document.images]; "
        "document.body.dataset.loaded = imgs.filter(i => i.complete && i.naturalWidth > 0).length; "
        "document.body.dataset.total = imgs.length; });</script>"
    )
    probe.write_text(report.read_text().replace("</body>", check + "</body>"))
    done = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--virtual-time-budget=5000",
            "--dump-dom",
            probe.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=HANG_SECONDS,
    )
    dom = done.stdout
    loaded = re.search(r'data-loaded="(\d+)"', dom)
    total = re.search(r'data-total="(\d+)"', dom)
    assert loaded and total, done.stderr[-2000:]
    assert int(total.group(1)) > 3 and loaded.group(1) == total.group(1)  # pictures and heatmaps all decode
    for i in range(3):
        assert html.escape(f"a <b>shape</b> number {i}") in dom
