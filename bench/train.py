"""Benchmark: raycap's training step against the TensorFlow tutorial's own `train_step` on the same CPU.

Sizes (all): vocabulary 5,001, embedding 256, GRU 512, 64 regions x 2,048 features, captions of 8-15 random
words plus <start>/<end>, Adam. The baseline is the tutorial's code itself (bench/tf_tutorial.py: a
`tf.function` graph, a batch of 64 captions padded to the data set's longest caption, 22 tokens, one copy of the
image features per caption), run in a subprocess by `--tf-python` (a Python with TensorFlow; the current one
when it imports tensorflow). Without TensorFlow the baseline is `TutorialPort`, the same step layer for layer in
eager PyTorch: slower than TensorFlow's graph (every op dispatched from Python, W1·features recomputed each
step), so ratios against it overstate raycap's lead. raycap's step: `--images` images with 5 captions each
through `caption_batch` (each image encoded once, captions sorted so no step runs on padding), the hoisted
decoder (`Captioner.forward`, packed logits), `caption_loss`, clipping and fused Adam, as a training worker runs
it, in fp32, and in bf16 autocast where the CPU has native bf16. Rates are captions per second of wall clock and
per second of CPU time (steadier when other processes share the cores), best of `--rounds` rounds each.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from raycap.encoder import autocast, cpu_description, cpu_supports_bf16
from raycap.ingest import caption_batch
from raycap.model import Captioner, ModelConfig, adam, caption_loss
from raycap.train_worker import loss_scaler, optimizer_step

VOCAB, EMBEDDING, UNITS = 5001, 256, 512  # the tutorial's top 5,000 words + <unk>, embedding_dim, units


class TutorialPort(nn.Module):
    """The tutorial's CNN_Encoder, BahdanauAttention and RNN_Decoder, layer for layer."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(2048, EMBEDDING)  # CNN_Encoder: Dense(embedding_dim) + relu
        self.W1, self.W2, self.V = nn.Linear(EMBEDDING, UNITS), nn.Linear(UNITS, UNITS), nn.Linear(UNITS, 1)
        self.embedding = nn.Embedding(VOCAB, EMBEDDING)
        self.gru = nn.GRUCell(2 * EMBEDDING, UNITS)
        self.fc1, self.fc2 = nn.Linear(UNITS, UNITS), nn.Linear(UNITS, VOCAB)

    def decoder(
        self, x: torch.Tensor, features: torch.Tensor, hidden: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """RNN_Decoder.call: attention (W1·features every call), embed, concat, GRU, fc1, fc2.

        The tutorial's Keras GRU is called without `initial_state`, so its state restarts at zero each step;
        the port feeds `hidden` (what the tutorial means; the same arithmetic either way)."""
        score = self.V(torch.tanh(self.W1(features) + self.W2(hidden).unsqueeze(1)))  # (B, 64, 1)
        attention_weights = torch.softmax(score, dim=1)
        context = (attention_weights * features).sum(dim=1)  # (B, E)
        state = self.gru(torch.cat([context, self.embedding(x)], dim=-1), hidden)
        return self.fc2(self.fc1(state)), state

    def train_step(self, img_tensor: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """train_step: loss summed over steps of the per-step masked mean (padding rows in the mean)."""
        loss = img_tensor.new_zeros(())
        hidden = img_tensor.new_zeros(target.shape[0], UNITS)  # decoder.reset_state
        dec_input = target[:, 0]  # <start>
        features = F.relu(self.encoder(img_tensor))  # (B, 64, E)
        for i in range(1, target.shape[1]):
            predictions, hidden = self.decoder(dec_input, features, hidden)
            mask = (target[:, i] != 0).float()
            loss = loss + (F.cross_entropy(predictions, target[:, i], reduction="none") * mask).mean()
            dec_input = target[:, i]  # teacher forcing
        return loss


def make_captions(images: int, seed: int) -> dict[str, list[list[int]]]:
    """`images` ids with 5 captions of 8-15 random words each, framed by <start>=2 and <end>=3."""
    gen = torch.Generator().manual_seed(seed)
    captions = {}
    for i in range(images):
        caps = []
        for _ in range(5):
            n = int(torch.randint(8, 16, (1,), generator=gen))
            caps.append([2, *torch.randint(4, VOCAB, (n,), generator=gen).tolist(), 3])
        captions[str(i)] = caps
    return captions


def tensorflow_python(requested: str | None) -> str | None:
    """The Python that runs bench/tf_tutorial.py: `requested`, else this one when it has TensorFlow, else None."""
    if requested:
        return requested
    try:
        import tensorflow  # noqa: F401

        return sys.executable
    except ImportError:
        return None


def tensorflow_rates(python: str, args: argparse.Namespace) -> dict[str, float]:
    """bench/tf_tutorial.py's JSON line, run in a subprocess with the same threads as PyTorch here."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tf_tutorial.py")
    command = [python, script, "--batch", str(args.batch), "--max-length", str(args.max_length)]
    command += ["--steps", str(args.steps), "--rounds", str(args.rounds), "--threads", str(torch.get_num_threads())]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def timed(step: Callable[[], int], steps: int) -> tuple[float, float]:
    """(captions per wall second, captions per CPU second) over `steps` steps after one warm-up."""
    step()
    wall, cpu, samples = time.perf_counter(), time.process_time(), 0
    for _ in range(steps):
        samples += step()
    return samples / (time.perf_counter() - wall), samples / (time.process_time() - cpu)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=13, help="raycap: images per step, 5 captions each (65)")
    parser.add_argument("--batch", type=int, default=64, help="tutorial: captions per step (BATCH_SIZE)")
    parser.add_argument("--max-length", type=int, default=22, help="tutorial: the data set's longest caption")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per round (after one warm-up)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the best of each is kept")
    parser.add_argument("--threads", type=int, default=0, help="torch (and TensorFlow) threads; 0: torch's default")
    parser.add_argument("--tf-python", help="a Python with TensorFlow for the tutorial's own step (a separate venv)")
    parser.add_argument("--no-port", action="store_true", help="skip the eager PyTorch port of the tutorial")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    port = TutorialPort()
    port_opt = torch.optim.Adam(port.parameters(), lr=1e-3)
    model = Captioner(ModelConfig(vocab_size=VOCAB, embedding_dim=EMBEDDING, units=UNITS))
    opt = adam(model.parameters(), lr=1e-3)
    scaler = loss_scaler("fp32", "cpu")
    features = torch.rand(max(args.images, args.batch), 64, 2048)
    captions = make_captions(max(args.images, args.batch), seed=0)
    ids = list(captions)[: args.images]
    pairs = [(i, c) for i, cs in enumerate(captions.values()) for c in cs][: args.batch]
    target = torch.zeros(len(pairs), args.max_length, dtype=torch.long)
    for k, (_, c) in enumerate(pairs):
        target[k, : len(c)] = torch.tensor(c)
    img_tensor = features[torch.tensor([i for i, _ in pairs])]  # one feature copy per caption

    def tutorial() -> int:
        loss = port.train_step(img_tensor, target)
        port_opt.zero_grad()
        loss.backward()
        port_opt.step()
        return len(target)

    def raycap(precision: str) -> int:
        rows, caps, index, weights = caption_batch(ids, captions)
        with autocast(precision, "cpu"):
            logits, alphas = model(features[rows], caps, index, packed=True)
            loss = caption_loss(logits, alphas, caps, weights=weights)
        optimizer_step(model, opt, scaler, loss, 5.0)
        return int(weights.sum())

    runs = {} if args.no_port else {"torch port": tutorial}
    runs["raycap fp32"] = lambda: raycap("fp32")
    if cpu_supports_bf16():
        runs["raycap bf16"] = lambda: raycap("bf16")
    python = tensorflow_python(args.tf_python)
    load = os.getloadavg()[0]
    rates: dict[str, tuple[float, float]] = {}
    if python:  # first, on its own: TensorFlow's tracing would otherwise run beside the timed PyTorch steps
        tf = tensorflow_rates(python, args)
        rates[f"tensorflow {tf['tensorflow']}"] = (tf["captions_per_second"], tf["captions_per_cpu_second"])
    for _ in range(args.rounds):
        for name, step in runs.items():
            wall, cpu = timed(step, args.steps)
            best = rates.get(name, (0.0, 0.0))
            rates[name] = (max(best[0], wall), max(best[1], cpu))
    baseline = next(iter(rates))
    print(f"CPU: {cpu_description()}; load average {load:.1f} before, {os.getloadavg()[0]:.1f} after")
    print(
        f"sizes: vocab {VOCAB}, embedding {EMBEDDING}, GRU {UNITS}, 64x2048 features; tutorial {args.batch} captions "
        f"padded to {args.max_length}; raycap {args.images} images x 5 captions; {torch.get_num_threads()} threads"
    )
    for name, (wall, cpu) in rates.items():
        print(
            f"{name + ':':18} {wall:6.1f} captions/s ({wall / rates[baseline][0]:.2f}x)  "
            f"{cpu:6.1f} per CPU second ({cpu / rates[baseline][1]:.2f}x the {baseline})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
