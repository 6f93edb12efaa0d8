"""InceptionV3 feature extractor: weight resolution (imagenet | random | path or URI), preprocessing, device, layout."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import os
import tempfile
from collections import OrderedDict
from contextlib import AbstractContextManager, nullcontext, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from raycap import storage
from raycap.config import PRECISIONS
from raycap.schema import FEATURE_DIM, NUM_REGIONS

WEIGHT_CHOICES = ("imagenet", "random", "a path or URI of a state dict (.safetensors or .pt/.pth)")
RANDOM_SEED = 0  # `random` weights are a pure function of this seed: every run builds the same encoder
_CALIBRATION_IMAGES = 16  # images of the random trunk's calibration pass (with 4 the demo learned less)
CACHE_ENV = "RAYCAP_CACHE_DIR"  # where the random trunk is kept between commands (default ~/.cache/raycap)
_LAST_CONV = "Mixed_7c"
_HEAD = ("AuxLogits", "avgpool", "dropout", "fc")


def preprocess(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 images (B, 299, 299, 3) -> float (B, 3, 299, 299) in [-1, 1].

    This is what InceptionV3's original (TensorFlow) weights expect and what the TF tutorial feeds.
    torchvision's IMAGENET1K_V1 weights are those weights: their transform normalises with the ImageNet
    mean/std and the model's `transform_input=True` maps that back to (x - 0.5) / 0.5, i.e. [-1, 1].
    We skip the round trip (transform_input=False) and scale directly; tests pin the equivalence.
    """
    return pixels.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def cpu_supports_bf16() -> bool:
    """Whether this CPU runs bf16 matmuls natively (AMX or AVX512-BF16); elsewhere bf16 is emulated and slow."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return any(f in flags for f in (" amx_bf16", " avx512_bf16"))


def cpu_description() -> str:
    """The CPU's model name, core count and the flags that decide bf16 speed, for benchmark reports."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return f"unknown CPU, {os.cpu_count()} cores"
    name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    wanted = ", ".join(f"{f}={'yes' if f in flags else 'no'}" for f in ("avx2", "avx512_bf16", "amx_bf16"))
    return f"{name}, {os.cpu_count()} cores ({wanted})"


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # fp32 runs without autocast


def select_precision(requested: str, device_type: str, bf16_supported: bool, training: bool = False) -> str:
    """`--precision` -> what a model runs in on this device: bf16 | fp16 | fp32 (pure: support is an argument).

    auto on CUDA: bf16 where the GPU has it natively (compute capability 8+: A100, L4, H100), else fp16 (T4, V100;
    training then scales the loss). auto on a CPU: bf16 only with native bf16 (AMX, AVX512-BF16), and fp32 in
    training. An explicit bf16 on a GPU without it is a user mistake (one ValueError line); on a CPU an explicit
    bf16 or fp16 is honoured, emulated where not native (slow, as asked).
    """
    if requested not in PRECISIONS:
        raise ValueError(f"--precision must be auto, fp32, bf16 or fp16, got {requested!r}")
    if device_type == "cuda":
        if requested == "bf16" and not bf16_supported:
            raise ValueError("--precision bf16: this GPU has no native bf16 (e.g. T4, V100); use fp16, fp32 or auto")
        if requested == "auto":
            return "bf16" if bf16_supported else "fp16"
        return requested
    if requested == "auto":
        return "bf16" if bf16_supported and not training else "fp32"
    return requested


def resolve_precision(precision: str, device: torch.device, training: bool = False) -> str:
    """`select_precision` with this device's bf16 support (on CUDA: native only, emulation does not count)."""
    bf16 = torch.cuda.is_bf16_supported(including_emulation=False) if device.type == "cuda" else cpu_supports_bf16()
    return select_precision(precision, device.type, bf16, training)


def autocast(precision: str, device_type: str) -> AbstractContextManager:
    """The autocast context of a resolved precision (bf16 | fp16); fp32 runs as is."""
    if precision in AUTOCAST_DTYPES:
        return torch.autocast(device_type, dtype=AUTOCAST_DTYPES[precision])
    return nullcontext()


@dataclass(frozen=True)
class EncoderWeights:
    """Encoder weights resolved once (on the driver): what the user asked for and the trunk's tensors.

    Small to ship: the driver puts it in Ray's object store and every actor builds its trunk from it,
    so no actor downloads or opens a file.
    """

    spec: str  # imagenet | random | the path or URI the user gave
    safetensors: bytes  # the trunk's state dict as safetensors bytes (for `random`: seeded and calibrated)


