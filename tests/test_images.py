"""Unit tests of raycap.images: decoding, EXIF orientation, modes, bomb guard and errors as data."""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps, features

from raycap import images
from raycap.images import DEFAULT_MAX_PIXELS, DecodedImage, ImageError, decode_image
from raycap.schema import IMAGE_SIZE

RED, BLUE = (255, 0, 0), (0, 0, 255)


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def red_blue(width: int = 64, height: int = 32) -> Image.Image:
    """Left half red, right half blue."""
    arr = np.zeros((height, width, 3), np.uint8)
    arr[:, : width // 2] = RED
    arr[:, width // 2 :] = BLUE
    return Image.fromarray(arr)


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def png_header_only(width: int, height: int) -> bytes:
    """A 1-bit greyscale PNG declaring width x height whose pixel data is missing (a few dozen bytes)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    empty = zlib.compress(b"")
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", empty) + chunk(b"IEND", b"")


def close(actual, expected, tol: int = 12) -> bool:
    return bool(np.all(np.abs(np.asarray(actual, int) - np.asarray(expected, int)) <= tol))


def test_result_type_shape_and_original_size():
    out = decode_image(encode(noise(40, 30), "PNG"))
    assert isinstance(out, DecodedImage)
    assert out.pixels.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and out.pixels.dtype == np.uint8
    assert out.pixels.flags.c_contiguous and out.pixels.flags.writeable
    assert (out.width, out.height) == (40, 30)
    assert decode_image(encode(noise(40, 30), "PNG"), size=17).pixels.shape == (17, 17, 3)


def test_recognised_by_content_not_extension(tmp_path):
    path = tmp_path / "really_a_png.jpg"
    path.write_bytes(encode(red_blue(), "PNG"))
    out = decode_image(path.read_bytes())
    assert close(out.pixels[150, 10], RED, 0) and close(out.pixels[150, 290], BLUE, 0)


def test_text_file_is_not_an_image(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("hello, this is not a picture\n")
    with pytest.raises(ImageError) as err:
        decode_image(path.read_bytes())
    assert err.value.message.startswith("not an image: ")
    assert err.value.stage == "decode" and str(err.value) == err.value.message


def test_empty_bytes():
    with pytest.raises(ImageError, match="empty file"):
        decode_image(b"")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file_is_an_error_not_a_grey_image(fmt):
    data = encode(noise(200, 150), fmt)
    with pytest.raises(ImageError, match="truncated") as err:
        decode_image(data[: len(data) // 2])
    assert "\n" not in err.value.message
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # no global switch was flipped to get here


def test_truncated_header_is_named():
    data = encode(noise(20, 20), "PNG")
    with pytest.raises(ImageError, match="truncated or corrupt PNG header"):
        decode_image(data[:30])


def test_bomb_rejected_from_the_header_before_decoding(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # our guard must not rely on Pillow's
    data = png_header_only(20000, 20000)
    assert len(data) < 100
    with pytest.raises(ImageError) as err:
        decode_image(data, max_pixels=1_000_000)
    # Decoding the missing pixel data would have said "truncated": the header check came first.
    assert err.value.message.startswith("image has 20000 x 20000 = 400,000,000 pixels, over the limit of 1,000,000")
    with pytest.raises(ImageError, match="over the limit of 100,000,000"):
        decode_image(data)
    assert DEFAULT_MAX_PIXELS == 100_000_000


def test_bomb_guard_applies_to_a_real_image():
    data = encode(noise(100, 50), "PNG")
    with pytest.raises(ImageError, match=r"100 x 50 = 5,000 pixels, over the limit of 4,999"):
        decode_image(data, max_pixels=4_999)
    assert decode_image(data, max_pixels=5_000).width == 100


def test_pillow_decompression_bomb_error_becomes_image_error(monkeypatch):
    data = png_header_only(20000, 20000)
    with pytest.raises(ImageError, match="decompression bomb"):
        decode_image(data, max_pixels=10**12)  # Pillow's own default limit (~179 M) trips first
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageError, match="Pillow's decompression bomb limit"):
        decode_image(encode(noise(100, 100), "PNG"))  # 10,000 > 2 x 1,000: Pillow raises


def test_pillow_decompression_bomb_warning_as_error_becomes_image_error(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    data = encode(noise(40, 40), "PNG")  # 1,600 pixels: between Pillow's warning and error limits
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(ImageError, match="decompression bomb"):
            decode_image(data)


def test_large_jpeg_decodes_in_draft_mode_and_reports_original_size(monkeypatch):
    seen = []
    resize = Image.Image.resize

    def spy(self, *args, **kwargs):
        seen.append(self.size)
        return resize(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", spy)
    out = decode_image(encode(red_blue(2400, 1300), "JPEG", quality=90))
    assert (out.width, out.height) == (2400, 1300)
    assert seen == [(600, 325)]  # 1/4 scale: the largest that keeps both sides >= 299
    assert close(out.pixels[150, 20], RED, 20) and close(out.pixels[150, 280], BLUE, 20)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_exif_orientation_3_rotates_180(fmt):
    exif = Image.Exif()
    exif[0x0112] = 3
    out = decode_image(encode(red_blue(64, 32), fmt, exif=exif))
    assert (out.width, out.height) == (64, 32)
    assert close(out.pixels[150, 20], BLUE) and close(out.pixels[150, 280], RED)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_exif_orientation_6_rotates_90_clockwise_and_swaps_size(fmt):
    exif = Image.Exif()
    exif[0x0112] = 6
    out = decode_image(encode(red_blue(64, 32), fmt, exif=exif))
    assert (out.width, out.height) == (32, 64)  # displayed upright: portrait
    assert close(out.pixels[20, 150], RED) and close(out.pixels[280, 150], BLUE)  # left side went on top


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_orientation_matches_pillow_exif_transpose(orientation):
    rng = np.random.default_rng(orientation)
    small = rng.integers(0, 256, (6, 9, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((90, 60), Image.Resampling.BICUBIC)  # smooth, asymmetric
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(img, "PNG", exif=exif)
    upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    expected = np.asarray(upright.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR))
    out = decode_image(data)
    assert (out.width, out.height) == upright.size
    assert np.abs(out.pixels.astype(int) - expected).max() <= 3


def test_resize_is_the_whole_image_bilinear_without_crop():
    img = noise(120, 40)
    expected = np.asarray(img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(decode_image(encode(img, "PNG")).pixels, expected)


def test_wide_image_is_squashed_not_cropped():
    arr = np.zeros((50, 400, 3), np.uint8)
    arr[:, :40] = RED  # the left tenth
    arr[:, 40:] = BLUE
    out = decode_image(encode(Image.fromarray(arr), "PNG")).pixels
    assert close(out[150, 5], RED, 0) and close(out[150, 25], RED, 0)  # still ~30 columns of red
    assert close(out[150, 40], BLUE, 0) and close(out[150, 298], BLUE, 0)


@pytest.mark.parametrize("fmt", ["CMYK-JPEG", "CMYK-TIFF"])
def test_cmyk_becomes_rgb(fmt):
    img = Image.new("CMYK", (30, 20), (0, 255, 255, 0))  # red in CMYK
    out = decode_image(encode(img, fmt.split("-")[1])).pixels
    assert close(out[150, 150], RED, 3)


def test_greyscale_becomes_grey_rgb():
    img = Image.fromarray(np.tile(np.arange(0, 256, 4, dtype=np.uint8), (8, 1)), "L")
    out = decode_image(encode(img, "PNG")).pixels
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 1], out[..., 2])
    assert out[100, 2, 0] < 10 and out[100, 296, 0] > 240


SIXTEEN_BIT_CASES = [("I;16", "PNG"), ("I;16", "TIFF"), ("I;16B", "TIFF"), ("I", "TIFF")]


@pytest.mark.parametrize(("mode", "fmt"), SIXTEEN_BIT_CASES)
def test_sixteen_bit_is_rescaled_not_saturated(mode, fmt):
    ramp = np.linspace(0, 65535, 256).round().astype(np.uint16)
    arr = np.tile(ramp, (4, 1))
    if mode == "I":
        img = Image.fromarray(arr.astype(np.int32), "I")
    else:  # Pillow's convert() to I;16B clips, so build the big-endian bytes directly
        img = Image.frombytes(mode, (256, 4), arr.astype(">u2" if mode == "I;16B" else "<u2").tobytes())
    assert Image.open(io.BytesIO(encode(img, fmt))).mode == mode
    row = decode_image(encode(img, fmt), size=256).pixels[2, :, 0].astype(int)
    assert row[0] <= 2 and row[-1] >= 253 and 110 < row[128] < 145
    assert np.all(np.diff(row) >= 0) and len(set(row.tolist())) > 200  # a gradient, not a white block


def test_32_bit_integer_range_follows_the_data():
    eight_bit = np.tile(np.arange(0, 256, dtype=np.int32), (4, 1))
    row = decode_image(encode(Image.fromarray(eight_bit, "I"), "TIFF"), size=256).pixels[2, :, 0]
    assert row.tolist() == list(range(256))  # 8-bit data in a 32-bit image is not darkened 257-fold
    wide = np.array([[-7, 0, 2**30, 2**31 - 1]] * 2, dtype=np.int32)
    row = decode_image(encode(Image.fromarray(wide, "I"), "TIFF"), size=4).pixels[1, :, 0]
    assert row.tolist() == [0, 0, 128, 255]


def test_bytes_like_input():
    data = encode(red_blue(), "PNG")
    for view in (bytearray(data), memoryview(data)):
        assert close(decode_image(view).pixels[150, 10], RED, 0)
    with pytest.raises(ImageError, match="not an image"):
        decode_image(memoryview(b"plain text, not pixels"))


def test_float_image_is_scaled_or_clipped():
    unit = np.tile(np.linspace(0.0, 1.0, 64, dtype=np.float32), (4, 1))
    row = decode_image(encode(Image.fromarray(unit, "F"), "TIFF"), size=64).pixels[1, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255 and 120 <= row[32] <= 135
    wild = np.array([[-50.0, 100.0, 1000.0, np.nan]] * 4, dtype=np.float32)
    row = decode_image(encode(Image.fromarray(wild, "F"), "TIFF"), size=4).pixels[1, :, 0]
    assert row.tolist()[:3] == [0, 100, 255]


def test_one_bit_image():
    arr = np.zeros((20, 20), bool)
    arr[:, 10:] = True
    out = decode_image(encode(Image.fromarray(arr), "PNG")).pixels
    assert close(out[100, 20], (0, 0, 0), 0) and close(out[100, 280], (255, 255, 255), 0)


def test_palette_with_transparency_is_composited_over_white():
    img = Image.new("P", (20, 20), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.paste(1, (10, 0, 20, 20))  # right half red, left half index 0 (transparent)
    data = encode(img, "PNG", transparency=0)
    assert Image.open(io.BytesIO(data)).mode == "P"
    out = decode_image(data).pixels
    assert close(out[100, 20], (255, 255, 255), 0) and close(out[100, 280], RED, 0)


def test_palette_without_transparency():
    img = Image.new("RGB", (20, 20), (0, 128, 0)).quantize(4)
    assert img.mode == "P"
    assert close(decode_image(encode(img, "PNG")).pixels[150, 150], (0, 128, 0), 2)


@pytest.mark.parametrize(("mode", "key", "other"), [("RGB", (255, 0, 0), (0, 0, 255)), ("L", 0, 90)])
def test_colour_key_transparency_is_composited_over_white(mode, key, other):
    img = Image.new(mode, (20, 20), key)
    img.paste(other, (10, 0, 20, 20))
    data = encode(img, "PNG", transparency=key)
    assert "transparency" in Image.open(io.BytesIO(data)).info
    out = decode_image(data).pixels
    assert close(out[100, 20], (255, 255, 255), 0)
    assert close(out[100, 280], other if mode == "RGB" else (other,) * 3, 0)


def test_rgba_is_composited_over_white():
    img = Image.new("RGBA", (20, 20), (255, 0, 0, 128))
    img.paste((0, 0, 255, 0), (10, 0, 20, 20))  # fully transparent blue: must vanish
    out = decode_image(encode(img, "PNG")).pixels
    assert close(out[100, 20], (255, 127, 127), 2)
    assert close(out[100, 280], (255, 255, 255), 0)


def test_la_is_composited_over_white():
    img = Image.new("LA", (20, 20), (0, 255))
    img.paste((0, 0), (10, 0, 20, 20))
    out = decode_image(encode(img, "PNG")).pixels
    assert close(out[100, 20], (0, 0, 0), 0) and close(out[100, 280], (255, 255, 255), 0)


def test_animated_gif_gives_the_first_frame():
    frames = [Image.new("RGB", (16, 16), c) for c in (RED, BLUE, (0, 255, 0))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    assert close(decode_image(data).pixels[150, 150], RED, 0)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF"])
def test_formats_round_trip(fmt):
    if fmt == "WEBP" and not features.check("webp"):
        pytest.skip("Pillow built without WebP")
    kwargs = {"lossless": True} if fmt == "WEBP" else {}
    out = decode_image(encode(red_blue(80, 40), fmt, **kwargs))
    assert (out.width, out.height) == (80, 40)
    assert close(out.pixels[150, 20], RED, 15) and close(out.pixels[150, 280], BLUE, 15)


def test_eps_is_refused_without_running_ghostscript():
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    with pytest.raises(ImageError, match="not an image"):
        decode_image(eps)


def test_other_pillow_errors_become_one_line_image_errors(monkeypatch):
    def explode(self, *args, **kwargs):
        raise RuntimeError("resampler broke\n" + "x" * 1000)

    monkeypatch.setattr(Image.Image, "resize", explode)
    with pytest.raises(ImageError) as err:
        decode_image(encode(noise(20, 20), "PNG"))
    message = err.value.message
    assert message.startswith("RuntimeError: resampler broke x") and "\n" not in message
    assert len(message) <= 300


def test_corrupt_exif_does_not_fail_a_good_image():
    img = red_blue()
    out = decode_image(encode(img, "JPEG", exif=b"Exif\x00\x00garbage-not-tiff"))
    assert (out.width, out.height) == img.size


def test_allowed_formats_exclude_eps_only():
    allowed = set(images._formats())
    Image.init()
    assert set(Image.ID) - allowed == {"EPS"}
