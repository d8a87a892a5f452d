"""Mini-batches with a background thread, so gathering and augmenting overlap training.

The order of the samples and every random number a transform uses are drawn
from the loader's generator in the calling thread when an epoch starts, so an
epoch's batches depend only on that generator's state (not on thread timing).
"""
import queue
import threading

import numpy as np


def make_transform(pipeline=None, augmenter=None):
    """A loader transform: preprocessing (if any), then augmentation (if any), per batch."""

    def transform(xb, yb, rng):
        if pipeline is not None:
            xb = pipeline.apply(xb)
        if augmenter is not None and augmenter.enabled:
            xb, yb = augmenter(xb, yb, rng)
        return xb, yb

    return transform


class _Stop:
    """Sentinel that ends an epoch (or carries the worker's exception)."""

    def __init__(self, error=None):
        self.error = error


class BatchLoader:
    """Iterate (xb, yb) mini-batches of ``x``/``y`` for one epoch per ``iter()``.

    Args:
        x, y: arrays with the samples along axis 0 (``y`` may be None).
        batch_size: samples per batch (the last batch is smaller unless ``drop_last``).
        shuffle: a new permutation each epoch, drawn from ``rng``.
        rng: a numpy Generator (needed for shuffling and random transforms).
        transform: ``transform(xb, yb, rng) -> (xb, yb)``, run in the background
            thread with a per-batch generator spawned from ``rng``
            (see :func:`make_transform`).
        drop_last: skip a final incomplete batch.
        prefetch: batches prepared ahead; 0 runs everything in the calling thread.
    """

    def __init__(self, x, y, batch_size, shuffle=False, rng=None, transform=None, drop_last=False, prefetch=2):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if y is not None and len(y) != len(x):
            raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
        self.x, self.y = x, y
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.rng = rng if rng is not None else np.random.default_rng(0)
        self.transform = transform
        self.drop_last = drop_last
        self.prefetch = int(prefetch)

    def __len__(self):
        n = len(self.x)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _plan(self):
        """(index arrays, per-batch generators) of one epoch, drawn in the calling thread."""
        n = len(self.x)
        order = self.rng.permutation(n) if self.shuffle else np.arange(n)
        batches = [order[i * self.batch_size:(i + 1) * self.batch_size] for i in range(len(self))]
        rngs = [None] * len(batches)
        if self.transform is not None:
            seeds = self.rng.integers(0, 2**63, size=len(batches))
            rngs = [np.random.default_rng(int(s)) for s in seeds]
        return batches, rngs

    def _make(self, index, rng):
        if self.shuffle:
            xb = np.take(self.x, index, axis=0)
            yb = None if self.y is None else np.take(self.y, index, axis=0)
        else:  # contiguous slices, copied so a transform may work in place
            xb = np.array(self.x[index[0]:index[-1] + 1])
            yb = None if self.y is None else np.array(self.y[index[0]:index[-1] + 1])
        if self.transform is not None:
            xb, yb = self.transform(xb, yb, rng)
        return xb, yb

    def __iter__(self):
        return self.batches()

    def batches(self, start=0, stop=None):
        """Batches ``start`` .. ``stop - 1`` of the epoch, exactly as a full iteration makes them.

        The whole epoch's plan is drawn first, so a run resumed in the middle of an
        epoch sees the same batches and random numbers it would have seen.
        """
        batches, rngs = self._plan()
        batches, rngs = batches[start:stop], rngs[start:stop]
        if self.prefetch <= 0:
            for index, rng in zip(batches, rngs):
                yield self._make(index, rng)
            return
        ready = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def work():
            try:
                for index, rng in zip(batches, rngs):
                    item = self._make(index, rng)
                    while not stop.is_set():
                        try:
                            ready.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
                ready.put(_Stop())
            except BaseException as err:  # handed to the consumer, re-raised there
                ready.put(_Stop(err))

        thread = threading.Thread(target=work, name="rabbitkit-batches", daemon=True)
        thread.start()
        try:
            while True:
                item = ready.get()
                if isinstance(item, _Stop):
                    if item.error is not None:
                        raise item.error
                    return
                yield item
        finally:
            # The consumer stopped early (break, exception, Ctrl-C): release the worker.
            stop.set()
            while thread.is_alive():
                try:
                    ready.get_nowait()
                except queue.Empty:
                    pass
                thread.join(timeout=0.05)
