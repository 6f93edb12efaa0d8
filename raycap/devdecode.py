"""JPEG decoding on the model's device (nvJPEG on CUDA) with images.decode_image as the per-image fallback."""

from __future__ import annotations

import io
import warnings

import pyarrow as pa
import torch
from PIL import Image

from raycap import images, schema, shards

# Which files the device may decode, read from the header alone (no pixel data): baseline or progressive
# JPEGs in RGB or grey, within the bomb guard, in any EXIF orientation (applied on the device, read by the
# CPU path's images._orientation). Every other file (other formats, CMYK, oversized, unreadable headers) and
# every JPEG the device decoder refuses takes the CPU path, images.decode_image, so modes, the bomb guard and
# error messages are exactly the CPU path's. A CUDA out-of-memory error is no refusal: it is raised.
_DEVICE_MODES = frozenset({"RGB", "L"})
# Full-resolution pixels decoded per decoder call: each chunk is resized to 299x299 before the next is decoded,
# so at most one chunk is alive (64 M pixels = 192 MB of RGB; a whole shard of 12 MP photos would be ~9 GB).
# A chunk always takes at least one image.
DECODE_CHUNK_PIXELS = 64 * 2**20


def device_decodable(data: bytes, max_pixels: int) -> tuple[int, int, int] | None:
    """(width, height, orientation) when the device decoder may take this file, else None (the CPU path decides).

    Width and height are the size after EXIF orientation (1..8), as images.decode_image records them."""
    try:
        with Image.open(io.BytesIO(data), formats=("JPEG",)) as img:
            width, height = img.size
            if img.mode not in _DEVICE_MODES or not 0 < width * height <= max_pixels:
                return None
            orientation = images._orientation(img)
    except Exception:  # noqa: BLE001 - anything unusual goes to the CPU path, which words the error
        return None
    if orientation in (5, 6, 7, 8):
        width, height = height, width
    return width, height, orientation


def decode_shard(shard: shards.Shard, device: torch.device | str, max_pixels: int) -> shards.Shard:
    """A shard of file bytes -> the same shard with pixels, a (N, 299, 299, 3) uint8 tensor on `device`.

    Images keep their order; files neither decoder can read become error rows (stage "decode")."""
    data = shard.meta.column(shards.DATA).to_pylist()
    headers = [device_decodable(d, max_pixels) for d in data]
    decoded = _decode_on_device(data, headers, device)
    errors = shard.errors.to_pydict()
    errors = (errors[schema.PATH], errors[schema.STAGE], errors[schema.ERROR])
    kept, pixels, widths, heights = [], [], [], []
    for i, raw in enumerate(data):
        image = decoded.get(i)
        if image is not None:
            pixels.append(image)
            width, height, _ = headers[i]
        else:
            try:
                cpu = images.decode_image(raw, max_pixels=max_pixels)
            except images.ImageError as e:
                shards.append_error(errors, shard.meta[schema.PATH][i].as_py(), e.stage, str(e))
                continue
            pixels.append(torch.from_numpy(cpu.pixels).to(device))
            width, height = cpu.width, cpu.height
        kept.append(i)
        widths.append(width)
        heights.append(height)
    meta = shard.meta.take(pa.array(kept, pa.int64())).drop_columns([shards.DATA])
    meta = meta.set_column(meta.schema.get_field_index(schema.WIDTH), schema.WIDTH, pa.array(widths, pa.int32()))
    meta = meta.set_column(meta.schema.get_field_index(schema.HEIGHT), schema.HEIGHT, pa.array(heights, pa.int32()))
    batch = torch.stack(pixels) if pixels else torch.zeros((0, *shards.PIXEL_SHAPE), dtype=torch.uint8, device=device)
    typed = pa.schema(list(shards.META_SCHEMA) + [f for f in meta.schema if f.name not in shards.META_SCHEMA.names])
    return shards.Shard(shard.shard, meta.cast(typed), shards.error_table(*errors), pixels=batch)


def _decode_on_device(
    data: list[bytes], headers: list[tuple[int, int, int] | None], device: torch.device | str
) -> dict[int, torch.Tensor]:
    """Index -> (299, 299, 3) uint8 upright pixels for each device-decodable file the decoder accepts, decoded
    in chunks of at most DECODE_CHUNK_PIXELS full-resolution pixels (one decoder call per chunk)."""
    chunks: list[list[int]] = []
    total = 0
    for i, header in enumerate(headers):
        if header is None:
            continue
        area = header[0] * header[1]
        if not chunks or total + area > DECODE_CHUNK_PIXELS:
            chunks.append([])
            total = 0
        chunks[-1].append(i)
        total += area
    out: dict[int, torch.Tensor] = {}
    for chunk in chunks:  # the chunk's full-size tensors die with this statement, before the next is decoded
        out.update(
            (i, orient(resize(image), headers[i][2]).permute(1, 2, 0))  # (299, 299, 3)
            for i, image in zip(chunk, decode_jpegs([data[i] for i in chunk], device))
            if image is not None
        )
    return out


def decode_jpegs(files: list[bytes], device: torch.device | str) -> list[torch.Tensor | None]:
    """Decode JPEGs to (3, H, W) uint8 on `device`, all in one call; None for each file the decoder refuses
    (after a refused batch, files are retried one by one so one bad file does not cost the others).
    torch.OutOfMemoryError is raised, never taken for a refusal."""
    if not files:
        return []
    from torchvision.io import ImageReadMode, decode_jpeg

    tensors = [torch.frombuffer(bytearray(f), dtype=torch.uint8) for f in files]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's deprecation notice for its image decoders
        try:
            return list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device))
        except torch.OutOfMemoryError:
            raise
        except RuntimeError:
            pass
        out: list[torch.Tensor | None] = []
        for t in tensors:
            try:
                out.append(decode_jpeg(t, mode=ImageReadMode.RGB, device=device))
            except torch.OutOfMemoryError:
                raise
            except RuntimeError:
                out.append(None)
        return out


def resize(image: torch.Tensor, size: int = schema.IMAGE_SIZE) -> torch.Tensor:
    """(3, H, W) uint8 -> (3, size, size) uint8, antialiased bilinear like Pillow's resize (no cropping)."""
    if image.shape[1:] == (size, size):
        return image
    x = torch.nn.functional.interpolate(
        image[None].float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True
    )
    return x[0].round_().clamp_(0, 255).to(torch.uint8)


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """(3, H, W) -> (3, H, W), or (3, W, H) for orientations 5-8: displayed upright for its EXIF orientation
    (images._TRANSPOSE's table as torch ops). Applied after resizing, as on the CPU path (the two commute)."""
    if orientation == 2:  # FLIP_LEFT_RIGHT
        image = image.flip(2)
    elif orientation == 3:  # ROTATE_180
        image = image.flip(1, 2)
    elif orientation == 4:  # FLIP_TOP_BOTTOM
        image = image.flip(1)
    elif orientation == 5:  # TRANSPOSE
        image = image.transpose(1, 2)
    elif orientation == 6:  # ROTATE_270: 90 degrees clockwise
        image = image.rot90(-1, (1, 2))
    elif orientation == 7:  # TRANSVERSE
        image = image.transpose(1, 2).flip(1, 2)
    elif orientation == 8:  # ROTATE_90: 90 degrees counter-clockwise
        image = image.rot90(1, (1, 2))
    return image