def _skeleton(init: bool = True) -> nn.Module:
    """torchvision's InceptionV3; `init`: its seeded random initialisation, else uninitialised on the meta device
    (to be loaded with `assign=True`)."""
    import torchvision  # here, not at the top: the training workers use this module's precision helpers only

    if not init:  # on the meta device: no memory, no initialisation (every tensor the trunk keeps is loaded)
        with torch.device("meta"):
            return torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False)
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(RANDOM_SEED)
    try:
        return torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=True)
    finally:
        torch.random.set_rng_state(gen_state)


@functools.cache
def _random_weights() -> EncoderWeights:
    """The seeded, calibrated random trunk, built once per process and shipped like any other weights: no actor
    repeats the work, nor does a second job in the same process (a test session, a notebook). Building it takes
    ~12 s of CPU on 2 cores (most of a small command's), so it is also kept in a cache file between commands
    (see random_cache_path); an unreadable one is built anew."""
    path = random_cache_path()
    try:
        data = path.read_bytes()
        load_safetensors(data)  # a file that is not whole is built anew
        return EncoderWeights("random", data)
    except Exception:  # noqa: BLE001 - missing, unreadable or corrupt: build it
        pass
    weights = EncoderWeights("random", _build_random())
    _write_cache(path, weights.safetensors)
    return weights


def _build_random() -> bytes:
    """The seeded random trunk, calibrated, as safetensors bytes: a pure function of this module's code, the
    seed, torch's and torchvision's versions and the CPU it runs on."""
    trunk = _trunk_of(_skeleton())
    _calibrate_random(trunk)
    return save_safetensors({k: v.contiguous() for k, v in trunk.state_dict().items()})


def random_cache_path() -> Path:
    """The cache file of the random trunk: named by everything its bytes depend on (this module's source, the
    seed, torch's and torchvision's versions, the CPU and torch's threads), so a change to any builds it anew."""
    from raycap.versions import installed_version

    key = hashlib.sha256(Path(__file__).read_bytes())
    vision = installed_version("torchvision")  # not imported: a command that finds the file never needs it
    facts = (RANDOM_SEED, torch.__version__, vision, cpu_description(), torch.get_num_threads())
    key.update(repr(facts).encode())
    folder = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "raycap"
    )
    return Path(folder) / f"random-inception-v3-{key.hexdigest()[:16]}.safetensors"


def _write_cache(path: Path, data: bytes) -> None:
    """Write the cache file atomically (a concurrent command reads a whole file or none); a folder that cannot be
    written only costs the next command the build."""
    temp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(temp, path)
    except OSError:
        if temp is not None:
            with contextlib.suppress(OSError):
                os.unlink(temp)


def resolve_weights(spec: str, storage_options: dict[str, Any] | None = None) -> EncoderWeights:
    """`--encoder-weights` (imagenet | random | a local path or any URI, e.g. s3://) -> the trunk's tensors.

    Every failure is one ValueError line naming what to pass instead.
    """
    if spec == "random":
        return _random_weights()
    if spec == "imagenet":
        try:
            import torchvision

            with redirect_stdout(io.StringIO()):  # torch.hub's "Downloading ..." line: the outcome speaks for itself
                state = torchvision.models.Inception_V3_Weights.IMAGENET1K_V1.get_state_dict(progress=False)
        except Exception as e:  # noqa: BLE001 - any download failure is one user-facing message
            raise ValueError(
                f"could not download torchvision's ImageNet InceptionV3 weights ({type(e).__name__}); on a machine "
                "without internet pass --encoder-weights PATH or URI of a saved state dict, or --encoder-weights random"
            ) from None
    else:
        state = _load_state_dict(spec, storage_options)
    expected = [k for k in _skeleton(init=False).state_dict() if k.split(".")[0] not in _HEAD]
    missing = [k for k in expected if k not in state]
    if missing:
        raise ValueError(f"--encoder-weights {spec}: lacks {len(missing)} InceptionV3 tensors, e.g. {missing[0]}")
    trunk = {k: state[k].detach().to("cpu").contiguous() for k in expected}
    return EncoderWeights(spec, save_safetensors(trunk))


def _load_state_dict(location: str, storage_options: dict[str, Any] | None) -> dict[str, torch.Tensor]:
    if location in ("", "imagenet", "random") or location.startswith("-"):
        raise ValueError(f"--encoder-weights must be one of {', '.join(WEIGHT_CHOICES)}, got {location!r}")
    data = storage.read_bytes(location, storage_options, what="--encoder-weights")
    try:
        if location.endswith(".safetensors"):
            state = load_safetensors(data)
        else:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)  # tensors, never code
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"--encoder-weights {location}: cannot read: {type(e).__name__}: {e}") from None
    if not isinstance(state, dict) or not any(str(k).startswith("Mixed_7c.") for k in state):
        raise ValueError(f"--encoder-weights {location}: not an InceptionV3 state dict (no Mixed_7c weights)")
    return state


