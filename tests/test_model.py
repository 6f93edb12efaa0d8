import pytest
import torch

from raycap.model import Captioner, ModelConfig, beam_search, caption_loss, greedy_search

START, END = 2, 3


def _model(vocab: int = 12, seed: int = 0, init_state: bool = False) -> Captioner:
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=vocab, feature_dim=32, embedding_dim=16, units=24, init_state=init_state)
    return Captioner(config).eval()


def _features(b: int = 3) -> torch.Tensor:
    return torch.randn(b, 64, 32)


def _captions() -> torch.Tensor:
    return torch.tensor([[START, 5, 6, 7, END], [START, 8, 9, END, 0], [START, 4, END, 0, 0]])


def test_teacher_forcing_shapes_attention_sums_and_padding_is_zero():
    model = _model()
    logits, alphas = model(_features(), _captions())
    assert logits.shape == (3, 4, 12) and alphas.shape == (3, 4, 64)
    torch.testing.assert_close(alphas[0].sum(-1), torch.ones(4))
    assert alphas[2, 2:].abs().sum() == 0 and logits[2, 2:].abs().sum() == 0  # steps past <end> never run


def test_loss_masks_padding_and_averages_over_real_tokens():
    model = _model()
    caps = _captions()
    logits, alphas = model(_features(), caps)
    loss = caption_loss(logits, alphas, caps)
    targets = caps[:, 1:]
    ce = torch.nn.functional.cross_entropy(logits[targets != 0], targets[targets != 0])
    torch.testing.assert_close(loss, ce)
    garbage = logits.clone()
    garbage[targets == 0] = 1e4  # changing padded positions must not change the loss
    torch.testing.assert_close(caption_loss(garbage, alphas, caps), loss)
    assert caption_loss(logits, alphas, caps, attention_penalty=1.0) > loss
    # A caption with weight 2 counts as two copies of it.
    doubled = caption_loss(logits[[0, 0, 1, 2]], alphas[[0, 0, 1, 2]], caps[[0, 0, 1, 2]], attention_penalty=0.5)
    weighted = caption_loss(logits, alphas, caps, attention_penalty=0.5, weights=torch.tensor([2.0, 1.0, 1.0]))
    torch.testing.assert_close(weighted, doubled)


def test_sorted_fast_path_equals_running_every_caption_to_the_end():
    model = _model()
    feats, caps = _features(), _captions()
    fast, _ = model(feats, caps)
    unsorted = caps[[2, 0, 1]]
    slow, _ = model(feats[[2, 0, 1]], unsorted)
    mask = caps[[2, 0, 1], 1:] != 0
    torch.testing.assert_close(fast[[2, 0, 1]][mask], slow[mask])


def test_image_index_encodes_each_image_once_for_all_its_captions():
    model = _model()
    feats = _features(2)
    caps = _captions()
    index = torch.tensor([1, 0, 1])
    shared, _ = model(feats, caps, index)
    repeated, _ = model(feats[index], caps)
    torch.testing.assert_close(shared, repeated)


def test_greedy_stops_at_end_and_returns_attention_per_word():
    model = _model()
    with torch.no_grad():
        model.fc2.bias.zero_()
        model.fc2.bias[END] = 50.0  # <end> wins at the first step
    gen = greedy_search(model, _features(), START, END, max_length=7)
    assert gen.lengths.tolist() == [0, 0, 0]
    assert gen.tokens.abs().sum() == 0
    with torch.no_grad():
        model.fc2.bias[END] = -50.0
        model.fc2.bias[7] = 50.0  # never ends: cut at max_length
    gen = greedy_search(model, _features(), START, END, max_length=7)
    assert gen.lengths.tolist() == [7, 7, 7]
    assert (gen.tokens == 7).all()
    torch.testing.assert_close(gen.attention.sum(-1), torch.ones(3, 7))
    assert (gen.scores <= 0).all() and (gen.scores > -1e-3).all()


