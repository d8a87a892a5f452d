"""Dense, Sequential and the layer contract."""
import numpy as np
import pytest

import rabbitkit
from rabbitkit.errors import BackendError, CheckpointError
from rabbitkit.layers import Dense, Layer, ReLU, Tanh
from rabbitkit.testing import check_cuda_parity, check_gradients


@pytest.mark.parametrize("shape,features", [((1, 3), (3, 4)), ((5, 7), (7, 2)), ((2, 3, 4), (4, 5))])
@pytest.mark.parametrize("bias", [True, False])
def test_dense_gradients(shape, features, bias):
    report = check_gradients(Dense(*features, bias=bias, dtype=np.float64), shape)
    assert report.checked["input"] == min(np.prod(shape), 150)
    assert ("bias" in report.checked) == bias


def test_dense_matches_reference_and_accumulates(rng):
    layer = Dense(4, 3)
    x = rng.standard_normal((6, 4)).astype(np.float32)
    y = layer.forward(x)
    np.testing.assert_allclose(y, x @ layer.params["weight"].T + layer.params["bias"], rtol=1e-5, atol=1e-6)
    dy = rng.standard_normal((6, 3)).astype(np.float32)
    layer.backward(dy)
    layer.backward(dy)  # gradients add up until zero_grad
    np.testing.assert_allclose(layer.grads["weight"], 2 * dy.T @ x, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(layer.grads["bias"], 2 * dy.sum(0), rtol=1e-5, atol=1e-5)
    layer.zero_grad()
    assert not layer.grads["weight"].any() and not layer.grads["bias"].any()


def test_parameter_layout_follows_pytorch():
    layer = Dense(7, 3)
    assert layer.params["weight"].shape == (3, 7)
    assert layer.params["bias"].shape == (3,)
    assert set(layer.params) == set(layer.grads)
    assert layer.params["weight"].dtype == np.float32
    assert Dense(2, 2, dtype="float64").params["weight"].dtype == np.float64


def test_float64_input_is_cast_to_layer_dtype():
    y = Dense(2, 2).forward(np.ones((1, 2)))
    assert y.dtype == np.float32


def test_sequential_names_state_and_summary():
    model = rabbitkit.Sequential([Dense(3, 4), Tanh(), rabbitkit.Sequential([Dense(4, 4), ReLU()]), Dense(4, 2)])
    assert list(model.state_dict()) == ["0.weight", "0.bias", "2.0.weight", "2.0.bias", "3.weight", "3.bias"]
    assert model.output_shape((3,)) == (2,)
    assert model.num_parameters() == 16 + 20 + 10
    text = model.summary((3,))
    assert "Dense(3, 4" in text and "total parameters 46" in text and "cut short" not in text
    wide = rabbitkit.Sequential([rabbitkit.Sequential([Dense(4, 4) for _ in range(12)]), Dense(4, 2)])
    text = wide.summary((4,))
    assert all(len(line) < 2 * model.SUMMARY_WIDTH for line in text.splitlines()[2:-2])
    assert "Sequential(Dense(4, 4" in text and " …" in text and "`rabbit layers` lists every layer" in text
    other = rabbitkit.Sequential([Dense(3, 4), Tanh(), rabbitkit.Sequential([Dense(4, 4), ReLU()]), Dense(4, 2)])
    other.load_state_dict(model.state_dict())
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    np.testing.assert_array_equal(model.forward(x), other.forward(x))
    with pytest.raises(CheckpointError, match="missing"):
        other.load_state_dict({"0.weight": np.zeros((4, 3))})
    bad = model.state_dict()
    bad["3.bias"] = np.zeros(5)
    with pytest.raises(CheckpointError, match="3.bias"):
        other.load_state_dict(bad)


def test_sequential_gradients_through_the_chain():
    model = rabbitkit.Sequential([Dense(3, 5, dtype="float64"), Tanh(dtype="float64"), Dense(5, 2, dtype="float64")])
    report = check_gradients(model, (4, 3))
    assert {"input", "0.weight", "0.bias", "2.weight", "2.bias"} <= set(report.checked)


def test_gradient_check_catches_a_wrong_backward():
    class WrongTanh(Tanh):
        def _backward_cpu(self, y, dy, dx):
            dx[:] = dy  # forgets the 1 - y^2 factor

    with pytest.raises(AssertionError, match="input"):
        check_gradients(WrongTanh(dtype=np.float64), (2, 3))


def test_layer_without_cuda_kernels_is_refused_by_name():
    class HostOnly(Layer):
        def forward_cpu(self, x, training):
            return x

    with pytest.raises(BackendError, match="HostOnly has no CUDA kernels"):
        rabbitkit.Sequential([Dense(2, 2), HostOnly()]).to("cuda")


@pytest.mark.parametrize("make,shape", [(lambda: Dense(5, 3), (2, 5)), (lambda: Dense(4, 6, bias=False), (1, 4)),
                                        (lambda: Dense(3, 2), (2, 3, 3))])
def test_dense_cuda_matches_cpu(make, shape):
    check_cuda_parity(make, shape)


def test_sequential_on_cuda_matches_cpu():
    check_cuda_parity(lambda: rabbitkit.Sequential([Dense(3, 4), Tanh(), Dense(4, 2)]), (3, 3))


def test_skip_input_grad_stops_backward_at_the_first_parametric_layer(rng):
    from rabbitkit.layers import Flatten

    model = rabbitkit.Sequential([Flatten(), Dense(6, 4), Tanh(), Dense(4, 2)])
    x = rng.standard_normal((3, 2, 3)).astype(np.float32)
    dy = rng.standard_normal((3, 2)).astype(np.float32)
    model.forward(x)
    assert model.backward(dy).shape == x.shape
    full = {name: layer.grads[key].copy() for name, layer, key in model.named_parameters()}
    model.zero_grad()
    model.skip_input_grad()
    assert not model.layers[1].needs_input_grad and model.layers[3].needs_input_grad
    model.forward(x)
    assert model.backward(dy) is None
    for name, layer, key in model.named_parameters():
        np.testing.assert_array_equal(layer.grads[key], full[name])


def test_gradients_accumulate_after_zero_grad_too(rng):
    layer = Dense(5, 3)
    x = rng.standard_normal((4, 5)).astype(np.float32)
    dy = rng.standard_normal((4, 3)).astype(np.float32)
    layer.grads["weight"][...] = 7.0
    layer.zero_grad()  # the first backward may write, the second must add
    for _ in range(2):
        layer.forward(x)
        layer.backward(dy)
    np.testing.assert_allclose(layer.grads["weight"], 2 * dy.T @ x, rtol=1e-5, atol=1e-5)
