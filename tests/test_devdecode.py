"""Decoding on the model's device (here device "cpu"): agreement with the Pillow path, routing, error rows."""

from __future__ import annotations

import io
import weakref

import numpy as np
import pytest
import torch
from PIL import Image

from raycap import devdecode, images, schema, shards
from raycap.encoder import FeatureExtractor

# Tolerance against images.decode_image, in 8-bit levels: mean |diff| <= 0.5 and max |diff| <= 4. Both paths
# run libjpeg-turbo's IDCT; they differ only in how they shrink to 299x299: Pillow decodes large JPEGs at a
# reduced DCT scale (draft) and resizes in fixed point, the device path decodes in full and resizes in float
# (antialiased bilinear, Pillow's filter). Measured here: mean 0.0-0.4, max 0-3 levels. A real mismatch
# (wrong channel order, orientation, no antialiasing, off-by-one-pixel resize) gives tens of levels.
MEAN_LEVELS, MAX_LEVELS = 0.5, 4
# Features: the tests' random-weight InceptionV3 amplifies any pixel change (+-1 level of dither moves its
# features by ~70% relative L2), so features from device pixels are held to differ from the Pillow path's no
# more than the Pillow pixels plus +-1 level of dither do. With trained weights bench/gpu.py checks them directly.


def _photo(width: int, height: int, mode: str = "RGB", seed: int = 0, **save) -> bytes:
    """Photo-like content: smooth colour fields with texture, so resizing and chroma subsampling matter."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    noise = Image.fromarray(np.clip(rng.normal(128, 12, (height // 4, width // 4, 3)), 0, 255).astype(np.uint8))
    img = Image.blend(img, noise.resize((width, height)), 0.3).convert(mode)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **save)
    return buf.getvalue()


def _shard(files: list[bytes]) -> shards.Shard:
    names = [f"f{i}.jpg" for i in range(len(files))]
    return shards.of_files(0, names, names, files)


@pytest.fixture(scope="module")
def photos() -> list[bytes]:
    sizes = [(640, 480, "RGB"), (1600, 1200, "RGB"), (299, 299, "RGB"), (300, 500, "L")]
    return [_photo(w, h, mode, seed=i) for i, (w, h, mode) in enumerate(sizes)]


def test_device_pixels_and_features_agree_with_the_pillow_path(photos):
    decoded = devdecode.decode_shard(_shard(photos), "cpu", images.DEFAULT_MAX_PIXELS)
    cpu = [images.decode_image(f) for f in photos]
    reference = np.stack([c.pixels for c in cpu])
    diff = np.abs(decoded.pixels.numpy().astype(int) - reference.astype(int))
    assert diff.mean() <= MEAN_LEVELS and diff.max() <= MAX_LEVELS, (diff.mean(), diff.max())
    assert decoded.meta[schema.WIDTH].to_pylist() == [c.width for c in cpu]
    assert decoded.meta[schema.HEIGHT].to_pylist() == [c.height for c in cpu]
    reference = reference[:2]  # the two resized ones; two images keep the encoder's cost small
    dithered = np.clip(reference + np.random.default_rng(0).integers(-1, 2, reference.shape), 0, 255)
    extractor = FeatureExtractor("random", precision="fp32", batch_size=2)
    theirs = extractor(reference)
    device_change = (extractor(decoded.pixels[:2]) - theirs).norm()
    assert device_change <= (extractor(dithered.astype(np.uint8)) - theirs).norm()


def test_files_the_device_may_not_take_go_through_the_cpu_path_exactly():
    png = io.BytesIO()
    Image.new("RGBA", (10, 10), (255, 0, 0, 128)).save(png, "PNG")
    cmyk = _photo(40, 30, "CMYK")
    files = [png.getvalue(), cmyk]
    assert [devdecode.device_decodable(f, images.DEFAULT_MAX_PIXELS) for f in files] == [None] * 2
    decoded = devdecode.decode_shard(_shard(files), "cpu", images.DEFAULT_MAX_PIXELS)
    for i, f in enumerate(files):
        cpu = images.decode_image(f)
        np.testing.assert_array_equal(decoded.pixels[i].numpy(), cpu.pixels)
        assert (decoded.meta[schema.WIDTH][i].as_py(), decoded.meta[schema.HEIGHT][i].as_py()) == (
            cpu.width,
            cpu.height,
        )


def _spy_decode_jpegs(monkeypatch) -> list[dict[str, int]]:
    """Record each devdecode.decode_jpegs call: files, decoded (not refused), full-resolution pixels, and how
    many full-resolution images of earlier calls are still alive when it starts."""
    calls: list[dict[str, int]] = []
    earlier: list[weakref.ref] = []
    real = devdecode.decode_jpegs

    def spy(files: list[bytes], device: torch.device | str) -> list[torch.Tensor | None]:
        alive = sum(ref() is not None for ref in earlier)
        out = real(files, device)
        images_ = [t for t in out if t is not None]
        pixels = sum(t.shape[1] * t.shape[2] for t in images_)
        calls.append({"files": len(files), "decoded": len(images_), "pixels": pixels, "alive": alive})
        earlier.extend(weakref.ref(t) for t in images_)
        return out

    monkeypatch.setattr(devdecode, "decode_jpegs", spy)
    return calls


def test_every_exif_orientation_is_decoded_on_the_device_as_on_the_cpu_path(monkeypatch):
    files = []
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        files.append(_photo(64, 40, seed=orientation, exif=exif))
    upright = [(64, 40)] * 4 + [(40, 64)] * 4  # orientations 5-8 turn the photo by 90 degrees
    headers = [devdecode.device_decodable(f, images.DEFAULT_MAX_PIXELS) for f in files]
    assert headers == [(*size, o) for size, o in zip(upright, range(1, 9))]
    calls = _spy_decode_jpegs(monkeypatch)
    decoded = devdecode.decode_shard(_shard(files), "cpu", images.DEFAULT_MAX_PIXELS)
    assert sum(c["decoded"] for c in calls) == 8  # all on the device, none through the CPU path
    for i, f in enumerate(files):
        cpu = images.decode_image(f)
        diff = np.abs(decoded.pixels[i].numpy().astype(int) - cpu.pixels.astype(int))
        assert diff.mean() <= MEAN_LEVELS and diff.max() <= MAX_LEVELS, (i + 1, diff.mean(), diff.max())
        assert (decoded.meta[schema.WIDTH][i].as_py(), decoded.meta[schema.HEIGHT][i].as_py()) == upright[i]
        assert upright[i] == (cpu.width, cpu.height)


def test_a_shard_is_decoded_in_chunks_within_the_pixel_budget(monkeypatch):
    sizes = [(200, 150), (160, 120), (400, 300), (120, 90), (180, 140), (100, 80)]  # 8,000 .. 120,000 pixels
    files = [_photo(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    whole = devdecode.decode_shard(_shard(files), "cpu", images.DEFAULT_MAX_PIXELS)  # the default budget: one call
    budget = 60_000  # the 400x300 photo is over it alone: a chunk always takes at least one image
    monkeypatch.setattr(devdecode, "DECODE_CHUNK_PIXELS", budget)
    calls = _spy_decode_jpegs(monkeypatch)
    chunked = devdecode.decode_shard(_shard(files), "cpu", images.DEFAULT_MAX_PIXELS)
    assert len(calls) > 1 and sum(c["decoded"] for c in calls) == len(files)
    assert all(c["pixels"] <= budget or c["files"] == 1 for c in calls), calls
    assert all(c["alive"] == 0 for c in calls), calls  # at most one chunk at full resolution at a time
    assert torch.equal(chunked.pixels, whole.pixels)
    assert chunked.meta.equals(whole.meta)


@pytest.mark.parametrize("where", ["batch", "per file"])
def test_cuda_out_of_memory_is_raised_not_taken_for_a_refused_file(monkeypatch, photos, where):
    import torchvision.io

    def decode_jpeg(data, mode, device):
        if isinstance(data, list) and where == "per file":
            raise RuntimeError("the batch is refused")  # the per-file retry then runs out of memory
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

    monkeypatch.setattr(torchvision.io, "decode_jpeg", decode_jpeg)
    with pytest.raises(torch.OutOfMemoryError):
        devdecode.decode_shard(_shard(photos[:2]), "cpu", images.DEFAULT_MAX_PIXELS)


def test_files_the_device_decoder_refuses_take_the_cpu_path(monkeypatch, photos):
    import torchvision.io

    def decode_jpeg(data, mode, device):
        raise RuntimeError("Unsupported marker type")

    monkeypatch.setattr(torchvision.io, "decode_jpeg", decode_jpeg)
    decoded = devdecode.decode_shard(_shard(photos[:2]), "cpu", images.DEFAULT_MAX_PIXELS)
    np.testing.assert_array_equal(decoded.pixels.numpy(), np.stack([images.decode_image(f).pixels for f in photos[:2]]))


def test_bad_files_are_error_rows_worded_as_on_the_cpu_path(photos):
    truncated = photos[0][: len(photos[0]) // 3]
    garbage = b"\xff\xd8\xff\xe0" + bytes(200)
    files = [photos[0], b"", garbage, truncated, photos[1]]
    decoded = devdecode.decode_shard(_shard(files), "cpu", max_pixels=1_000_000)  # photos[1] has 1.92 M pixels
    assert decoded.meta.schema.equals(shards.META_SCHEMA)
    kept = decoded.meta[schema.IMAGE_ID].to_pylist()
    errors = dict(zip(decoded.errors[schema.PATH].to_pylist(), decoded.errors[schema.ERROR].to_pylist()))
    assert set(kept) | set(errors) == {f"f{i}.jpg" for i in range(5)} and not set(kept) & set(errors)
    assert len(decoded.pixels) == len(kept) and "f0.jpg" in kept
    for i, f in enumerate(files):
        try:
            expected = images.decode_image(f, max_pixels=1_000_000)
        except images.ImageError as e:
            assert errors[f"f{i}.jpg"] == str(e)
        else:
            ours = decoded.pixels[kept.index(f"f{i}.jpg")].numpy()
            np.testing.assert_allclose(ours, expected.pixels, atol=MAX_LEVELS)
    assert "decompression bomb" in errors["f4.jpg"]


def test_a_refused_file_does_not_cost_the_rest_of_its_batch(photos):
    out = devdecode.decode_jpegs([photos[0], b"\xff\xd8 broken", photos[2]], "cpu")
    assert out[1] is None and out[0].shape == (3, 480, 640) and out[2].dtype == torch.uint8
