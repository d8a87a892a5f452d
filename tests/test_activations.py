"""Activations: finite-difference gradients, numpy references, CUDA parity (simulator)."""
import numpy as np
import pytest

from rabbitkit.errors import ConfigError
from rabbitkit.layers import LeakyReLU, Linear, PReLU, ReLU, Sigmoid, Softmax, Softsign, Tanh
from rabbitkit.plugins import registry
from rabbitkit.testing import check_cuda_parity, check_gradients


def softmax_reference(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def prelu_reference(x, slopes):
    if slopes.size == 1:
        a = slopes[0]
    else:
        a = slopes.reshape((1, -1) + (1,) * (x.ndim - 2))
    return np.where(x > 0, x, a * x)


# name -> (factory taking dtype, numpy reference of the forward pass, kink or None)
ACTIVATIONS = {
    "ReLU": (lambda dtype: ReLU(dtype=dtype), lambda x: np.maximum(x, 0), 0.0),
    "LeakyReLU": (lambda dtype: LeakyReLU(0.2, dtype=dtype), lambda x: np.where(x > 0, x, 0.2 * x), 0.0),
    "PReLU": (lambda dtype: PReLU(dtype=dtype), lambda x: np.where(x > 0, x, 0.25 * x), 0.0),
    "Tanh": (lambda dtype: Tanh(dtype=dtype), np.tanh, None),
    "Softsign": (lambda dtype: Softsign(dtype=dtype), lambda x: x / (1 + np.abs(x)), None),
    "Sigmoid": (lambda dtype: Sigmoid(dtype=dtype), lambda x: 1 / (1 + np.exp(-x)), None),
    "Linear": (lambda dtype: Linear(dtype=dtype), lambda x: x, None),
    "Softmax": (lambda dtype: Softmax(dtype=dtype), softmax_reference, None),
}
SHAPES = [(1, 5), (3, 7), (2, 3, 4)]


def test_all_activations_are_registered_layers():
    layers = registry("layers")
    for name in ACTIVATIONS:
        assert name in layers
        assert layers.provider(name) == "rabbitkit.layers.activations"


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_gradients(name, shape):
    make, _, kink = ACTIVATIONS[name]
    report = check_gradients(make(np.float64), shape, input_range=(-3.0, 3.0), kink=kink)
    checked = report.checked["input"] + report.skipped.get("input", 0)
    assert checked == np.prod(shape)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-12), (np.float32, 2e-6)])
