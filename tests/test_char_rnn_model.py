"""The char_rnn architecture: structure, training on synthetic text, clipping, sampling."""
import numpy as np
import pytest

import rabbitkit
from rabbitkit.errors import ConfigError
from rabbitkit.layers.dense import Dense
from rabbitkit.layers.embedding import Embedding, OneHot
from rabbitkit.layers.recurrent import GRU, LSTM, RNN
from rabbitkit.losses import SoftmaxCrossEntropy
from rabbitkit.models.char_rnn import build_char_rnn, rabbit_architectures, sample
from rabbitkit.optim import SGD, Adam, clip_grad_norm
from rabbitkit.testing import check_gradients

VOCAB = "abcdefgh"


def periodic_text(length, period=VOCAB):
    return np.array([i % len(period) for i in range(length)], dtype=np.int64)


def stream(ids, batch, steps):
    """Contiguous rows, each batch continuing where the last stopped (as the text dataset does)."""
    per_row = (len(ids) - 1) // batch
    rows_x = ids[: batch * per_row].reshape(batch, per_row)
    rows_y = ids[1: batch * per_row + 1].reshape(batch, per_row)
    for k in range(per_row // steps):
        cols = slice(k * steps, (k + 1) * steps)
        yield rows_x[:, cols], rows_y[:, cols]


def train_step(model, loss, optimizer, x, y, max_norm=None):
    optimizer.zero_grad()
    value = loss.forward(model.forward(x, training=True), y)
    model.backward(loss.backward())
    if max_norm is not None:
        clip_grad_norm(model.parameters(), max_norm)
    optimizer.step()
    return value


def test_registered_architecture_and_structure():
    assert rabbit_architectures() == {"char_rnn": build_char_rnn}
    model = build_char_rnn((65,), 65)
    encoder, recurrent, head = model.layers
    assert isinstance(encoder, OneHot) and isinstance(recurrent, LSTM) and isinstance(head, Dense)
    assert recurrent.stateful and recurrent.return_sequences and recurrent.num_layers == 2
    assert recurrent.hidden_size == 128 and not recurrent.needs_input_grad
    assert "1.weight_ih_l0" in model.state_dict() and model.state_dict()["1.weight_ih_l0"].shape == (512, 65)
    assert model.forward(np.zeros((2, 3), dtype=np.int64)).shape == (2, 3, 65)

    gru = build_char_rnn((10,), 10, cell="GRU", hidden_size=8, num_layers=1, embedding_dim=4, dtype="float64")
    assert isinstance(gru[0], Embedding) and isinstance(gru[1], GRU) and gru[1].needs_input_grad
    assert gru.forward(np.array([[1, 2, 3]])).dtype == np.float64
    assert isinstance(build_char_rnn((5,), 5, cell="rnn")[1], RNN)
    assert build_char_rnn((5,), 5, peephole=True)[1].peephole
    with pytest.raises(ConfigError, match="did you mean 'lstm'"):
        build_char_rnn((5,), 5, cell="lstn")
    with pytest.raises(ConfigError, match="peephole"):
        build_char_rnn((5,), 5, cell="gru", peephole=True)


@pytest.mark.parametrize("embedding_dim", [None, 3])
def test_whole_model_gradients(embedding_dim, rng):
    model = build_char_rnn((6,), 6, dtype=np.float64, hidden_size=4, num_layers=2, embedding_dim=embedding_dim)
    model[1].stateful = False  # check_gradients runs many forwards; each must start from zeros
    report = check_gradients(model, inputs=rng.integers(0, 6, (2, 5)), check_input=False)
    assert set(report.checked) == {name for name, _, _ in model.named_parameters()}


def test_char_rnn_learns_periodic_text():
    rabbitkit.manual_seed(0)
    model = build_char_rnn((len(VOCAB),), len(VOCAB), hidden_size=32, num_layers=1)
    loss = SoftmaxCrossEntropy()
    optimizer = Adam(model.parameters(), lr=1e-2)
    ids = periodic_text(4 * 16 * 100 + 1)
    losses = []
    for epoch in range(3):
        model.reset_state()
        losses += [train_step(model, loss, optimizer, x, y, max_norm=5.0) for x, y in stream(ids, 4, 16)]
    assert losses[0] > 1.8  # about ln(8) at the start
    assert np.mean(losses[-10:]) < 0.1 * losses[0]
    text = sample(model, VOCAB, "abc", 20, temperature=0)
    assert text == ("abcdefgh" * 3)[:23]


def test_gradient_clipping_prevents_divergence():
    """A tanh RNN with a large recurrent matrix and a large SGD step explodes unless clipped."""

    def run(max_norm):
        rabbitkit.manual_seed(0)
        model = build_char_rnn((len(VOCAB),), len(VOCAB), cell="rnn", hidden_size=32, num_layers=1)
        orthogonal, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((32, 32)))
        model[1].params["weight_hh_l0"][...] = 2.0 * orthogonal  # spectral radius 2
        loss = SoftmaxCrossEntropy()
        optimizer = SGD(model.parameters(), lr=2.0)
        ids = periodic_text(2000)
        losses = []
        for step in range(40):
            offset = (step * 7) % 1000
            x = np.stack([ids[offset + 50 * k: offset + 50 * k + 40] for k in range(8)])
            y = np.stack([ids[offset + 50 * k + 1: offset + 50 * k + 41] for k in range(8)])
            model.reset_state()
            losses.append(train_step(model, loss, optimizer, x, y, max_norm=max_norm))
        return np.array(losses)

    unclipped = run(None)
    clipped = run(1.0)
    assert not np.all(np.isfinite(unclipped)) or unclipped.max() > 5 * unclipped[0]
    assert np.all(np.isfinite(clipped)) and clipped.max() < 2 * clipped[0]
    assert clipped[-5:].mean() < 0.1 * clipped[0]


