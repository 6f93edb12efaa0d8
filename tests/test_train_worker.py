"""The worker's pieces that need no Ray cluster: model and optimizer restore order, loss scaling for fp16."""

from __future__ import annotations

import pytest
import torch

from raycap import modeldir
from raycap.config import TrainConfig
from raycap.model import Captioner, ModelConfig, caption_loss
from raycap.text import Vocabulary
from raycap.train_worker import WorkerConfig, build_model_and_optimizer, loss_scaler, optimizer_step

MODEL = ModelConfig(vocab_size=12, feature_dim=8, embedding_dim=6, units=5)


def _worker_config() -> WorkerConfig:
    return WorkerConfig(
        settings=TrainConfig("features", "captions.json", "model", learning_rate=0.01),
        model=MODEL,
        vocab_json="{}",
        feature_mean=[0.5] * MODEL.feature_dim,
        feature_std=[2.0] * MODEL.feature_dim,
        total_steps=10,
        threads=1,
    )


def _loss(model: torch.nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    features = torch.rand(2, 64, MODEL.feature_dim, generator=gen, dtype=dtype)  # (B, 64, F)
    captions = torch.tensor([[2, 5, 6, 3], [2, 7, 3, 0]])  # (N, T): <start> ... <end>, padded
    logits, alphas = model(features, captions)
    return caption_loss(logits, alphas, captions)


@pytest.fixture
def checkpoint(tmp_path) -> modeldir.TrainingCheckpoint:
    """A checkpoint after one Adam step, as a worker writes it and a resumed worker reads it back."""
    model, _, optimizer = build_model_and_optimizer(_worker_config(), None, lambda m: m)
    _loss(model).backward()
    optimizer.step()
    modeldir.write_checkpoint(str(tmp_path), model, optimizer, {"epoch": 0, "step": 1, "history": []}, "{}")
    return modeldir.read_checkpoint(str(tmp_path))


def test_a_resumed_optimizer_holds_the_placed_parameters_and_its_state_beside_them(checkpoint):
    # float64 stands in for the GPU (a placement that changes every tensor, as .to("cuda") does), and the
    # wrapper for DDP (the model becomes `.module`).
    def place(model: torch.nn.Module) -> torch.nn.Module:
        return torch.nn.ModuleDict({"module": model.to(torch.float64)})

    model, core, optimizer = build_model_and_optimizer(_worker_config(), checkpoint, place)
    params = list(model.parameters())
    assert isinstance(core, Captioner) and core is model.module
    assert all(p.dtype == torch.float64 for p in params)
    assert optimizer.param_groups[0]["params"] == params
    for name, p in core.named_parameters():
        torch.testing.assert_close(p, checkpoint.weights[name].to(torch.float64), msg=name)
    for p in params:
        state = optimizer.state[p]
        assert float(state["step"]) == 1
        for key in ("exp_avg", "exp_avg_sq"):
            assert (state[key].dtype, state[key].device) == (p.dtype, p.device), key
    before = [p.detach().clone() for p in params]
    _loss(core, torch.float64).backward()
    optimizer.step()  # the first step after a resume, on the placed parameters
    assert all(float(optimizer.state[p]["step"]) == 2 for p in params)
    assert any(not torch.equal(a, p) for a, p in zip(before, params))


@pytest.mark.parametrize("precision", ["fp16", "bf16", "fp32"])
def test_the_loss_is_scaled_exactly_for_fp16(precision):
    assert loss_scaler(precision, "cpu").is_enabled() == (precision == "fp16")


def test_a_scaled_step_clips_the_true_gradients_and_steps_as_an_unscaled_one():
    """With a 2**16 loss scale, gradients are unscaled before clipping: the step is the unscaled step."""
    steps = []
    for precision in ("fp16", "fp32"):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        before = [p.detach().clone() for p in model.parameters()]
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        scaler = loss_scaler(precision, "cpu")
        optimizer_step(model, optimizer, scaler, model(torch.ones(2, 4)).square().sum(), grad_clip=0.1)
        steps.append(torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)]))
    scaled, plain = steps
    torch.testing.assert_close(plain.norm(), torch.tensor(0.1))  # the clip was active: lr 1 x norm 0.1
    torch.testing.assert_close(scaled, plain)


def test_init_from_a_model_directory_starts_from_its_weights(tmp_path):
    """--init-from: the loss at step 0 is the source model's, not a fresh model's; its vocabulary is kept."""
    torch.manual_seed(7)
    source = Captioner(MODEL)
    source.encoder.set_normalization(torch.full((MODEL.feature_dim,), 0.1), torch.full((MODEL.feature_dim,), 3.0))
    vocab = Vocabulary.build(["a red circle", "a blue square"])
    modeldir.write_model_dir(str(tmp_path / "source"), source, vocab, {"encoder_weights": "random"})
    cfg = _worker_config()
    fresh, _, _ = build_model_and_optimizer(cfg, None, lambda m: m)
    cfg.init_from = str(tmp_path / "source")
    model, _, _ = build_model_and_optimizer(cfg, None, lambda m: m)
    with torch.no_grad():
        expected = _loss(source.eval())
        assert float(_loss(model.eval())) == pytest.approx(float(expected), rel=1e-6)
        assert float(_loss(fresh.eval())) != pytest.approx(float(expected), rel=1e-3)
