"""JPEG decoding on the model's device (nvJPEG on CUDA) with images.decode_image as the per-image fallback."""

from __future__ import annotations

import io
import warnings

import pyarrow as pa
import torch
from PIL import Image

from raycap import images, schema, shards

# Which files the device may decode, read from the header alone (no pixel data): baseline or progressive
# JPEGs in RGB or grey, upright (EXIF orientation 1), within the bomb guard. Every other file (other formats,
# CMYK, rotated, oversized, unreadable headers) and every JPEG the device decoder refuses takes the CPU path,
# images.decode_image, so orientation, modes, the bomb guard and error messages are exactly the CPU path's.
_DEVICE_MODES = frozenset({"RGB", "L"})


def device_decodable(data: bytes, max_pixels: int) -> tuple[int, int] | None:
    """(width, height) when the device decoder may take this file, else None (the CPU path decides)."""
    try:
        with Image.open(io.BytesIO(data), formats=("JPEG",)) as img:
            width, height = img.size
            if img.mode not in _DEVICE_MODES or not 0 < width * height <= max_pixels:
                return None
            if img.getexif().get(0x0112, 1) != 1:
                return None
            return width, height
    except Exception:  # noqa: BLE001 - anything unusual goes to the CPU path, which words the error
        return None


def decode_shard(shard: shards.Shard, device: torch.device | str, max_pixels: int) -> shards.Shard:
    """A shard of file bytes -> the same shard with pixels, a (N, 299, 299, 3) uint8 tensor on `device`.

    Images keep their order; files neither decoder can read become error rows (stage "decode")."""
    data = shard.meta.column(shards.DATA).to_pylist()
    sizes = [device_decodable(d, max_pixels) for d in data]
    on_device = [i for i, s in enumerate(sizes) if s is not None]
    decoded: dict[int, torch.Tensor] = dict(zip(on_device, decode_jpegs([data[i] for i in on_device], device)))
    errors = shard.errors.to_pydict()
    errors = (errors[schema.PATH], errors[schema.STAGE], errors[schema.ERROR])
    kept, pixels, widths, heights = [], [], [], []
    for i, raw in enumerate(data):
        image = decoded.get(i)
        if image is not None:
            pixels.append(resize(image))
            width, height = sizes[i]
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
    return shards.Shard(shard.shard, meta.cast(shards.META_SCHEMA), shards.error_table(*errors), pixels=batch)


def decode_jpegs(files: list[bytes], device: torch.device | str) -> list[torch.Tensor | None]:
    """Decode JPEGs to (3, H, W) uint8 on `device`, all in one call; None for each file the decoder refuses
    (after a refused batch, files are retried one by one so one bad file does not cost the others)."""
    if not files:
        return []
    from torchvision.io import ImageReadMode, decode_jpeg

    tensors = [torch.frombuffer(bytearray(f), dtype=torch.uint8) for f in files]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision's deprecation notice for its image decoders
        try:
            return list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            out: list[torch.Tensor | None] = []
            for t in tensors:
                try:
                    out.append(decode_jpeg(t, mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    out.append(None)
            return out


def resize(image: torch.Tensor, size: int = schema.IMAGE_SIZE) -> torch.Tensor:
    """(3, H, W) uint8 -> (size, size, 3) uint8, antialiased bilinear like Pillow's resize (no cropping)."""
    if image.shape[1:] != (size, size):
        x = torch.nn.functional.interpolate(
            image[None].float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )
        image = x[0].round_().clamp_(0, 255).to(torch.uint8)
    return image.permute(1, 2, 0)
