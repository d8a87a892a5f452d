"""Sequence to sequence (Sutskever et al. 2014): an encoder LSTM's final state — the
talk's "summary vector" — initialises a decoder LSTM.

Training uses teacher forcing: the decoder reads ``GO, y_1, ..., y_L`` and is
trained to emit ``y_1, ..., y_L, EOS`` (cross-entropy over every position); the
gradient reaching the decoder's initial state flows into the encoder through
``LSTM.backward(None, state_grad=...)``.  Evaluation decodes greedily, feeding
each predicted token back until EOS.

:class:`ReverseTask` generates the classic toy problem (reverse a string over a
small alphabet) with a held-out set never drawn for training;
:func:`train_seq2seq` trains a :class:`Seq2Seq` on it and reports held-out
sequence accuracy (whole strings exactly right).
"""
import time

import numpy as np

from ..backend import to_host
from ..errors import ConfigError
from ..hookspecs import hookimpl
from ..layers.base import Layer
from ..backend.cpu import SINGLE_THREADED_BLAS
from ..layers.dense import Dense
from ..layers.embedding import Embedding
from ..layers.recurrent import LSTM
from ..losses import SoftmaxCrossEntropy
from ..optim import Adam, clip_grad_norm

PAD, GO, EOS = 0, 1, 2  # reserved token ids; characters start at 3
SPECIALS = 3


class Seq2Seq(Layer):
    """Encoder-decoder over token ids with a shared vocabulary of ``vocab_size`` ids.

    ``forward((source, decoder_input))`` with int arrays (N, S) and (N, L) returns
    decoder logits (N, L, vocab_size); ``backward(dlogits)`` returns None (token
    inputs have no gradient).  Children, in order: source embedding, encoder LSTM,
    target embedding, decoder LSTM, output Dense — parameters are named by that
    position ("1.weight_ih_l0" is the encoder's), as in a Sequential.
    """

    device_agnostic = True  # runs through its children, which must each have CUDA kernels

    def __init__(self, vocab_size, hidden_size=64, embedding_dim=16, num_layers=1, dtype=np.float32):
        super().__init__(dtype)
        self.vocab_size = int(vocab_size)
        self.hidden_size = int(hidden_size)
        self.source_embedding = Embedding(self.vocab_size, embedding_dim, dtype=dtype)
        self.encoder = LSTM(embedding_dim, hidden_size, num_layers=num_layers, return_sequences=False, dtype=dtype)
        self.target_embedding = Embedding(self.vocab_size, embedding_dim, dtype=dtype)
        self.decoder = LSTM(embedding_dim, hidden_size, num_layers=num_layers, dtype=dtype)
        self.head = Dense(hidden_size, self.vocab_size, dtype=dtype)

    def children(self):
        return [self.source_embedding, self.encoder, self.target_embedding, self.decoder, self.head]

    def encode(self, source, training=False):
        """Run the encoder; returns its final (h, c), the summary of the source."""
        self.encoder.forward(self.source_embedding.forward(source, training), training)
        return self.encoder.final_state

    def forward(self, x, training=True):
        """Teacher-forced decoder logits for ``x = (source ids, decoder input ids)``."""
        source, decoder_input = x
        self.decoder.initial_state = self.encode(source, training)
        hidden = self.decoder.forward(self.target_embedding.forward(decoder_input, training), training)
        return self.head.forward(hidden, training)

    def backward(self, dy):
        dhidden = self.head.backward(dy)
        self.target_embedding.backward(self.decoder.backward(dhidden))
        # The decoder started from the encoder's final state: its gradient goes there.
        self.source_embedding.backward(self.encoder.backward(None, state_grad=self.decoder.initial_state_grad))
        return None

    def greedy_decode(self, source, max_length):
        """Token ids (N, max_length) decoded greedily, EOS included; PAD after an EOS."""
        source = np.asarray(source)
        batch = source.shape[0]
        self.decoder.initial_state = self.encode(source)
        token = np.full((batch, 1), GO, dtype=np.int64)
        out = np.full((batch, max_length), PAD, dtype=np.int64)
        finished = np.zeros(batch, dtype=bool)
        for step in range(max_length):
            logits = to_host(self.head.forward(self.decoder.forward(self.target_embedding.forward(token, False), False),
                                               False))
            token = np.argmax(logits[:, -1], axis=-1).astype(np.int64).reshape(batch, 1)
            out[:, step] = np.where(finished, PAD, token[:, 0])
            finished |= token[:, 0] == EOS
            if finished.all():
                break
            self.decoder.initial_state = self.decoder.final_state  # carry the state one step
        self.decoder.initial_state = None
        return out

    def output_shape(self, input_shape):
        """Logits per decoder position: (target length, vocabulary) for a source of ``input_shape``."""
        return (int(input_shape[0]) + 1, self.vocab_size)

    def extra_repr(self):
        return f"vocab={self.vocab_size}, hidden={self.hidden_size}, layers={self.encoder.num_layers}"


def build_seq2seq(input_shape, num_outputs, dtype=np.float32, hidden_size: int = 64, embedding_dim: int = 16,
                  num_layers: int = 1):
    """The ``seq2seq`` architecture: a :class:`Seq2Seq` over ``num_outputs`` token ids."""
    return Seq2Seq(num_outputs, hidden_size=hidden_size, embedding_dim=embedding_dim, num_layers=num_layers,
                   dtype=dtype)


