"""Flatten: shapes, views, gradients and CUDA (device arrays reshape too)."""
import numpy as np

from rabbitkit.layers.flatten import Flatten
from rabbitkit.testing import check_cuda_parity, check_gradients


def test_flatten_keeps_the_batch_axis_and_restores_the_shape(rng):
    x = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    layer = Flatten()
    y = layer.forward(x)
    assert y.shape == (2, 60)
    assert np.shares_memory(y, x)  # a view
    np.testing.assert_array_equal(y[1], x[1].reshape(-1))
    assert layer.backward(y).shape == x.shape
    assert layer.output_shape((3, 4, 5)) == (60,)
    assert layer.supports_cuda() and Flatten.device_agnostic


def test_gradients():
    check_gradients(Flatten(dtype=np.float64), (1, 2, 3))


def test_cuda_matches_cpu():
    check_cuda_parity(Flatten, (2, 2, 3))
