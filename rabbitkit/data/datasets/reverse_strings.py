"""``reverse_strings``: the sequence-to-sequence toy task (reverse a character string).

The output must depend on the whole input, so the encoder's final state (the
talk's "summary vector") has to carry all of it.  Training pairs are drawn fresh
for every batch; the validation and test strings are held out of training.
"""
import numpy as np

from ...hookspecs import hookimpl
from ...models.seq2seq import ReverseTask
from ..base import Dataset, Split


def load_reverse_strings(
    seed: int = 0,
    alphabet: str = "abcdef",
    min_length: int = 3,
    max_length: int = 6,
    n_val: int = 150,
    n_test: int = 150,
    train_batches: int = 100,
):
    """A :class:`~rabbitkit.data.base.Dataset` of task ``"seq2seq"``.

    ``train_batches``: generated batches per epoch.  ``dataset.generator`` is the
    :class:`~rabbitkit.models.seq2seq.ReverseTask` that encodes strings and draws
    training batches.
    """
    generator = ReverseTask(alphabet, min_length, max_length, held_out=n_val + n_test, seed=seed)
    order = np.random.default_rng(seed).permutation(len(generator.held_out))
    held = np.array(generator.held_out, dtype=object)[order]
    splits = {
        "val": Split(held[:n_val], np.array([s[::-1] for s in held[:n_val]], dtype=object)),
        "test": Split(held[n_val:], np.array([s[::-1] for s in held[n_val:]], dtype=object)),
    }
    info = {"alphabet": alphabet, "lengths": f"{min_length}..{max_length}", "train": f"{train_batches} generated batches per epoch"}
    dataset = Dataset("reverse_strings", "seq2seq", (max_length,), generator.vocab_size, None, splits, info)
    dataset.generator = generator
    dataset.train_batches = int(train_batches)
    return dataset


@hookimpl
def rabbit_datasets():
    return {"reverse_strings": load_reverse_strings}
