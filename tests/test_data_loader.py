"""BatchLoader: every sample once per epoch, determinism independent of the thread,
errors surfacing, early exit, and the preprocess+augment transform."""
import threading

import numpy as np
import pytest

from rabbitkit.data.augment import Augmenter
from rabbitkit.data.loader import BatchLoader, make_transform
from rabbitkit.data.preprocess import Pipeline


@pytest.fixture
def data():
    x = np.arange(23 * 2, dtype=np.float32).reshape(23, 2)
    return x, np.arange(23)


def test_shuffled_epoch_covers_every_sample_once(data):
    x, y = data
    loader = BatchLoader(x, y, batch_size=5, shuffle=True, rng=np.random.default_rng(0))
    assert len(loader) == 5
    batches = list(loader)
    assert [len(yb) for _, yb in batches] == [5, 5, 5, 5, 3]
    seen = np.concatenate([yb for _, yb in batches])
    assert sorted(seen) == list(range(23)) and not np.array_equal(seen, np.arange(23))
    for xb, yb in batches:
        np.testing.assert_array_equal(xb, x[yb])
    second = np.concatenate([yb for _, yb in loader])
    assert not np.array_equal(second, seen)  # a new permutation every epoch


def test_drop_last_and_order(data):
    x, y = data
    loader = BatchLoader(x, y, batch_size=5, drop_last=True)
    assert len(loader) == 4
    np.testing.assert_array_equal(np.concatenate([yb for _, yb in loader]), np.arange(20))


def test_deterministic_and_independent_of_prefetch(data):
    x, y = data
    augment = Augmenter(brightness=0.5)

    def transform(xb, yb, rng):
        return augment(xb[:, None, :, None], yb, rng)

    def epochs(prefetch):
        loader = BatchLoader(x, y, 4, shuffle=True, rng=np.random.default_rng(3), transform=transform, prefetch=prefetch)
        return [np.concatenate([xb.ravel() for xb, _ in loader]) for _ in range(2)]

    a, b, c = epochs(0), epochs(2), epochs(5)
    for one, two, three in zip(a, b, c):
        np.testing.assert_array_equal(one, two)
        np.testing.assert_array_equal(one, three)
    assert not np.array_equal(a[0], a[1])


def test_transform_runs_in_the_background_thread(data):
    x, y = data
    threads = set()

    def transform(xb, yb, rng):
        threads.add(threading.current_thread().name)
        return xb, yb

    list(BatchLoader(x, y, 4, transform=transform, prefetch=2))
    assert threads == {"rabbitkit-batches"}


def test_worker_error_reaches_the_consumer(data):
    x, y = data

    def transform(xb, yb, rng):
        if yb[0] >= 8:
            raise ValueError("bad batch")
        return xb, yb

    loader = BatchLoader(x, y, 4, transform=transform)
    got = []
    with pytest.raises(ValueError, match="bad batch"):
        for _, yb in loader:
            got.append(yb)
    assert len(got) == 2


def test_breaking_early_stops_the_worker(data):
    x, y = data
    before = threading.active_count()
    for _ in range(3):
        for _ in BatchLoader(x, y, 1, prefetch=1):
            break
    assert threading.active_count() == before


def test_make_transform_preprocesses_then_augments(rng):
    x = rng.integers(0, 256, (10, 3, 8, 8), dtype=np.uint8)
    y = np.arange(10)
    pipeline = Pipeline.from_config(["standardize"]).fit(x)
    transform = make_transform(pipeline, Augmenter(hflip=True))
    loader = BatchLoader(x, y, 5, transform=transform, rng=np.random.default_rng(1))
    xb, yb = next(iter(loader))
    assert xb.dtype == np.float32 and xb.shape == (5, 3, 8, 8)
    standardized = pipeline.apply(x[:5])
    for out, ref in zip(xb, standardized):
        assert np.array_equal(out, ref) or np.array_equal(out, ref[:, :, ::-1])