def test_beam_size_one_is_greedy_and_wider_beams_never_score_worse():
    model = _model(seed=3)
    feats = _features(4)
    greedy = greedy_search(model, feats, START, END, max_length=6)
    beam1 = beam_search(model, feats, START, END, beam_size=1, max_length=6)
    assert torch.equal(greedy.tokens, beam1.tokens) and torch.equal(greedy.lengths, beam1.lengths)
    beam4 = beam_search(model, feats, START, END, beam_size=4, max_length=6, length_penalty=0.0)
    # With no length normalisation, beam search maximises total log-probability: never below greedy's.
    greedy_total = greedy.scores * (greedy.lengths + (greedy.lengths < 6).long()).float()
    beam_total = beam4.scores * (beam4.lengths + (beam4.lengths < 6).long()).float()
    assert (beam_total >= greedy_total - 1e-4).all()
    for i, n in enumerate(beam4.lengths.tolist()):
        torch.testing.assert_close(beam4.attention[i, :n].sum(-1), torch.ones(n))
        assert beam4.attention[i, n:].abs().sum() == 0


@pytest.mark.parametrize("init_state", [False, True])
def test_beam_search_returns_the_attention_of_the_chosen_words(init_state):
    model = _model(seed=5, init_state=init_state)
    feats = _features(2)
    beam = beam_search(model, feats, START, END, beam_size=3, max_length=5)
    # Replaying the chosen words with teacher forcing reproduces the returned attention.
    for i in range(2):
        n = int(beam.lengths[i])
        caps = torch.tensor([[START, *beam.tokens[i, :n].tolist(), END]])
        _, alphas = model(feats[i : i + 1], caps)
        torch.testing.assert_close(alphas[0, :n], beam.attention[i, :n], atol=1e-5, rtol=1e-4)


def _reference_loss(model: Captioner, feats: torch.Tensor, caps: torch.Tensor, penalty: float) -> torch.Tensor:
    """The tutorial's computation: every caption its own feature copy, `step` over every time step, padding too."""
    encoded, projected = model.encode(feats)
    hidden = model.init_hidden(encoded)
    logits, alphas = [], []
    for t in range(caps.shape[1] - 1):
        step_logits, hidden, alpha = model.step(caps[:, t], hidden, encoded, projected)
        logits.append(step_logits)
        alphas.append(alpha)
    targets = caps[:, 1:]
    alphas_t = torch.stack(alphas, 1) * (targets != 0).unsqueeze(-1)  # attention past <end> does not count
    ce = torch.nn.functional.cross_entropy(torch.stack(logits, 1)[targets != 0], targets[targets != 0])
    coverage = alphas_t.sum(1)
    return ce + penalty * ((1.0 - coverage) ** 2).sum(1).mean()


@pytest.mark.parametrize("init_state", [False, True])
def test_hoisted_step_loss_and_gradients_equal_the_reference_per_step_computation(init_state):
    model = _model(vocab=12, seed=7, init_state=init_state).train()
    feats = _features(2)
    caps = torch.tensor([[START, 5, 6, 7, 8, END], [START, 8, 9, 4, END, 0], [START, 4, END, 0, 0, 0]])
    index = torch.tensor([1, 0, 1])
    reference = _reference_loss(model, feats[index], caps, penalty=0.5)
    ref_grads = torch.autograd.grad(reference, list(model.parameters()))
    logits, alphas = model(feats, caps, index, packed=True)
    assert logits.shape == (int((caps[:, 1:] != 0).sum()), 12)  # no logits computed for padding
    loss = caption_loss(logits, alphas, caps, attention_penalty=0.5)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    torch.testing.assert_close(loss, reference)
    for (name, _), g, r in zip(model.named_parameters(), grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, msg=name)
    full, _ = model(feats, caps, index)
    torch.testing.assert_close(caption_loss(full, alphas, caps, attention_penalty=0.5), loss)
