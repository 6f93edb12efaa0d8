"""The Show, Attend and Tell captioner: FC encoder, Bahdanau attention, GRU decoder, loss, greedy and beam search."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from raycap.schema import FEATURE_DIM, NUM_REGIONS


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 5000  # top-k words incl. <pad>, <unk>, <start>, <end> (the tutorial's 5,000)
    feature_dim: int = FEATURE_DIM  # InceptionV3 Mixed_7c channels
    embedding_dim: int = 256  # E: the FC encoder's output and the word embedding size (tutorial: 256)
    units: int = 512  # H: GRU units, also the attention's hidden size (tutorial: 512)
    dropout: float = 0.0  # on the GRU output before the FC layers; 0 as in the tutorial
    init_state: bool = False  # Show, Attend and Tell: GRU state starts at tanh(W·mean(regions)); False: zeros

    def to_dict(self) -> dict:
        return asdict(self)


class CNNEncoder(nn.Module):
    """The tutorial's encoder: one fully connected layer over each region's features, then ReLU.

    Features are first standardised per channel with statistics of the training set (fixed buffers,
    saved with the weights). Same function class as the tutorial's FC layer, but a far better
    conditioned one: on the synthetic benchmark it learns the objects about twice as fast.
    """

    def __init__(self, feature_dim: int, embedding_dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(feature_dim, embedding_dim)
        self.register_buffer("feature_mean", torch.zeros(feature_dim))
        self.register_buffer("feature_scale", torch.ones(feature_dim))

    def set_normalization(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.feature_mean.copy_(mean)
        self.feature_scale.copy_(1.0 / std.clamp(min=1e-3))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = (features - self.feature_mean) * self.feature_scale
        return F.relu(self.fc(x))  # (B, 64, 2048) -> (B, 64, E)


class BahdanauAttention(nn.Module):
    """Additive attention: score = V·tanh(W1·f + W2·h), softmax over the 64 regions."""

    def __init__(self, embedding_dim: int, units: int) -> None:
        super().__init__()
        self.W1 = nn.Linear(embedding_dim, units)
        self.W2 = nn.Linear(units, units)
        self.V = nn.Linear(units, 1)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """W1·f: depends only on the image, so it is computed once per batch, not once per step."""
        return self.W1(features)  # (B, 64, E) -> (B, 64, U)

    def forward(
        self, features: torch.Tensor, projected: torch.Tensor, hidden: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        score = self.V(torch.tanh(projected + self.W2(hidden).unsqueeze(1))).squeeze(-1)  # (B, 64)
        alpha = torch.softmax(score.float(), dim=-1).to(features.dtype)  # (B, 64), sums to 1
        context = torch.bmm(alpha.unsqueeze(1), features).squeeze(1)  # (B, E)
        return context, alpha


class Captioner(nn.Module):
    """Encoder + attention + GRU decoder; teacher-forced `forward`, one-step `step` for generation."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        E, H = config.embedding_dim, config.units
        self.encoder = CNNEncoder(config.feature_dim, E)
        self.attention = BahdanauAttention(E, H)
        self.embedding = nn.Embedding(config.vocab_size, E, padding_idx=0)
        self.gru = nn.GRUCell(E + E, H)
        self.dropout = nn.Dropout(config.dropout)
        self.fc1 = nn.Linear(H, H)
        self.fc2 = nn.Linear(H, config.vocab_size)
        self.init_h = nn.Linear(E, H) if config.init_state else None

    def encode(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image features (B, 64, 2048) -> encoded regions (B, 64, E) and their attention projection (B, 64, U)."""
        encoded = self.encoder(features)
        return encoded, self.attention.project(encoded)

    def init_hidden(self, encoded: torch.Tensor) -> torch.Tensor:
        """The GRU's first state (B, H) for encoded regions (B, 64, E)."""
        if self.init_h is None:
            return encoded.new_zeros(encoded.shape[0], self.config.units)  # the tutorial starts at 0
        return torch.tanh(self.init_h(encoded.mean(dim=1)))

    def step(
        self, words: torch.Tensor, hidden: torch.Tensor, encoded: torch.Tensor, projected: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One decoding step: previous words (B,) -> logits (B, V), new hidden (B, H), attention (B, 64)."""
        context, alpha = self.attention(encoded, projected, hidden)
        x = torch.cat([context, self.embedding(words)], dim=-1)  # (B, 2E)
        hidden = self.gru(x, hidden)
        logits = self.fc2(self.fc1(self.dropout(hidden)))
        return logits, hidden, alpha

    def forward(
        self,
        features: torch.Tensor,
        captions: torch.Tensor,
        image_index: torch.Tensor | None = None,
        packed: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher forcing over captions (N, T) of token ids starting with <start>, padded with 0.

        `image_index` (N,) maps each caption to its image in `features` (B, 64, 2048), so an image with
        five captions is encoded once. Captions sorted by descending length let each step run only on
        the captions still going (no compute on padding). Returns logits (N, T-1, V) predicting
        captions[:, 1:] and attention (N, T-1, 64); padded positions are zero. `packed`: logits (K, V) of
        the K real target tokens only, in row-major order of `captions[:, 1:] != 0` (what `caption_loss` takes).

        The step is the tutorial's with the work that does not depend on the previous state hoisted out of
        the time loop: W1·features once per batch, the embeddings and their GRU input projection for all
        steps at once, W2·h and the GRU's W_hh·h as one matmul, and the output layers once after the loop.
        """
        encoded, projected = self.encode(features)
        if image_index is not None:
            encoded, projected = encoded[image_index], projected[image_index]  # (N, 64, E), (N, 64, U)
        N, T = captions.shape
        E = self.config.embedding_dim
        running = self._running(captions)  # captions still going at each step (one host sync, not one per step)
        w_ih, b_ih = self.gru.weight_ih, self.gru.bias_ih
        words = F.linear(self.embedding(captions[:, :-1].t()), w_ih[:, E:], b_ih).unbind(0)  # T-1 x (N, 3H)
        w_hidden = torch.cat([self.attention.W2.weight, self.gru.weight_hh])  # (U + 3H, H)
        b_hidden = torch.cat([self.attention.W2.bias, self.gru.bias_hh])
        hidden = self.init_hidden(encoded)  # (N, H)
        states, alphas = [], []  # step t's new state (running[t], H) and attention (running[t], 64)
        for t, n in enumerate(running):
            if n < hidden.shape[0]:  # the shortest captions ended: they never run again (sorted by length)
                encoded, projected, hidden = encoded[:n], projected[:n], hidden[:n]
            hidden, alpha = self._cell(words[t][:n], hidden, encoded, projected, w_hidden, b_hidden)
            states.append(hidden)
            alphas.append(alpha)
        computed = self._positions(running, N, T - 1, captions.device)  # (C,) row-major (caption, step)
        alpha = torch.cat(alphas)  # (C, 64)
        attention = alpha.new_zeros(N * (T - 1), NUM_REGIONS).index_copy(0, computed, alpha).view(N, T - 1, -1)
        mask = captions[:, 1:] != 0  # (N, T-1) real targets, all among the computed entries
        slot = computed.new_zeros(N * (T - 1))
        slot[computed] = torch.arange(len(computed), device=computed.device)
        real = self.fc2(self.fc1(self.dropout(torch.cat(states)[slot[mask.flatten()]])))  # (K, V), row-major
        if packed:
            return real, attention
        logits = real.new_zeros(N, T - 1, self.config.vocab_size)
        logits[mask] = real
        return logits, attention

    @staticmethod
    def _running(captions: torch.Tensor) -> list[int]:
        """Captions still going at each of the T-1 steps: all N unless sorted by descending length."""
        N, T = captions.shape
        lengths = (captions != 0).sum(dim=1) - 1  # steps each caption needs
        if N > 1 and not bool((lengths[:-1] >= lengths[1:]).all()):
            return [N] * (T - 1)
        steps = torch.arange(T - 1, device=captions.device)
        return [n for n in (lengths.unsqueeze(0) > steps.unsqueeze(1)).sum(1).tolist() if n > 0]

    @staticmethod
    def _positions(running: list[int], N: int, steps: int, device: torch.device) -> torch.Tensor:
        """Row-major index (caption * steps + step) of each (step, caption) computed, in the order computed."""
        counts = torch.tensor(running, device=device)
        caption, step = torch.arange(N, device=device), torch.arange(len(running), device=device)
        grid = caption.unsqueeze(0) * steps + step.unsqueeze(1)  # (T', N)
        return grid[caption.unsqueeze(0) < counts.unsqueeze(1)]

    def _cell(
        self,
        words: torch.Tensor,
        hidden: torch.Tensor,
        encoded: torch.Tensor,
        projected: torch.Tensor,
        w_hidden: torch.Tensor,
        b_hidden: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One teacher-forced step: attention and nn.GRUCell's update, with the input word's part `words`
        (n, 3H) computed beforehand; W2·h and W_hh·h as one matmul. Returns the new state (n, H) and alpha (n, 64)."""
        E, U = self.config.embedding_dim, self.attention.W2.out_features
        from_hidden = F.linear(hidden, w_hidden, b_hidden)  # (n, U + 3H)
        w2h, gh = from_hidden[:, :U], from_hidden[:, U:]
        score = self.attention.V(torch.tanh(projected + w2h.unsqueeze(1))).squeeze(-1)  # (n, 64)
        alpha = torch.softmax(score.float(), dim=-1).to(encoded.dtype)
        context = torch.bmm(alpha.unsqueeze(1), encoded).squeeze(1)  # (n, E)
        gi = words + F.linear(context, self.gru.weight_ih[:, :E])  # (n, 3H)
        i_r, i_z, i_n = gi.chunk(3, dim=1)
        h_r, h_z, h_n = gh.chunk(3, dim=1)
        r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
        candidate = torch.tanh(i_n + r * h_n)
        return candidate + z * (hidden - candidate), alpha  # nn.GRUCell's update


def caption_loss(
    logits: torch.Tensor,
    alphas: torch.Tensor,
    captions: torch.Tensor,
    attention_penalty: float = 0.0,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy over real tokens (padding masked, averaged over real tokens), plus Show, Attend and
    Tell's doubly stochastic penalty λ·mean_captions Σ_regions (1 − Σ_t α)² when `attention_penalty` > 0.
    `weights` (N,) counts each caption that many times (identical captions decoded once). `logits` are
    (N, T-1, V), or (K, V) packed: the real targets only (`Captioner.forward(..., packed=True)`)."""
    targets = captions[:, 1:]  # (N, T-1)
    real = targets != 0
    mask = real.float()
    if weights is not None:
        mask = mask * weights.unsqueeze(1)
    if logits.dim() == 2:  # packed: no compute on padding
        ce = F.cross_entropy(logits.float(), targets[real], reduction="none")  # (K,)
        loss = (ce * mask[real]).sum() / mask.sum().clamp(min=1)
    else:
        ce = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")  # (N, T-1)
        loss = (ce * mask).sum() / mask.sum().clamp(min=1)
    if attention_penalty > 0:
        coverage = (alphas.float() * (targets != 0).unsqueeze(-1)).sum(dim=1)  # (N, 64)
        per_caption = ((1.0 - coverage) ** 2).sum(dim=1)  # (N,)
        w = weights if weights is not None else torch.ones_like(per_caption)
        loss = loss + attention_penalty * (per_caption * w).sum() / w.sum()
    return loss


@dataclass
class Generation:
    """Batched decoding output; entries past `lengths[i]` are padding."""

    tokens: torch.Tensor  # (B, T) ids, <end> excluded
    attention: torch.Tensor  # (B, T, 64), each row sums to 1
    lengths: torch.Tensor  # (B,) number of generated words
    scores: torch.Tensor  # (B,) mean log-probability per emitted token (words + <end> when reached)


@torch.no_grad()
def greedy_search(
    model: Captioner, features: torch.Tensor, start_id: int, end_id: int, max_length: int = 20
) -> Generation:
    """Greedy decoding of a batch of images (B, 64, 2048); stops each sequence at <end> or `max_length` words."""
    encoded, projected = model.encode(features)
    B = features.shape[0]
    words = torch.full((B,), start_id, dtype=torch.long, device=features.device)
    hidden = model.init_hidden(encoded)
    tokens = torch.zeros(B, max_length, dtype=torch.long, device=features.device)
    attention = torch.zeros(B, max_length, NUM_REGIONS, device=features.device)
    logprob = torch.zeros(B, device=features.device)
    emitted = torch.zeros(B, device=features.device)
    lengths = torch.zeros(B, dtype=torch.long, device=features.device)
    done = torch.zeros(B, dtype=torch.bool, device=features.device)
    for t in range(max_length):
        logits, hidden, alpha = model.step(words, hidden, encoded, projected)
        logp = torch.log_softmax(logits.float(), dim=-1)
        best_logp, words = logp.max(dim=-1)
        live = ~done
        logprob += torch.where(live, best_logp, 0.0)
        emitted += live.float()
        is_word = live & (words != end_id)
        tokens[:, t] = torch.where(is_word, words, 0)
        attention[:, t] = torch.where(is_word.unsqueeze(1), alpha.float(), 0.0)
        lengths += is_word.long()
        done |= words == end_id
        if bool(done.all()):
            break
    return Generation(tokens, attention, lengths, logprob / emitted.clamp(min=1))


@torch.no_grad()
def beam_search(
    model: Captioner,
    features: torch.Tensor,
    start_id: int,
    end_id: int,
    beam_size: int = 3,
    max_length: int = 20,
    length_penalty: float = 1.0,
) -> Generation:
    """Batched beam search over B images x K beams at once; a beam ends at <end>, an image ends when its
    best finished beam beats its best live one. Finished beams are ranked by total log-probability divided by
    length**length_penalty; each beam carries its attention history so the winner's is returned.
    `beam_size=1` is exactly greedy decoding."""
    if beam_size == 1:
        return greedy_search(model, features, start_id, end_id, max_length)
    device = features.device
    B, K, V = features.shape[0], beam_size, model.config.vocab_size
    encoded, projected = model.encode(features)
    encoded = encoded.repeat_interleave(K, dim=0)  # (B*K, 64, E)
    projected = projected.repeat_interleave(K, dim=0)
    hidden = model.init_hidden(encoded)
    words = torch.full((B * K,), start_id, dtype=torch.long, device=device)
    beam_logp = torch.full((B, K), float("-inf"), device=device)
    beam_logp[:, 0] = 0.0  # all beams start identical: keep one so the first step does not pick K copies
    history = torch.zeros(B, K, 0, dtype=torch.long, device=device)
    att_history = torch.zeros(B, K, 0, NUM_REGIONS, device=device)
    best_score = torch.full((B,), float("-inf"), device=device)
    best_tokens = torch.zeros(B, max_length, dtype=torch.long, device=device)
    best_att = torch.zeros(B, max_length, NUM_REGIONS, device=device)
    best_len = torch.zeros(B, dtype=torch.long, device=device)
    best_mean = torch.zeros(B, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    arange_b = torch.arange(B, device=device)

    def norm(total: torch.Tensor, n: torch.Tensor | int) -> torch.Tensor:
        return total / (torch.as_tensor(n, device=device, dtype=torch.float) ** length_penalty)

    for t in range(max_length + 1):
        logits, hidden, alpha = model.step(words, hidden, encoded, projected)
        logp = torch.log_softmax(logits.float(), dim=-1).view(B, K, V)
        total = beam_logp.unsqueeze(-1) + logp  # (B, K, V)
        # Beams that end here: candidate finished captions of t words (plus <end>).
        end_total = total[..., end_id]  # (B, K)
        end_score = norm(end_total, t + 1)
        if t == max_length:  # forced stop: the live beams end as they are, without <end>
            end_total, end_score = beam_logp, norm(beam_logp, max(t, 1))
        cand_score, cand_k = end_score.max(dim=1)  # (B,)
        better = (cand_score > best_score) & ~done
        if bool(better.any()):
            idx = arange_b[better]
            k = cand_k[better]
            best_score[idx] = cand_score[better]
            best_len[idx] = t
            best_mean[idx] = end_total[idx, k] / (t + 1 if t < max_length else max(t, 1))
            best_tokens[idx] = 0
            best_att[idx] = 0
            if t > 0:
                best_tokens[idx, :t] = history[idx, k]
                best_att[idx, :t] = att_history[idx, k]
        if t == max_length:
            break
        # Continue with the K best non-<end> extensions.
        total[..., end_id] = float("-inf")
        top_logp, top_idx = total.view(B, K * V).topk(K, dim=1)  # (B, K)
        parent, words_bk = top_idx // V, top_idx % V
        # An image is finished once its best finished caption beats its best live beam scored at the
        # current length (the usual beam-search stopping rule).
        bound = norm(top_logp[:, 0], t + 1)
        done |= best_score >= bound
        if bool(done.all()):
            break
        beam_logp = top_logp
        history = torch.cat([history.gather(1, parent.unsqueeze(-1).expand(-1, -1, t)), words_bk.unsqueeze(-1)], 2)
        parent_alpha = alpha.view(B, K, NUM_REGIONS).gather(1, parent.unsqueeze(-1).expand(-1, -1, NUM_REGIONS))
        prev_att = att_history.gather(1, parent.view(B, K, 1, 1).expand(-1, -1, t, NUM_REGIONS))
        att_history = torch.cat([prev_att, parent_alpha.float().unsqueeze(2)], dim=2)
        flat_parent = (parent + arange_b.unsqueeze(1) * K).view(-1)
        hidden = hidden[flat_parent]
        words = words_bk.view(-1)
    return Generation(best_tokens, best_att, best_len, best_mean)


def adam(parameters: Iterable[torch.nn.Parameter], lr: float) -> torch.optim.Adam:
    """Adam as the training step uses it: the fused implementation (one pass over all parameters, measured
    ~10% faster per step than the per-tensor default on a CPU), the multi-tensor one where fused is missing."""
    params = list(parameters)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError):  # an older PyTorch, or a device without the fused kernel
        return torch.optim.Adam(params, lr=lr, foreach=True)
