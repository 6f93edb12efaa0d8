import sys

import numpy as np
import pytest
import torch
import torchvision
from safetensors.torch import save as save_safetensors

from raycap import encoder
from raycap.encoder import FeatureExtractor, autocast, preprocess, resolve_precision, select_precision


def test_preprocessing_matches_torchvision_inception_weights():
    """torchvision's IMAGENET1K_V1 transform (ImageNet mean/std) followed by the model's own
    transform_input is exactly our [-1, 1] scaling: the original InceptionV3 preprocessing."""
    weights = torchvision.models.Inception_V3_Weights.IMAGENET1K_V1
    transform = weights.transforms()
    assert transform.crop_size == [299]
    pixels = torch.randint(0, 256, (2, 299, 299, 3), dtype=torch.uint8)
    normalised = torchvision.transforms.functional.normalize(
        pixels.permute(0, 3, 1, 2).float() / 255, transform.mean, transform.std
    )
    model = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False, transform_input=True)
    torch.testing.assert_close(model._transform_input(normalised), preprocess(pixels), atol=1e-5, rtol=0)
    edges = preprocess(torch.tensor([[[[0, 255, 0]]]], dtype=torch.uint8))
    assert edges.flatten().tolist() == [-1.0, 1.0, -1.0]


@pytest.fixture(scope="module")
def extractor():
    return FeatureExtractor("random", device="cpu", precision="fp32", batch_size=2)


def test_random_encoder_is_deterministic_and_well_scaled(extractor):
    pixels = np.random.default_rng(0).integers(0, 256, (3, 299, 299, 3), dtype=np.uint8)
    a = extractor(pixels)
    b = FeatureExtractor("random", device="cpu", precision="fp32", batch_size=3)(pixels)
    assert a.shape == (3, 64, 2048)
    torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)  # another actor builds the same encoder
    assert torch.isfinite(a.half()).all()  # fits float16 storage
    assert a.min() >= 0  # Mixed_7c ends in ReLUs


def test_random_trunk_cache_holds_the_built_bytes_and_a_bad_file_is_built_anew(tmp_path, monkeypatch):
    """The cache file is the build's bytes, bit for bit (the demo's figures depend on them); a command that finds
    it reads it; a file that is not whole is replaced by a build."""
    monkeypatch.setenv(encoder.CACHE_ENV, str(tmp_path))
    built = encoder._random_weights.__wrapped__()  # no file yet: built, then written
    path = encoder.random_cache_path()
    assert path.parent == tmp_path and path.read_bytes() == built.safetensors
    assert encoder._build_random() == built.safetensors  # a second build gives the same bytes
    monkeypatch.setattr(encoder, "_build_random", lambda: pytest.fail("built despite the cache file"))
    assert encoder._random_weights.__wrapped__() == built
    path.write_bytes(built.safetensors[:1000])  # cut short (by a full disk, or by hand)
    stand_in = save_safetensors({"x": torch.zeros(1)})
    monkeypatch.setattr(encoder, "_build_random", lambda: stand_in)
    assert encoder._random_weights.__wrapped__().safetensors == stand_in == path.read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left


def test_batchnorms_fold_as_torch_fx_fuse_does(extractor):
    """The fold without tracing gives torch.fx's fused trunk's features bit for bit (the demo's figures depend
    on them), and the trunk loaded onto the meta skeleton keeps no meta tensor."""
    from torch.fx.experimental.optimization import fuse

    traced = fuse(encoder._inception_trunk(encoder._random_weights()).eval())
    assert not any(t.is_meta for t in [*extractor.trunk.parameters(), *extractor.trunk.buffers()])
    pixels = np.random.default_rng(2).integers(0, 256, (2, 299, 299, 3), dtype=np.uint8)
    with torch.inference_mode():
        expected = traced(preprocess(torch.from_numpy(pixels)).contiguous(memory_format=torch.channels_last))
    assert torch.equal(extractor(pixels), expected.flatten(2).transpose(1, 2))


