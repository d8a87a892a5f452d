"""Character corpora for char-level language models (char-rnn style).

The corpus is one text file (``path``, or the only ``.txt`` file in the
``path`` folder / in ``$RABBIT_DATA/text/``).  Its sorted set of characters is the
vocabulary; the encoded corpus is cut into contiguous train/validation/test
pieces (char-rnn: 90/5/5).  :meth:`TextDataset.stream_batches` yields (x, y)
batches of shape (N, T) with next-character targets, where row i of each batch
continues exactly where row i of the previous batch stopped, so a recurrent
net can carry its hidden state across batches (truncated BPTT).
"""
from pathlib import Path

import numpy as np

from ...errors import DataError
from ...hookspecs import hookimpl
from .. import paths
from ..base import Dataset, Split

NAME = "text"


class TextDataset(Dataset):
    """A character corpus: ``vocab``, ``encode``/``decode`` and stateful batches.

    ``splits[name].x`` is the encoded piece (int64, 1-D) and ``y`` is None: the
    targets are the next characters.  ``input_shape`` is ``(vocab size,)`` (one
    one-hot vector per time step) and ``num_classes`` the vocabulary size.
    """

    def __init__(self, vocab, splits, info):
        super().__init__(name=NAME, task="language_model", input_shape=(len(vocab),), num_classes=len(vocab),
                         class_names=list(vocab), splits=splits, info=info)
        self.vocab = list(vocab)
        codes = np.array([ord(ch) for ch in self.vocab], np.int64)
        self._lookup = np.full(int(codes.max()) + 1 if len(codes) else 1, -1, np.int64)
        self._lookup[codes] = np.arange(len(codes))

    @property
    def vocab_size(self):
        return len(self.vocab)

    def encode(self, text):
        """int64 ids of the characters of ``text`` (DataError for one outside the vocabulary)."""
        codes = np.frombuffer(text.encode("utf-32-le"), np.uint32).astype(np.int64)
        ids = np.where(codes < len(self._lookup), self._lookup[np.minimum(codes, len(self._lookup) - 1)], -1)
        bad = np.flatnonzero(ids < 0)
        if len(bad):
            raise DataError(f"character {text[bad[0]]!r} (position {bad[0]}) is not in the corpus vocabulary")
        return ids

    def decode(self, ids):
        """The string of the ids ``ids``."""
        return "".join(self.vocab[i] for i in np.asarray(ids).reshape(-1))

    def _piece(self, split):
        if isinstance(split, str):
            if split not in self.splits:
                raise DataError(f"text: no split '{split}'; have {', '.join(self.splits)}")
            return self.splits[split].x
        return np.asarray(split)

    def batch_count(self, split, batch_size, seq_len, offset=0):
        """How many batches :meth:`stream_batches` yields."""
        usable = len(self._piece(split)) - int(offset) - 1
        return max(0, usable // (batch_size * seq_len))

    def stream_batches(self, split, batch_size, seq_len, offset=0):
        """Yield (x, y) int64 (batch_size, seq_len) batches; y is x shifted by one character.

        The piece (from ``offset``; draw a random offset per epoch to vary the
        cut points) is divided into ``batch_size`` contiguous rows; batch k holds
        columns [k*seq_len, (k+1)*seq_len) of every row, so each row continues
        where it stopped in the previous batch.
        """
        data = self._piece(split)
        count = self.batch_count(split, batch_size, seq_len, offset)
        if count == 0:
            raise DataError(
                f"text: split of {len(data)} characters is too short for batch_size {batch_size} x seq_len {seq_len}"
            )
        used = count * batch_size * seq_len
        rows_x = data[offset:offset + used].reshape(batch_size, count * seq_len)
        rows_y = data[offset + 1:offset + used + 1].reshape(batch_size, count * seq_len)
        for k in range(count):
            cols = slice(k * seq_len, (k + 1) * seq_len)
            yield np.ascontiguousarray(rows_x[:, cols]), np.ascontiguousarray(rows_y[:, cols])

    def summary(self, max_classes=60):
        lines = [f"dataset {self.name}: task {self.task}, vocabulary of {self.vocab_size} characters"]
        lines += [f"  {k}: {v}" for k, v in self.info.items()]
        lines += [f"  {name}: {len(s)} characters" for name, s in self.splits.items()]
        shown = "".join(self.vocab).encode("unicode_escape").decode("ascii")
        lines.append(f"  vocabulary: {shown}")
        return "\n".join(lines)


def _corpus_file(root):
    if root.is_file():
        return root
    texts = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() == ".txt")
    if len(texts) == 1:
        return texts[0]
    if (root / "input.txt").is_file():
        return root / "input.txt"
    found = ", ".join(p.name for p in texts) or "none"
    raise DataError(f"{root}: expected exactly one .txt corpus file in the folder (found: {found}); set path to the file")


def load_text(
    path: str | None = None,
    seed: int = 0,
    split: list[float] | tuple = (0.9, 0.05, 0.05),
    encoding: str = "utf-8",
):
    """Load a character corpus (see the module docstring).

    Args:
        path: the text file, or a folder holding one; default ``$RABBIT_DATA/text/``.
        seed: unused (the split is contiguous); accepted like every dataset's seed.
        split: train/val/test fractions of the corpus, in this order (summing to 1;
            a zero fraction leaves the split out).
        encoding: the file's text encoding.
    """
    fractions = [float(f) for f in split]
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6 or fractions[0] <= 0:
        raise DataError(f"text: split must be three fractions (train, val, test) summing to 1, got {list(split)}")
    root = paths.resolve(NAME, path)
    if root is None:
        raise paths.missing(NAME)
    file = _corpus_file(Path(root))
    try:
        corpus = file.read_text(encoding=encoding)
    except UnicodeDecodeError as err:
        raise DataError(f"{file}: not valid {encoding} text at byte {err.start}; set the encoding option") from None
    if len(corpus) < 2:
        raise DataError(f"{file}: the corpus is empty; expected a text file")
    vocab = sorted(set(corpus))
    dataset = TextDataset(vocab, {}, {"source": str(file)})
    ids = dataset.encode(corpus)
    bounds = np.round(np.cumsum([0.0] + fractions) * len(ids)).astype(np.int64)
    for name, lo, hi in zip(("train", "val", "test"), bounds[:-1], bounds[1:]):
        if hi > lo:
            dataset.splits[name] = Split(ids[lo:hi], None)
    return dataset


@hookimpl
def rabbit_datasets():
    return {NAME: load_text}
