"""BatchNorm: numpy reference in training and evaluation, running statistics, gradients."""
import numpy as np
import pytest

from rabbitkit.errors import ConfigError
from rabbitkit.layers.batchnorm import BatchNorm
from rabbitkit.testing import check_gradients


def reference(x, weight, bias, mean, var, eps):
    """Normalise along axis 1 with the given statistics, then scale and shift."""
    shape = (1, -1) + (1,) * (x.ndim - 2)
    return (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps) * weight.reshape(shape) + bias.reshape(shape)


@pytest.mark.parametrize("shape", [(8, 5), (4, 3, 6, 5), (2, 4, 7)])
def test_training_uses_batch_statistics_and_updates_running_averages(shape, rng):
    layer = BatchNorm(shape[1], momentum=0.2)
    layer.params["weight"][:] = rng.uniform(0.5, 2, shape[1])
    layer.params["bias"][:] = rng.standard_normal(shape[1])
    x = (rng.standard_normal(shape) * 3 + 2).astype(np.float32)
    y = layer.forward(x, training=True)
    axes = (0,) + tuple(range(2, x.ndim))
    mean = x.astype(np.float64).mean(axis=axes)
    var = x.astype(np.float64).var(axis=axes)  # biased, for normalisation
    expected = reference(x, layer.params["weight"], layer.params["bias"], mean, var, 1e-5)
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)
    count = x.size // shape[1]
    np.testing.assert_allclose(layer.buffers["running_mean"], 0.2 * mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer.buffers["running_var"], 0.8 + 0.2 * var * count / (count - 1), rtol=1e-5)


def test_evaluation_uses_running_averages(rng):
    layer = BatchNorm(3, eps=1e-3)
    layer.buffers["running_mean"][:] = [1.0, -2.0, 0.5]
    layer.buffers["running_var"][:] = [4.0, 0.25, 1.0]
    x = rng.standard_normal((2, 3, 4, 4)).astype(np.float32)
    y = layer.forward(x, training=False)
    expected = reference(x, layer.params["weight"], layer.params["bias"], layer.buffers["running_mean"], layer.buffers["running_var"], 1e-3)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(layer.buffers["running_mean"], [1.0, -2.0, 0.5])  # untouched


@pytest.mark.parametrize("shape", [(5, 3), (1, 2, 3, 3), (3, 2, 4, 5), (2, 3, 5)])
@pytest.mark.parametrize("training", [True, False])
def test_gradients(shape, training):
    layer = BatchNorm(shape[1], dtype=np.float64)
    rng = np.random.default_rng(5)
    layer.params["weight"][:] = rng.uniform(0.5, 2, shape[1])
    layer.params["bias"][:] = rng.standard_normal(shape[1])
    layer.buffers["running_mean"][:] = rng.standard_normal(shape[1])
    layer.buffers["running_var"][:] = rng.uniform(0.5, 2, shape[1])
    report = check_gradients(layer, shape, training=training)
    assert {"input", "weight", "bias"} <= set(report.checked)


def test_names_roles_and_state_follow_pytorch():
    layer = BatchNorm(4)
    assert list(layer.state_dict()) == ["weight", "bias", "running_mean", "running_var"]
    assert layer.param_roles == {"weight": "scale", "bias": "bias"}
    np.testing.assert_array_equal(layer.params["weight"], np.ones(4))
    np.testing.assert_array_equal(layer.params["bias"], np.zeros(4))
    np.testing.assert_array_equal(layer.buffers["running_var"], np.ones(4))
    assert layer.output_shape((4, 5, 5)) == (4, 5, 5)


def test_user_errors_are_config_errors():
    with pytest.raises(ConfigError, match="more than one value"):
        BatchNorm(3).forward(np.zeros((1, 3), np.float32), training=True)
    with pytest.raises(ConfigError, match=r"expects \(N, 3"):
        BatchNorm(3).forward(np.zeros((2, 4), np.float32))
    BatchNorm(3).forward(np.zeros((1, 3), np.float32), training=False)  # evaluation of one sample is fine