def test_sample_prime_vocabulary_temperature_and_state(rng):
    model = build_char_rnn((len(VOCAB),), len(VOCAB), hidden_size=8, num_layers=2)
    model.forward(np.zeros((3, 4), dtype=np.int64))  # leaves a carried training state
    with pytest.raises(ConfigError, match=r"'x', 'z'"):
        sample(model, VOCAB, "abzx", 5)
    greedy = sample(model, VOCAB, "ab", 12, temperature=0)
    assert greedy.startswith("ab") and len(greedy) == 14 and set(greedy) <= set(VOCAB)
    assert sample(model, VOCAB, "ab", 12, temperature=0) == greedy  # state reset: repeatable
    assert sample(model, list(VOCAB), "ab", 30, temperature=1.0, rng=7) == sample(model, VOCAB, "ab", 30, 1.0, rng=7)
    assert len(sample(model, VOCAB, "", 5, temperature=1.0, rng=1)) == 6
    assert sample(model, VOCAB, "abc", 0) == "abc"

    # Step-by-step sampling sees exactly what one forward over the whole text sees.
    text = sample(model, VOCAB, "ab", 6, temperature=0.8, rng=3)
    ids = np.array([[VOCAB.index(ch) for ch in text]])
    model.reset_state()
    logits = model.forward(ids, training=False)
    model.reset_state()
    step_logits = [model.forward(ids[:, :2], training=False)[0, -1]]
    for k in range(2, len(text)):
        step_logits.append(model.forward(ids[:, k: k + 1], training=False)[0, -1])
    np.testing.assert_allclose(np.array(step_logits), logits[0, 1:], rtol=1e-5, atol=1e-6)

    class Corpus:  # anything with .vocab works, like the text dataset
        vocab = list(VOCAB)

    assert sample(model, Corpus(), "ab", 4, temperature=0) == greedy[:6]
    with pytest.raises(ConfigError, match="temperature"):
        sample(model, VOCAB, "a", 3, temperature=-1)


def test_sample_works_with_a_non_stateful_model():
    model = build_char_rnn((len(VOCAB),), len(VOCAB), hidden_size=8, num_layers=1)
    model[1].stateful = False
    reference = sample(model, VOCAB, "abc", 8, temperature=0)
    assert not model[1].stateful  # restored
    model[1].stateful = True
    assert sample(model, VOCAB, "abc", 8, temperature=0) == reference
