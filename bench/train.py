"""Benchmark: our training step against a straightforward tutorial-style step, same features, same run.

Tutorial-style: every caption carries its own copy of the image features, W1·f is recomputed at every
time step, captions are padded to the longest caption of the data set and every step runs over the
padding (the loss is still masked). Ours: each image is encoded once for all its captions, W1·f once per
batch, captions sorted by length so each step runs only on the captions still going.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from raycap.ingest import caption_batch
from raycap.model import Captioner, ModelConfig, caption_loss


def tutorial_step(model: Captioner, features: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
    """The tutorial's train_step: a Python loop over time, attention recomputed from scratch each step."""
    encoded = model.encoder(features)  # (N, 64, E): one copy per caption
    hidden = model.init_hidden(encoded)
    logits, alphas = [], []
    for t in range(captions.shape[1] - 1):
        projected = model.attention.W1(encoded)  # recomputed every step, as the tutorial does
        step_logits, hidden, alpha = model.step(captions[:, t], hidden, encoded, projected)
        logits.append(step_logits)
        alphas.append(alpha)
    return caption_loss(torch.stack(logits, 1), torch.stack(alphas, 1), captions)


def make_data(images: int, vocab: int, seed: int = 0) -> tuple[torch.Tensor, dict[str, list[list[int]]]]:
    gen = torch.Generator().manual_seed(seed)
    features = torch.rand(images, 64, 2048, generator=gen)
    captions = {}
    for i in range(images):
        caps = []
        for _ in range(5):
            n = int(torch.randint(8, 16, (1,), generator=gen))
            caps.append([2, *torch.randint(4, vocab, (n,), generator=gen).tolist(), 3])
        captions[str(i)] = caps
    return features, captions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=32, help="images per batch (each with 5 captions)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=22, help="the data set's longest caption, for padding")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    vocab = 64
    model = Captioner(ModelConfig(vocab_size=vocab))
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    features, captions = make_data(args.images, vocab)
    ids = list(captions)

    def ours() -> int:
        rows, caps, index, weights = caption_batch(ids, captions)
        loss = caption_loss(*model(features[rows], caps, index), caps, weights=weights)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return int(weights.sum())

    def tutorial() -> int:
        pairs = [(i, c) for i, cs in enumerate(captions.values()) for c in cs]
        caps = torch.zeros(len(pairs), args.max_length, dtype=torch.long)
        for k, (_, c) in enumerate(pairs):
            caps[k, : len(c)] = torch.tensor(c)
        feats = features[torch.tensor([i for i, _ in pairs])]  # one copy per caption
        loss = tutorial_step(model, feats, caps)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return len(caps)

    rates = {}
    for name, step in (
        ("tutorial-style", tutorial),
        ("raycap", ours),
        ("tutorial-style ", tutorial),
        ("raycap ", ours),
    ):
        step()  # warm-up
        started, samples = time.perf_counter(), 0
        for _ in range(args.steps):
            samples += step()
        rates.setdefault(name.strip(), []).append(samples / (time.perf_counter() - started))
    base, fast = max(rates["tutorial-style"]), max(rates["raycap"])
    print(f"tutorial-style step: {base:.0f} captions/s")
    print(f"raycap step:         {fast:.0f} captions/s")
    print(f"ratio raycap / tutorial-style: {fast / base:.2f}x (target >= 2x on CPU)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
