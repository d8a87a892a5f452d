"""Dropout: inverted scaling, evaluation identity, reproducible masks, gradients, CUDA."""
import numpy as np
import pytest

import rabbitkit
from rabbitkit.backend import to_host
from rabbitkit.errors import ConfigError
from rabbitkit.layers.dropout import Dropout
from rabbitkit.testing import check_cuda_parity, check_gradients


def test_training_drops_and_scales(rng):
    layer = Dropout(0.3)
    x = rng.uniform(1, 2, (200, 50)).astype(np.float32)  # no zeros in the input
    y = layer.forward(x, training=True)
    kept = y != 0
    assert abs(kept.mean() - 0.7) < 0.02  # 10,000 draws: 4.5 standard deviations
    np.testing.assert_allclose(y[kept], x[kept] / 0.7, rtol=1e-6)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    dx = layer.backward(dy)
    np.testing.assert_allclose(dx, np.where(kept, dy / 0.7, 0), rtol=1e-6)


def test_evaluation_is_the_identity(rng):
    x = rng.standard_normal((3, 4, 5)).astype(np.float32)
    layer = Dropout(0.5)
    np.testing.assert_array_equal(layer.forward(x, training=False), x)
    np.testing.assert_array_equal(layer.backward(x), x)


def test_masks_are_reproducible_from_seeds():
    x = np.ones((4, 3, 5, 5), np.float32)
    first, second = Dropout(0.5), Dropout(0.5)
    first.seed(7)
    second.seed(7)
    np.testing.assert_array_equal(first.forward(x), second.forward(x))
    assert not np.array_equal(first.forward(x), first.forward(x))  # the stream moves on between steps
    rabbitkit.manual_seed(11)
    a = Dropout(0.5).forward(x)
    rabbitkit.manual_seed(11)
    b = Dropout(0.5).forward(x)
    np.testing.assert_array_equal(a, b)


def test_extreme_probabilities():
    x = np.ones((2, 3), np.float32)
    np.testing.assert_array_equal(Dropout(0.0).forward(x), x)
    layer = Dropout(1.0)
    np.testing.assert_array_equal(layer.forward(x), np.zeros_like(x))
    np.testing.assert_array_equal(layer.backward(x), np.zeros_like(x))
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        Dropout(1.5)


@pytest.mark.parametrize("shape", [(1, 7), (2, 3, 4), (2, 2, 3, 3)])
def test_gradients(shape):
    check_gradients(Dropout(0.4, dtype=np.float64), shape)


def test_cuda_matches_cpu():
    check_cuda_parity(lambda: Dropout(0.5), (2, 3, 4))


# -- the mask: Philox-4x32-10 made inside the kernels --------------------------------

# Random123's known-answer vectors for Philox-4x32-10 (kat_vectors): counter words,
# key words, the four output words.
PHILOX_KNOWN_ANSWERS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter, key, expected", PHILOX_KNOWN_ANSWERS)
def test_philox_gives_the_reference_words(counter, key, expected):
    """The shared function as Python (what the CUDA simulator runs) and as its CPU
    build give Random123's words: the generator is Philox-4x32-10 itself."""
    import numba

    from rabbitkit.backend.philox import _philox4x32_10, philox4x32_10_cpu

    block, stream, key64 = (np.uint64(high << 32 | low) for low, high in
                            ((counter[0], counter[1]), (counter[2], counter[3]), key))
    words_cpu = numba.njit(lambda b, s, k: philox4x32_10_cpu(b, s, k))(block, stream, key64)
    assert tuple(int(w) for w in _philox4x32_10(block, stream, key64)) == expected
    assert tuple(int(w) for w in words_cpu) == expected


def masked(key, stream, p, n, dtype=np.float32):
    """dropout_cpu applied to ones: the mask (as bools) of (key, stream) for n elements."""
    from rabbitkit.backend.philox import keep_threshold
    from rabbitkit.layers.dropout import dropout_cpu

    y = np.empty(n, dtype)
    dropout_cpu(np.ones(n, dtype), np.uint64(key), np.uint64(stream), keep_threshold(p), dtype(1.0), y)
    return y != 0


def within_binomial_bound(count, trials, probability, deviations=5.0):
    """|count - trials * probability| within ``deviations`` binomial standard deviations
    (5: a false alarm about once in 1.7 million)."""
    return abs(count - trials * probability) <= deviations * np.sqrt(trials * probability * (1 - probability))


