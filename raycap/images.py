"""Decode one image file to a uint8 299x299 RGB array (EXIF, modes, bomb guard); errors as ImageError."""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from raycap.schema import IMAGE_SIZE

# Refuse images whose header declares more pixels than this before decoding a byte of pixel data:
# a 100-megapixel RGB image already needs 300 MB decoded, and a few-KB PNG can declare billions.
# Pillow's own global Image.MAX_IMAGE_PIXELS (~89 M; error above twice that) is not relied on, but it
# still applies on top: raise it (or set it to None) to accept images beyond ~179 M pixels.
DEFAULT_MAX_PIXELS: int = 100_000_000

_MAX_MESSAGE = 300  # characters of an error message kept in the errors table
_UNSAFE_FORMATS = frozenset({"EPS"})  # loading runs Ghostscript, an external interpreter, on untrusted input
_ORIENTATION_TAG = 0x0112
# EXIF orientation -> the transpose that displays it upright (the table ImageOps.exif_transpose uses).
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SIGNATURES = (  # only to word the error for a file Pillow could not identify
    (b"\x89PNG", "PNG"),
    (b"\xff\xd8", "JPEG"),
    (b"GIF8", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"RIFF", "RIFF/WebP"),
)
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_WHITE = (255, 255, 255)


class ImageError(Exception):
    """A bad image: ``stage`` says where it failed (``decode``), ``message`` is one readable line."""

    def __init__(self, message: str, stage: str = "decode"):
        super().__init__(message)
        self.message = message
        self.stage = stage


@dataclass(frozen=True)
class DecodedImage:
    """A decoded, resized image and its original size (after EXIF orientation)."""

    pixels: np.ndarray  # (size, size, 3) uint8, RGB, C-contiguous
    width: int  # original width after EXIF orientation
    height: int