@hookimpl
def rabbit_architectures():
    return {"seq2seq": build_seq2seq}


class ReverseTask:
    """Reverse strings of ``min_length``..``max_length`` characters from ``alphabet``.

    ``held_out`` strings (drawn once from ``seed``) are excluded from every training
    batch, so accuracy on them measures generalisation, not memory.  Token ids:
    PAD 0, GO 1, EOS 2, then the alphabet.
    """

    def __init__(self, alphabet="abcdef", min_length=3, max_length=6, held_out=300, seed=0):
        if not 1 <= min_length <= max_length:
            raise ConfigError(f"ReverseTask: need 1 <= min_length <= max_length, got {min_length}, {max_length}")
        self.alphabet = str(alphabet)
        self.min_length = int(min_length)
        self.max_length = int(max_length)
        self.vocab_size = SPECIALS + len(self.alphabet)
        rng = np.random.default_rng(seed)
        held = set()
        while len(held) < held_out:
            held.add(self._random_string(rng, int(rng.integers(self.min_length, self.max_length + 1))))
        self.held_out = sorted(held)

    def _random_string(self, rng, length):
        return "".join(self.alphabet[i] for i in rng.integers(0, len(self.alphabet), length))

    def encode(self, text):
        return np.array([SPECIALS + self.alphabet.index(ch) for ch in text], dtype=np.int64)

    def decode(self, ids):
        """Characters up to the first EOS (PAD/GO skipped)."""
        chars = []
        for i in np.asarray(ids).reshape(-1):
            if i == EOS:
                break
            if i >= SPECIALS:
                chars.append(self.alphabet[i - SPECIALS])
        return "".join(chars)

    def arrays(self, strings):
        """(source, decoder input, decoder target) for equal-length ``strings``."""
        source = np.stack([self.encode(s) for s in strings])
        target = source[:, ::-1]
        batch = len(strings)
        decoder_input = np.concatenate([np.full((batch, 1), GO), target], axis=1)
        decoder_target = np.concatenate([target, np.full((batch, 1), EOS)], axis=1)
        return source, np.ascontiguousarray(decoder_input), np.ascontiguousarray(decoder_target)

    def training_batch(self, batch_size, rng):
        """One batch of fresh strings, all of one random length (no padding needed)."""
        length = int(rng.integers(self.min_length, self.max_length + 1))
        held = set(self.held_out)
        strings = []
        while len(strings) < batch_size:
            s = self._random_string(rng, length)
            if s not in held:
                strings.append(s)
        return self.arrays(strings)


def sequence_accuracy(model, task, strings=None):
    """Fraction of ``strings`` (default: the held-out set) reversed exactly by greedy decoding."""
    strings = task.held_out if strings is None else list(strings)
    correct = 0
    by_length = {}
    for s in strings:
        by_length.setdefault(len(s), []).append(s)
    for length, group in by_length.items():
        source, _, _ = task.arrays(group)
        decoded = model.greedy_decode(source, length + 1)
        correct += sum(task.decode(row) == s[::-1] for row, s in zip(decoded, group))
    return correct / max(1, len(strings))


def train_seq2seq(model, task, steps=2000, batch_size=64, lr=1e-2, max_norm=5.0, seed=0, eval_every=0,
                  target_accuracy=None, log=None):
    """Train ``model`` on ``task`` with teacher forcing, Adam and global-norm clipping.

    BLAS runs single-threaded meanwhile: the products here are tiny (batch x hidden),
    and a multi-threaded BLAS spends more on waking and synchronising its threads
    than it gains (on a busy machine, 10-100x more); the recurrent kernels still
    split the batch over Numba's threads.

    Returns a dict: "losses" (per step), "accuracy" (held-out sequence accuracy at
    the end), "steps" (taken), "seconds".  With ``eval_every`` > 0 the held-out
    accuracy is measured every so many steps and training stops early once it
    reaches ``target_accuracy``; ``log(step, loss, accuracy)`` is called then.
    """
    with SINGLE_THREADED_BLAS:
        return _train(model, task, steps, batch_size, lr, max_norm, seed, eval_every, target_accuracy, log)


def _train(model, task, steps, batch_size, lr, max_norm, seed, eval_every, target_accuracy, log):
    rng = np.random.default_rng(seed)
    loss = SoftmaxCrossEntropy()
    optimizer = Adam(model.parameters(), lr=lr)
    losses = []
    accuracy = None
    start = time.perf_counter()
    step = 0
    for step in range(1, steps + 1):
        source, decoder_input, decoder_target = task.training_batch(batch_size, rng)
        optimizer.zero_grad()
        losses.append(loss.forward(model.forward((source, decoder_input), training=True), decoder_target))
        model.backward(loss.backward())
        if max_norm:
            clip_grad_norm(model.parameters(), max_norm, return_norm=False)
        optimizer.step()
        if eval_every and step % eval_every == 0:
            accuracy = sequence_accuracy(model, task)
            if log is not None:
                log(step, float(np.mean(losses[-eval_every:])), accuracy)
            if target_accuracy is not None and accuracy >= target_accuracy:
                break
    if accuracy is None or not (eval_every and step % eval_every == 0):
        accuracy = sequence_accuracy(model, task)
    return {"losses": losses, "accuracy": accuracy, "steps": step, "seconds": time.perf_counter() - start}