def test_versions_are_read_without_importing(monkeypatch):
    from raycap.versions import installed_version

    for module in (torch, torchvision):
        monkeypatch.delitem(sys.modules, module.__name__)  # as on a driver that never imported it
        assert installed_version(module.__name__) == module.__version__  # with its build, e.g. +cu130


def test_channels_last_and_batching_do_not_change_features(extractor):
    pixels = np.random.default_rng(1).integers(0, 256, (3, 299, 299, 3), dtype=np.uint8)
    plain = FeatureExtractor("random", device="cpu", precision="fp32", batch_size=8, channels_last=False)
    torch.testing.assert_close(extractor(pixels), plain(pixels), atol=1e-2, rtol=1e-2)


def test_regions_are_row_major_over_the_8x8_grid(extractor):
    # A bright patch in the top-right corner changes the top-right regions most, the bottom-left least.
    pixels = np.zeros((1, 299, 299, 3), dtype=np.uint8)
    pixels[0, :40, -40:] = 255
    base = extractor(np.zeros_like(pixels))[0]
    change = (extractor(pixels)[0] - base).abs().sum(-1)  # (64,)
    grid = change.view(8, 8)
    row, col = divmod(int(change.argmax()), 8)
    assert row <= 1 and col >= 5
    assert grid[:2, 5:].mean() > 5 * grid[6:, :3].mean()


def test_weights_and_precision_arguments_are_checked(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        FeatureExtractor(str(tmp_path / "missing.pt"))
    bad = tmp_path / "bad.pt"
    torch.save({"fc.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="not an InceptionV3 state dict"):
        FeatureExtractor(str(bad))
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp8", torch.device("cpu"))


GPUS = {"V100": False, "T4": False, "A100": True, "H100": True}  # native bf16 needs compute capability 8+


@pytest.mark.parametrize("gpu", GPUS)
@pytest.mark.parametrize("training", [False, True])
def test_auto_precision_on_a_gpu_is_bf16_only_where_the_gpu_has_it(gpu, training, monkeypatch):
    bf16 = GPUS[gpu]
    # As torch's: with emulation counted (its default) a T4 says yes; only native bf16 may pick bf16.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16 or including_emulation)
    cuda = torch.device("cuda")
    assert resolve_precision("auto", cuda, training=training) == ("bf16" if bf16 else "fp16")
    assert resolve_precision("fp16", cuda, training=training) == "fp16"
    assert resolve_precision("fp32", cuda, training=training) == "fp32"
    if bf16:
        assert resolve_precision("bf16", cuda) == "bf16"
    else:
        with pytest.raises(ValueError, match="no native bf16") as e:
            resolve_precision("bf16", cuda)
        assert "\n" not in str(e.value) and "fp16" in str(e.value)


@pytest.mark.parametrize("native", [False, True])
def test_auto_precision_on_a_cpu_is_bf16_with_native_bf16_and_fp32_in_training(native, monkeypatch):
    monkeypatch.setattr(encoder, "cpu_supports_bf16", lambda: native)
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == ("bf16" if native else "fp32")
    assert resolve_precision("auto", cpu, training=True) == "fp32"
    assert resolve_precision("bf16", cpu) == "bf16"  # asked for: emulated where not native, as before
    assert select_precision("auto", "cpu", bf16_supported=native) == resolve_precision("auto", cpu)


def test_fp16_autocasts_to_float16_and_fp32_does_not_autocast():
    x = torch.ones(2, 2)
    for precision, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32)):
        with autocast(precision, "cpu"):
            assert (x @ x).dtype == dtype


def test_weights_from_a_state_dict_file(tmp_path, extractor):
    path = tmp_path / "inception.pt"
    model = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=True)
    torch.save(model.state_dict(), path)
    loaded = FeatureExtractor(str(path), device="cpu", precision="fp32")
    pixels = np.full((1, 299, 299, 3), 128, dtype=np.uint8)
    assert not torch.allclose(loaded(pixels), extractor(pixels))