def decode_image(data: bytes, size: int = IMAGE_SIZE, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Decode an image file's bytes (format from content, not name) to ``size`` x ``size`` RGB.

    ``data`` may be any bytes-like buffer (bytes, bytearray, memoryview); it is not copied.

    EXIF orientation is applied, every mode becomes 8-bit RGB (alpha over white, 16-bit and float
    rescaled), animations give their first frame, and the whole image is resized without cropping
    (aspect not preserved) with Pillow's antialiased bilinear filter. Large JPEGs are decoded at a
    reduced DCT scale that still leaves each side at least ``size``. Raises :class:`ImageError`.
    """
    if not data:
        raise ImageError("empty file (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data), formats=_formats())
    except UnidentifiedImageError:
        prefix = bytes(data[:12])
        start = f"{len(data):,} bytes starting {prefix!r}"
        known = next((name for magic, name in _SIGNATURES if prefix.startswith(magic)), None)
        if known:
            raise ImageError(f"truncated or corrupt {known} header: Pillow cannot read {start}") from None
        raise ImageError(f"not an image: no known image format matches {start}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"image over Pillow's decompression bomb limit: {_one_line(str(e))}") from None
    except Exception as e:
        raise ImageError(f"truncated or corrupt image: {_describe(e)}") from None
    try:
        with img:
            return _decode(img, size, max_pixels)
    except ImageError:
        raise
    except Exception as e:
        raise ImageError(_describe(e)) from None


@functools.cache
def _formats() -> tuple[str, ...]:
    """Every format Pillow can open here except the unsafe ones (first call imports all plugins)."""
    Image.init()
    return tuple(f for f in Image.ID if f not in _UNSAFE_FORMATS)


def _decode(img: Image.Image, size: int, max_pixels: int) -> DecodedImage:
    width, height = img.size  # from the header: nothing is decoded yet
    if width <= 0 or height <= 0:
        raise ImageError(f"image has no pixels ({width} x {height})")
    if width * height > max_pixels:
        raise ImageError(
            f"image has {width} x {height} = {width * height:,} pixels, over the limit of "
            f"{max_pixels:,} (a possible decompression bomb)"
        )
    orientation = _orientation(img)
    if orientation in (5, 6, 7, 8):
        width, height = height, width
    img.draft("RGB", (size, size))  # JPEG only: decode at 1/2, 1/4 or 1/8 scale, each side still >= size
    try:
        img.load()
    except Exception as e:
        raise ImageError(f"truncated or corrupt image: {_describe(e)}") from None
    img = _to_working_mode(img)
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    if img.mode != "RGB":
        img = _composite_over_white(img) if img.mode == "RGBA" else img.convert("RGB")
    if orientation in _TRANSPOSE:  # transposing the small image equals resizing the transposed one
        img = img.transpose(_TRANSPOSE[orientation])
    pixels = np.array(img, dtype=np.uint8)  # writable (np.asarray's view of Pillow's bytes is read-only)
    return DecodedImage(pixels=pixels, width=width, height=height)


def _orientation(img: Image.Image) -> int:
    """EXIF (or XMP) orientation 1..8; 1 when absent or unreadable (a broken EXIF is not a bad image)."""
    try:
        value = img.getexif().get(_ORIENTATION_TAG, 1)
        return int(value) if 1 <= int(value) <= 8 else 1
    except Exception:
        return 1


def _to_working_mode(img: Image.Image) -> Image.Image:
    """Reduce any mode to L, RGB or RGBA (RGBA only where there is transparency to composite)."""
    mode = img.mode
    if mode in ("RGB", "L"):
        return img.convert("RGBA") if "transparency" in img.info else img
    if mode == "P":
        return img.convert("RGBA" if "transparency" in img.info else "RGB")
    if mode in _ALPHA_MODES:
        return img.convert("RGBA")
    if mode == "1":
        return img.convert("L")
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        return _integer_to_l(np.asarray(img), sixteen_bit=mode != "I")
    if mode == "F":
        return _float_to_l(np.asarray(img))
    return img.convert("RGB")  # CMYK, YCbCr, RGBX, ...


def _integer_to_l(values: np.ndarray, sixteen_bit: bool) -> Image.Image:
    """Rescale 16- or 32-bit integer grey levels to 8 bits by their bit range (not Pillow's clipping).

    ``I;16*`` modes are 16-bit: ``v * 255 / 65535``. Mode ``I`` (32-bit signed) holds 8-, 16- or
    wider data depending on the source, so its range is the smallest of 8, 16 or 31 bits that holds
    the largest value; negative values become 0.
    """
    if sixteen_bit:
        top = 65535
    else:
        values = np.maximum(values, 0)
        peak = int(values.max())
        top = 255 if peak <= 255 else 65535 if peak <= 65535 else 2**31 - 1
    scaled = values.astype(np.float32)
    scaled *= np.float32(255.0 / top)
    scaled += np.float32(0.5)
    return Image.fromarray(scaled.astype(np.uint8), "L")


def _float_to_l(values: np.ndarray) -> Image.Image:
    """Float grey levels: data within [0, 1] is scaled by 255, anything else clipped to [0, 255]; NaN is 0."""
    values = np.nan_to_num(values.astype(np.float32), nan=0.0, posinf=255.0, neginf=0.0, copy=False)
    if float(values.min()) >= 0.0 and float(values.max()) <= 1.0:
        values *= np.float32(255.0)
    np.clip(values, 0.0, 255.0, out=values)
    values += np.float32(0.5)
    return Image.fromarray(values.astype(np.uint8), "L")


def _composite_over_white(img: Image.Image) -> Image.Image:
    """Blend an RGBA image over a white background (after resizing, which Pillow does premultiplied)."""
    background = Image.new("RGB", img.size, _WHITE)
    background.paste(img, mask=img.getchannel("A"))
    return background


def _describe(e: BaseException) -> str:
    return _one_line(f"{type(e).__name__}: {e}")


def _one_line(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 1] + "…"
