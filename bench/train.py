"""Benchmark: raycap's training step against a faithful torch port of the TensorFlow tutorial's `train_step`.

Sizes (both): vocabulary 5,001, embedding 256, GRU 512, 64 regions x 2,048 features, captions of 8-15
words plus <start>/<end>, Adam. The tutorial's step: a batch of 64 captions padded to the data set's longest
caption (22 tokens), one copy of the image features per caption, a Python loop over every time step calling
the decoder (attention with W1·features recomputed, embedding, GRU, fc1, fc2) and the masked loss per step,
averaged over the batch padding included. raycap's step: `--images` images with 5 captions each through
`caption_batch` (each image encoded once, captions sorted so no step runs on padding), the hoisted decoder
(`Captioner.forward`, packed logits), `caption_loss`, clipping and Adam, as a training worker runs it, in
fp32 and in bf16 autocast. Rates are captions per second, best of two interleaved rounds each.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from raycap.encoder import autocast, cpu_supports_bf16
from raycap.ingest import caption_batch
from raycap.model import Captioner, ModelConfig, caption_loss
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=13, help="raycap: images per step, 5 captions each (65)")
    parser.add_argument("--batch", type=int, default=64, help="tutorial: captions per step (BATCH_SIZE)")
    parser.add_argument("--max-length", type=int, default=22, help="tutorial: the data set's longest caption")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per round (after one warm-up)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    port = TutorialPort()
    port_opt = torch.optim.Adam(port.parameters(), lr=1e-3)
    model = Captioner(ModelConfig(vocab_size=VOCAB, embedding_dim=EMBEDDING, units=UNITS))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
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

    runs = {"tutorial port": tutorial, "raycap fp32": lambda: raycap("fp32")}
    if cpu_supports_bf16():
        runs["raycap bf16"] = lambda: raycap("bf16")
    rates: dict[str, float] = {}
    for _ in range(2):
        for name, step in runs.items():
            step()  # warm-up
            started, samples = time.perf_counter(), 0
            for _ in range(args.steps):
                samples += step()
            rates[name] = max(rates.get(name, 0.0), samples / (time.perf_counter() - started))
    print(
        f"sizes: vocab {VOCAB}, embedding {EMBEDDING}, GRU {UNITS}, 64x2048 features; tutorial {args.batch} captions "
        f"padded to {args.max_length}; raycap {args.images} images x 5 captions; {torch.get_num_threads()} threads"
    )
    for name, rate in rates.items():
        print(f"{name + ':':15} {rate:6.0f} captions/s  ({rate / rates['tutorial port']:.2f}x the port)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