@pytest.mark.parametrize("p", [0.05, 0.25, 0.5, 0.8, 0.97])
def test_keep_fraction_is_binomial(p):
    n = (1 << 20) + 3  # not a multiple of four: the last block of words is partial
    kept = masked(key=0x5EED, stream=1, p=p, n=n)
    assert within_binomial_bound(kept.sum(), n, 1 - p)
    # Each quarter of the elements takes another word of the Philox blocks: each keeps
    # 1 - p, and agrees with the first quarter only by chance (p**2 + (1 - p)**2), as
    # neighbours do (a word reused across lanes or elements would show here).
    quarter = -(-n // 4)
    last = n - 3 * quarter  # the length of the last quarter
    agree = p ** 2 + (1 - p) ** 2
    for lane in range(4):
        part = kept[lane * quarter:(lane + 1) * quarter]
        assert within_binomial_bound(part.sum(), part.size, 1 - p), lane
        if lane:
            assert within_binomial_bound((part[:last] == kept[:last]).sum(), last, agree), lane
    assert within_binomial_bound((kept[:-1] == kept[1:]).sum(), n - 1, agree)


def test_masks_are_functions_of_key_and_stream():
    n = 1 << 16
    first = masked(key=7, stream=0, p=0.5, n=n)
    np.testing.assert_array_equal(first, masked(key=7, stream=0, p=0.5, n=n))
    # another stream or key: an unrelated mask (agreeing on about half the elements)
    for other in (masked(key=7, stream=1, p=0.5, n=n), masked(key=8, stream=0, p=0.5, n=n)):
        assert within_binomial_bound((other == first).sum(), n, 0.5)


def test_each_training_forward_takes_the_next_stream_and_backward_reuses_it(rng):
    layer = Dropout(0.5)
    layer.seed(3)
    x = rng.uniform(1, 2, 1000).astype(np.float32)
    for stream in range(3):
        assert layer.stream == stream
        y = layer.forward(x)
        np.testing.assert_array_equal(y != 0, masked(layer.key, stream, 0.5, x.size))
        dy = rng.standard_normal(x.size).astype(np.float32)
        np.testing.assert_array_equal(layer.backward(dy), np.where(y != 0, dy * np.float32(2.0), 0))
    layer.forward(x, training=False)  # evaluation takes no stream
    assert layer.stream == 3


def test_reseeding_restarts_the_masks():
    """What exact resume rests on: the trainer reseeds the model before every step,
    and a layer whose streams have moved on then drops what a fresh one does."""
    x = np.ones((8, 50), np.float32)
    used = Dropout(0.3)
    for _ in range(3):
        used.forward(x)
    used.seed(11)
    fresh = Dropout(0.3)
    fresh.seed(11)
    np.testing.assert_array_equal(used.forward(x), fresh.forward(x))
    np.testing.assert_array_equal(used.forward(x), fresh.forward(x))
    assert used.key == fresh.key


@pytest.mark.parametrize("p", [0.3, 1.0])
def test_cuda_masks_are_the_cpu_masks_bit_for_bit(p, rng):
    """1,281 elements: a partial last block, and more blocks of words than the
    simulator's grid has threads (its grid-stride loop goes round)."""
    shape = (3, 7, 61)
    x = rng.uniform(-1, 1, shape).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    results = []
    for device in ("cpu", "cuda"):
        layer = Dropout(p).to(device)
        layer.seed(5)
        layer.forward(x)  # the second stream is compared
        y = to_host(layer.forward(x))
        results.append((y, to_host(layer.backward(dy))))
    (y_cpu, dx_cpu), (y_cuda, dx_cuda) = results
    np.testing.assert_array_equal(y_cuda, y_cpu)
    np.testing.assert_array_equal(dx_cuda, dx_cpu)
    if p < 1:
        assert within_binomial_bound((y_cpu != 0).sum(), x.size, 1 - p)
    else:
        assert not y_cpu.any() and not dx_cpu.any()


def test_a_cuda_step_copies_no_mask(rng, monkeypatch):
    """With the input on the device, forward and backward copy nothing between host and device."""
    import numba.cuda

    from rabbitkit.backend import get_backend

    backend = get_backend("cuda")
    layer = Dropout(0.5).to("cuda")
    x = backend.asarray(rng.uniform(1, 2, (4, 9)).astype(np.float32))
    dy = backend.asarray(rng.standard_normal((4, 9)).astype(np.float32))
    copies = []
    array_type = type(x)
    to_device, copy_to_host, into = numba.cuda.to_device, array_type.copy_to_host, array_type.copy_to_device
    monkeypatch.setattr(numba.cuda, "to_device", lambda *a, **k: copies.append("to_device") or to_device(*a, **k))
    monkeypatch.setattr(array_type, "copy_to_host",
                        lambda self, *a, **k: copies.append("copy_to_host") or copy_to_host(self, *a, **k))
    monkeypatch.setattr(array_type, "copy_to_device",
                        lambda self, *a, **k: copies.append("copy_to_device") or into(self, *a, **k))
    y = layer.forward(x)
    dx = layer.backward(dy)
    assert copies == []
    monkeypatch.undo()
    kept = y.copy_to_host() != 0
    assert 0 < kept.sum() < kept.size  # it did drop some and keep some
    np.testing.assert_array_equal(dx.copy_to_host() != 0, kept & (dy.copy_to_host() != 0))