def _inception_trunk(weights: EncoderWeights | str) -> nn.Sequential:
    """InceptionV3 from the stem to Mixed_7c, as a Sequential (the 8x8x2048 last conv block)."""
    if isinstance(weights, str):
        weights = resolve_weights(weights)
    full = _skeleton(init=False)
    full.load_state_dict(load_safetensors(weights.safetensors), strict=False, assign=True)
    return _trunk_of(full)


def _trunk_of(full: nn.Module) -> nn.Sequential:
    full.transform_input = False
    layers = OrderedDict()
    for name, module in full.named_children():
        if name in _HEAD:
            continue
        layers[name] = module
        if name == _LAST_CONV:
            break
    return nn.Sequential(layers)


@torch.no_grad()
def _calibrate_random(trunk: nn.Sequential) -> None:
    """Give a randomly initialised trunk sane activation scales.

    With torchvision's init and identity BatchNorm statistics, activations grow ~10x per block and
    overflow float16 by Mixed_7c. One deterministic forward pass in training mode over smooth seeded
    noise sets every BatchNorm's running mean/variance (momentum=None: a plain average), so each
    block's output is normalised, as a trained network's would be.
    """
    gen = torch.Generator().manual_seed(RANDOM_SEED)
    low = torch.rand(_CALIBRATION_IMAGES, 3, 10, 10, generator=gen) * 2 - 1
    images = nn.functional.interpolate(low, size=(299, 299), mode="bilinear", align_corners=False)
    for m in trunk.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    trunk.train()
    trunk(images)
    trunk.eval()


def _fold_batchnorms(trunk: nn.Sequential) -> nn.Sequential:
    """Fold each BatchNorm into the convolution before it (in place, eval mode): exact, and one pass less over
    each activation. InceptionV3's every BatchNorm sits in a BasicConv2d (conv, bn, ReLU); the fold is
    torch.fx's `fuse` without tracing the model or copying it (same function, same numbers)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    for module in trunk.modules():
        if isinstance(getattr(module, "bn", None), nn.BatchNorm2d) and isinstance(
            getattr(module, "conv", None), nn.Conv2d
        ):
            module.conv = fuse_conv_bn_eval(module.conv, module.bn)
            module.bn = nn.Identity()
    if any(isinstance(m, nn.BatchNorm2d) for m in trunk.modules()):
        raise RuntimeError("a BatchNorm outside InceptionV3's BasicConv2d was left unfolded")
    return trunk


class FeatureExtractor:
    """uint8 images in, (B, 64, 2048) region features out; the model lives on one device in one layout."""

    def __init__(
        self,
        weights: EncoderWeights | str = "imagenet",  # resolved weights, or a spec resolved here
        device: str | None = None,
        precision: str = "auto",
        batch_size: int = 32,
        channels_last: bool = True,
    ) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.precision = resolve_precision(precision, self.device)
        self.batch_size = batch_size
        if isinstance(weights, str):
            weights = resolve_weights(weights)
        trunk = _fold_batchnorms(_inception_trunk(weights).eval()).to(self.device)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.trunk = trunk.to(memory_format=self.memory_format)  # channels_last: oneDNN's and cuDNN's fast layout

    @torch.inference_mode()
    def __call__(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(B, 299, 299, 3) uint8 -> (B, 64, 2048) float32 on this extractor's device."""
        outputs = []
        for i in range(0, len(pixels), self.batch_size):
            chunk = pixels[i : i + self.batch_size]
            if not isinstance(chunk, torch.Tensor):  # a shard's pixels are read-only views: copy the small chunk
                chunk = torch.from_numpy(np.array(chunk))
            chunk = chunk.to(self.device, non_blocking=True)  # uint8 over the bus, unless decoded there
            x = preprocess(chunk).contiguous(memory_format=self.memory_format)
            with autocast(self.precision, self.device.type):
                y = self.trunk(x)  # (b, 2048, 8, 8)
            outputs.append(y.float().flatten(2).transpose(1, 2))  # (b, 64, 2048), regions row-major
        if not outputs:
            return torch.zeros(0, NUM_REGIONS, FEATURE_DIM, device=self.device)
        return torch.cat(outputs)
