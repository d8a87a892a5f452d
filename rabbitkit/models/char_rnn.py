"""char-rnn (Karpathy 2015): a character-level language model and its sampler.

Architecture ``char_rnn``: integer character ids (N, T) -> 1-of-k codes (or a
learned embedding) -> a stack of stateful recurrent layers -> a time-distributed
Dense layer producing logits (N, T, V) for
:class:`rabbitkit.losses.SoftmaxCrossEntropy` with (N, T) next-character targets.
The recurrent layer is stateful: batch k + 1 continues from the state batch k
ended in (truncated BPTT over contiguous rows, see
:meth:`rabbitkit.data.datasets.text.TextDataset.stream_batches`); call
``model.reset_state()`` at the start of every epoch and before evaluation.

:func:`sample` generates text from a trained model, one character per step.
"""
import numpy as np

from ..backend import to_host
from ..errors import ConfigError, did_you_mean
from ..hookspecs import hookimpl
from ..layers.dense import Dense
from ..layers.embedding import Embedding, OneHot
from ..layers.recurrent import GRU, LSTM, RNN, Recurrent
from ..layers.sequential import Sequential

CELLS = {"lstm": LSTM, "gru": GRU, "rnn": RNN}


def build_char_rnn(
    input_shape,
    num_outputs,
    dtype=np.float32,
    cell: str = "lstm",
    hidden_size: int = 128,
    num_layers: int = 2,
    dropout: float = 0.0,
    embedding_dim: int | None = None,
    peephole: bool = False,
):
    """Sequential [OneHot(V) | Embedding(V, E), LSTM/GRU/RNN (stateful), Dense(H, V)].

    Args:
        input_shape: per-sample input shape from the dataset; the input vocabulary is
            ``num_outputs`` (the text dataset reports ``(V,)``), so it is not needed.
        num_outputs: vocabulary size V (inputs are ids in [0, V), outputs V logits).
        cell: "lstm", "gru" or "rnn" (tanh).
        hidden_size, num_layers: of the recurrent stack.
        dropout: between stacked recurrent layers, in training only.
        embedding_dim: a learned embedding of this size instead of one-hot codes.
        peephole: Gers' peephole connections (LSTM only).
    """
    vocab = int(num_outputs)
    if vocab < 1:
        raise ConfigError(f"char_rnn needs a vocabulary of at least one character, got num_outputs={num_outputs}")
    cell_name = str(cell).lower()
    if cell_name not in CELLS:
        raise ConfigError(f"char_rnn: unknown cell '{cell}'{did_you_mean(cell_name, CELLS)}; known: {', '.join(CELLS)}")
    options = {}
    if peephole:
        if cell_name != "lstm":
            raise ConfigError(f"char_rnn: peephole connections exist for the lstm cell only, not '{cell_name}'")
        options["peephole"] = True
    if embedding_dim is None:
        encoder = OneHot(vocab, dtype=dtype)
        features = vocab
    else:
        encoder = Embedding(vocab, int(embedding_dim), dtype=dtype)
        features = int(embedding_dim)
    recurrent = CELLS[cell_name](
        features, hidden_size, num_layers=num_layers, return_sequences=True, dropout=dropout,
        stateful=True, dtype=dtype, **options,
    )
    if embedding_dim is None:
        recurrent.needs_input_grad = False  # one-hot codes have no gradient to receive
    return Sequential([encoder, recurrent, Dense(hidden_size, vocab, dtype=dtype)], dtype=dtype)


# -- sampling ---------------------------------------------------------------------------
def _vocabulary(vocab_or_dataset):
    """The list of characters, from a dataset (``.vocab``) or a sequence of characters."""
    vocab = getattr(vocab_or_dataset, "vocab", vocab_or_dataset)
    vocab = list(vocab)
    if not vocab or not all(isinstance(ch, str) and len(ch) == 1 for ch in vocab):
        raise ConfigError("sample needs a vocabulary: a text dataset or a sequence of single characters")
    return vocab


def _recurrent_layers(layer):
    found = [layer] if isinstance(layer, Recurrent) else []
    for child in layer.children():
        found += _recurrent_layers(child)
    return found


def _rng(rng):
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


def next_char_id(logits, temperature, rng):
    """Draw an id from softmax(logits / temperature); temperature 0 takes the argmax."""
    logits = np.asarray(logits, dtype=np.float64).reshape(-1)
    if temperature == 0:
        return int(np.argmax(logits))
    scaled = logits / temperature
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    return int(rng.choice(probs.size, p=probs))


def sample(model, vocab_or_dataset, prime: str, length: int, temperature: float = 1.0, rng=None) -> str:
    """Generate ``length`` characters after ``prime`` and return ``prime`` + them.

    The model's recurrent state is reset, the prime is run through it in one
    forward pass, then each drawn character is fed back one step at a time (T = 1)
    with the state carried between steps; the state is reset again at the end.  An
    empty prime starts from a character drawn uniformly from the vocabulary (which
    is then part of the returned text).

    Args:
        model: a char_rnn model (any layer producing (N, T, V) logits from (N, T) ids
            with recurrent layers inside; they are made stateful while sampling).
        vocab_or_dataset: the text dataset the model was trained on, or its vocabulary
            (a string or list of characters, in id order).
        temperature: softmax temperature; 0 is greedy (always the likeliest character),
            below 1 more conservative, above 1 more varied.
        rng: a numpy Generator or a seed (None: fresh entropy).
    """
    vocab = _vocabulary(vocab_or_dataset)
    index = {ch: i for i, ch in enumerate(vocab)}
    temperature = float(temperature)
    length = int(length)
    if temperature < 0:
        raise ConfigError(f"sample: temperature must be >= 0, got {temperature}")
    if length < 0:
        raise ConfigError(f"sample: length must be >= 0, got {length}")
    unknown = sorted({ch for ch in prime if ch not in index})
    if unknown:
        shown = ", ".join(repr(ch) for ch in unknown)
        raise ConfigError(f"sample: the prime has characters outside the model's vocabulary: {shown}")
    rng = _rng(rng)
    if not prime:
        prime = vocab[int(rng.integers(len(vocab)))]
    recurrent = _recurrent_layers(model)
    was_stateful = [layer.stateful for layer in recurrent]
    for layer in recurrent:
        layer.stateful = True
    try:
        model.reset_state()
        ids = np.array([[index[ch] for ch in prime]], dtype=np.int64)
        logits = to_host(model.forward(ids, training=False))
        out = []
        for step in range(length):
            nxt = next_char_id(logits[0, -1], temperature, rng)
            out.append(vocab[nxt])
            if step + 1 < length:
                logits = to_host(model.forward(np.array([[nxt]], dtype=np.int64), training=False))
    finally:
        model.reset_state()
        for layer, stateful in zip(recurrent, was_stateful):
            layer.stateful = stateful
    return prime + "".join(out)


@hookimpl
def rabbit_architectures():
    return {"char_rnn": build_char_rnn}
