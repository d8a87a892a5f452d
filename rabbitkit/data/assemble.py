"""Shared last steps of the image dataset readers: seeds, validation split, Dataset."""
import numpy as np

from .base import Dataset, Split
from .splitting import split_validation


def seed_streams(seed, n):
    """``n`` independent generators derived from one dataset seed."""
    return [np.random.default_rng(s) for s in np.random.SeedSequence(int(seed)).spawn(n)]


def image_dataset(name, arrays, class_names, val_fraction, rng, info, by_group=True):
    """A classification Dataset from cached arrays ``train_x/train_y[/train_groups][/test_x/test_y]``.

    The validation split is carved out of the training pool here (after the
    cache), so changing the seed or the fraction needs no new decoding.
    """
    groups = arrays.get("train_groups")
    pool = Split(arrays["train_x"], arrays["train_y"].astype(np.int64), None if groups is None else groups.astype(np.int64))
    train, val = split_validation(pool, val_fraction, rng, by_group=by_group)
    splits = {"train": train}
    if len(val):
        splits["val"] = val
    if "test_x" in arrays and len(arrays["test_x"]):
        splits["test"] = Split(arrays["test_x"], arrays["test_y"].astype(np.int64))
    return Dataset(
        name=name,
        task="classification",
        input_shape=pool.x.shape[1:],
        num_classes=len(class_names),
        class_names=list(class_names),
        splits=splits,
        info=info,
    )