def test_forward_matches_numpy(name, shape, dtype, rtol, rng):
    make, reference, _ = ACTIVATIONS[name]
    x = rng.uniform(-4, 4, size=shape)
    y = make(dtype).forward(x.astype(dtype))
    assert y.dtype == dtype and y.shape == x.shape
    expected = reference(x.astype(dtype).astype(np.float64))
    np.testing.assert_allclose(y, expected, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sigmoid_and_softmax_are_stable_for_huge_inputs(dtype):
    x = np.array([[-1e4, -800.0, 0.0, 800.0, 1e4]], dtype=dtype)
    y = Sigmoid(dtype=dtype).forward(x)
    assert np.all(np.isfinite(y))
    np.testing.assert_array_equal(y[0, [0, 1, 3, 4]], [0, 0, 1, 1])
    assert y[0, 2] == 0.5
    p = Softmax(dtype=dtype).forward(x)
    assert np.all(np.isfinite(p))
    np.testing.assert_allclose(p, [[0, 0, 0, 0, 1]], atol=1e-30)


def test_softmax_rows_sum_to_one_and_backward_uses_the_jacobian(rng):
    layer = Softmax(dtype=np.float64)
    x = rng.standard_normal((3, 4, 5))
    y = layer.forward(x)
    np.testing.assert_allclose(y.sum(-1), 1.0, rtol=1e-12)
    dy = rng.standard_normal(x.shape)
    dx = layer.backward(dy)
    for index in np.ndindex(3, 4):
        p = y[index]
        jacobian = np.diag(p) - np.outer(p, p)
        np.testing.assert_allclose(dx[index], jacobian @ dy[index], rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("shape", [(1, 3), (2, 3, 4), (3, 3, 2, 2)])
def test_prelu_per_channel_gradients_and_reference(shape, rng):
    layer = PReLU(num_parameters=3, dtype=np.float64)
    layer.params["weight"][:] = [0.1, -0.3, 0.7]
    report = check_gradients(layer, shape, kink=0.0, input_range=(-2.0, 2.0))
    assert report.checked["weight"] == 3
    x = rng.uniform(-2, 2, size=shape)
    np.testing.assert_allclose(layer.forward(x), prelu_reference(x, layer.params["weight"]), rtol=1e-15)


def test_prelu_slope_gradient_against_numpy(rng):
    layer = PReLU(num_parameters=2, init=0.5, dtype=np.float64)
    x = rng.standard_normal((4, 2, 3))
    dy = rng.standard_normal(x.shape)
    layer.forward(x)
    dx = layer.backward(dy)
    expected_dw = np.where(x <= 0, x * dy, 0).sum(axis=(0, 2))
    np.testing.assert_allclose(layer.grads["weight"], expected_dw, rtol=1e-12)
    np.testing.assert_allclose(dx, np.where(x > 0, dy, 0.5 * dy), rtol=1e-15)


def test_prelu_parameter_is_role_other_and_checks_channels():
    layer = PReLU(num_parameters=4, init=0.1)
    assert layer.param_roles["weight"] == "other"
    assert layer.params["weight"].shape == (4,)
    np.testing.assert_allclose(layer.params["weight"], 0.1)
    with pytest.raises(ConfigError, match="4 channels"):
        layer.forward(np.zeros((2, 3), dtype=np.float32))


def test_linear_is_the_identity_without_copies():
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    layer = Linear()
    assert layer.forward(x) is x
    assert layer.backward(x) is x


def test_leaky_relu_gradient_of_negative_inputs_is_the_slope():
    layer = LeakyReLU(negative_slope=0.1, dtype=np.float64)
    x = np.array([[-2.0, -0.5, 0.5, 2.0]])
    layer.forward(x)
    np.testing.assert_allclose(layer.backward(np.ones_like(x)), [[0.1, 0.1, 1.0, 1.0]])


CUDA_CASES = [
    (lambda: ReLU(), (2, 3)),
    (lambda: LeakyReLU(0.1), (2, 3)),
    (lambda: PReLU(), (3, 2)),
    (lambda: PReLU(num_parameters=3, init=0.2), (2, 3, 2)),
    (lambda: Tanh(), (2, 3)),
    (lambda: Softsign(), (1, 4)),
    (lambda: Sigmoid(), (2, 3)),
    (lambda: Linear(), (2, 3)),
    (lambda: Softmax(), (2, 2, 3)),
]


@pytest.mark.parametrize("make,shape", CUDA_CASES, ids=lambda v: getattr(v, "__name__", str(v)))
def test_cuda_matches_cpu(make, shape):
    # inputs spread over +-3 so the saturating functions are exercised off their linear part
    x = np.random.default_rng(3).uniform(-3, 3, size=shape).astype(np.float32)
    check_cuda_parity(make, shape, inputs=x)


@pytest.mark.parametrize("num_parameters", [1, 3])
def test_prelu_parallel_kernels_on_a_large_input(num_parameters, rng):
    # above the sized_kernel threshold, so the parallel reduction over the batch runs
    layer = PReLU(num_parameters=num_parameters, init=0.3, dtype=np.float64)
    x = rng.standard_normal((8, 3, 64, 32))
    dy = rng.standard_normal(x.shape)
    np.testing.assert_allclose(layer.forward(x), np.where(x > 0, x, 0.3 * x), rtol=1e-15)
    layer.backward(dy)
    axes = (0, 1, 2, 3) if num_parameters == 1 else (0, 2, 3)
    np.testing.assert_allclose(layer.grads["weight"], np.where(x <= 0, x * dy, 0).sum(axis=axes), rtol=1e-10)


def test_softmax_parallel_kernel_on_a_large_input(rng):
    x = rng.standard_normal((512, 100))
    np.testing.assert_allclose(Softmax(dtype=np.float64).forward(x), softmax_reference(x), rtol=1e-12)
