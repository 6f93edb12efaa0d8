"""Encoder weights: resolved once on the driver (imagenet, a file, any URI) and shipped to actors via Ray."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torchvision
from safetensors.torch import save_file

from raycap import extract, schema, storage
from raycap.config import ExtractConfig
from raycap.encoder import FeatureExtractor, resolve_weights
from raycap.images import decode_image
from tests.helpers import HANG_SECONDS


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """A seeded (not random-calibrated) InceptionV3 state dict as .safetensors."""
    torch.manual_seed(7)
    model = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=True)
    path = tmp_path_factory.mktemp("weights") / "inception.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.mark.slow
def test_imagenet_without_internet_fails_with_one_line_before_any_actor(tiny_synth, tmp_path):
    """The README's first command, as typed, on a machine that cannot download: one line, nothing written."""
    temp = tempfile.mkdtemp(prefix="rw", dir="/tmp")  # Ray's socket paths must stay short
    closed = "http://127.0.0.1:9"  # a closed port: no download here, nor anywhere else
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "no_proxy", "NO_PROXY")}
    env |= {"TORCH_HOME": str(tmp_path / "torch"), "RAY_TMPDIR": temp, "https_proxy": closed, "HTTPS_PROXY": closed}
    try:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "raycap.cli",
                "extract",
                "--input",
                str(tiny_synth / "images"),
                "--output",
                str(tmp_path / "out"),
            ],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=HANG_SECONDS,
        )
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    assert done.returncode == 2 and done.stdout == "", done.stdout[-2000:] + done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr[-3000:]
    assert lines[0].startswith("raycap extract: error: could not download torchvision's ImageNet InceptionV3")
    assert "--encoder-weights" in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_weights_from_s3_reach_every_actor_through_the_object_store(
    ray_session, tiny_synth, weights_file, s3_server, tmp_path, monkeypatch
):
    fs, _ = storage.filesystem("s3://weights", s3_server)
    fs.mkdir("weights")
    fs.put_file(str(weights_file), "weights/inception.safetensors")
    uri = "s3://weights/inception.safetensors"
    resolved = resolve_weights(uri, s3_server)
    assert resolved.spec == uri and resolved.safetensors is not None
    images = tmp_path / "images"
    images.mkdir()
    for name in sorted(p.name for p in (tiny_synth / "images").iterdir())[:2]:
        (images / name).write_bytes((tiny_synth / "images" / name).read_bytes())
    out = tmp_path / "features"
    manifest = extract.run(
        ExtractConfig(
            input=str(images),
            output=str(out),
            encoder_weights=uri,
            precision="fp32",
            feature_dtype="float32",
            storage_options=s3_server,
            actors=(1, 1),
        )
    )
    assert manifest["rows"] == 2 and manifest["encoder_weights"] == uri
    table = pq.read_table(out / schema.FEATURES_DIR)
    got = schema.features_to_numpy(table[schema.FEATURES], "float32")
    pixels = np.stack([decode_image((images / i).read_bytes()).pixels for i in table[schema.IMAGE_ID].to_pylist()])
    local = FeatureExtractor(str(weights_file), device="cpu", precision="fp32")(pixels).numpy()
    # The S3 weights, not the seeded random encoder (uncalibrated: large activations, hence relative).
    assert np.linalg.norm(got - local) / np.linalg.norm(local) < 1e-4


def test_unreadable_weights_uri_is_one_line(s3_server):
    with pytest.raises(ValueError, match=r"^--encoder-weights s3://weights/missing.pt: no such file$"):
        resolve_weights("s3://weights/missing.pt", s3_server)
    with pytest.raises(ValueError, match="must be one of"):
        resolve_weights("")
