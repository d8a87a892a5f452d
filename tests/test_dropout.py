"""Dropout: inverted scaling, evaluation identity, reproducible masks, gradients, CUDA."""
import numpy as np
import pytest

import rabbitkit
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

