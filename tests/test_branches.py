"""Concat, Add and Identity: joins, gradients through the branches, devices."""
import numpy as np
import pytest

import rabbitkit
from rabbitkit.errors import ConfigError
from rabbitkit.layers.activations import ReLU, Tanh
from rabbitkit.layers.branches import Add, Concat, Identity
from rabbitkit.layers.conv2d import Conv2D
from rabbitkit.layers.dense import Dense
from rabbitkit.layers.pooling import MaxPool2D
from rabbitkit.plugins import registry
from rabbitkit.testing import check_cuda_parity, check_gradients

F64 = np.float64


def conv_branches(channels):
    """Three image branches of different widths and receptive fields, same spatial size."""
    return [
        Conv2D(channels, 2, 1, dtype=F64),
        rabbitkit.Sequential([Conv2D(channels, 3, 3, padding=1, dtype=F64), Tanh(dtype=F64)]),
        rabbitkit.Sequential(
            [MaxPool2D(3, stride=1, padding=1, dtype=F64), Conv2D(channels, 1, (1, 3), padding=(0, 1), dtype=F64)]
        ),
    ]


def test_concat_joins_branch_outputs_along_channels(rng):
    branches = conv_branches(3)
    layer = Concat(branches)
    x = rng.standard_normal((2, 3, 5, 4))
    y = layer.forward(x)
    expected = np.concatenate([branch.forward(x) for branch in branches], axis=1)
    np.testing.assert_array_equal(y, expected)
    assert y.shape == (2, 6, 5, 4) and layer.output_shape((3, 5, 4)) == (6, 5, 4)


@pytest.mark.parametrize("shape", [(1, 3, 5, 4), (2, 2, 3, 6)])
def test_concat_gradients_conv_branches(shape):
    report = check_gradients(Concat(conv_branches(shape[1])), shape)
    assert {"input", "0.weight", "1.0.weight", "1.0.bias", "2.1.weight"} <= set(report.checked)


def test_concat_gradients_on_the_last_axis_with_identity():
    hidden = rabbitkit.Sequential([Dense(3, 4, dtype=F64), Tanh(dtype=F64)])
    layer = Concat([Dense(3, 2, dtype=F64), hidden, Identity(dtype=F64)], axis=-1)
    assert layer.output_shape((3,)) == (9,)
    report = check_gradients(layer, (2, 3))
    assert {"input", "0.weight", "0.bias", "1.0.weight", "1.0.bias"} <= set(report.checked)


def test_add_sums_and_residual_gradients(rng):
    block = rabbitkit.Sequential(
        [Conv2D(2, 2, 3, padding=1, dtype=F64), Tanh(dtype=F64), Conv2D(2, 2, 3, padding=1, dtype=F64)]
    )
    layer = Add([block, Identity(dtype=F64)])
    x = rng.standard_normal((2, 2, 4, 5))
    np.testing.assert_allclose(layer.forward(x), block.forward(x) + x, atol=1e-14)
    report = check_gradients(layer, (1, 2, 4, 5))
    assert {"input", "0.0.weight", "0.2.bias"} <= set(report.checked)
    check_gradients(Add([Dense(3, 3, dtype=F64), Identity(dtype=F64), Dense(3, 3, dtype=F64)]), (3, 3))


def test_add_never_writes_into_a_branch_output(rng):
    x = rng.standard_normal((2, 3)).astype(np.float32)
    saved = x.copy()
    layer = Add([Identity(), Identity(), Identity()])
    np.testing.assert_array_equal(layer.forward(x), 3 * saved)
    dy = rng.standard_normal((2, 3)).astype(np.float32)
    dy_saved = dy.copy()
    np.testing.assert_array_equal(layer.backward(dy), 3 * dy_saved)
    np.testing.assert_array_equal(x, saved)
    np.testing.assert_array_equal(dy, dy_saved)


def test_gradients_accumulate_over_shared_input_and_containers_name_parameters():
    shared = Dense(2, 2)
    layer = Concat([shared, rabbitkit.Sequential([ReLU(), Dense(2, 3)])], axis=-1)
    assert list(layer.state_dict()) == ["0.weight", "0.bias", "1.1.weight", "1.1.bias"]
    assert layer.num_parameters() == 6 + 9
    other = Concat([Dense(2, 2), rabbitkit.Sequential([ReLU(), Dense(2, 3)])], axis=-1)
    other.load_state_dict(layer.state_dict())
    x = np.ones((1, 2), dtype=np.float32)
    np.testing.assert_array_equal(layer.forward(x), other.forward(x))
    layer.backward(np.ones((1, 5), dtype=np.float32))
    layer.zero_grad()
    assert not shared.grads["weight"].any()


def test_shared_input_gradients_are_the_sum_over_branches_and_accumulate(rng):
    """Every branch reads the same input: dx is the sum of the branches' input gradients, and
    parameter gradients add up over backward passes until zero_grad."""
    def branches():
        return [Dense(3, 2, dtype=F64), rabbitkit.Sequential([Tanh(dtype=F64), Dense(3, 4, dtype=F64)], dtype=F64)]

    joined = Concat(branches(), axis=-1, dtype=F64)
    alone = branches()
    for branch, twin in zip(joined.branches, alone):
        twin.load_state_dict(branch.state_dict())
    x = rng.standard_normal((5, 3))
    dy = rng.standard_normal((5, 6))
    joined.zero_grad()
    joined.forward(x, training=True)
    dx = joined.backward(dy)
    expected_dx = np.zeros_like(x)
    for twin, part in zip(alone, (dy[:, :2], dy[:, 2:])):
        twin.zero_grad()
        twin.forward(x, training=True)
        expected_dx += twin.backward(part)
    np.testing.assert_allclose(dx, expected_dx, rtol=1e-12, atol=1e-12)
    assert np.abs(expected_dx).min() > 0  # both branches contribute everywhere
    weights = [joined.branches[0].grads["weight"].copy(), joined.branches[1].layers[1].grads["weight"].copy()]
    np.testing.assert_allclose(weights[0], alone[0].grads["weight"], rtol=1e-12)
    np.testing.assert_allclose(weights[1], alone[1].layers[1].grads["weight"], rtol=1e-12)
    joined.forward(x, training=True)
    joined.backward(dy)  # no zero_grad: gradients accumulate
    np.testing.assert_allclose(joined.branches[0].grads["weight"], 2 * weights[0], rtol=1e-12)
    np.testing.assert_allclose(joined.branches[1].layers[1].grads["weight"], 2 * weights[1], rtol=1e-12)


def test_errors():
    with pytest.raises(ConfigError, match="differ outside axis 1"):
        Concat([Conv2D(1, 2, 3, dtype=F64), Conv2D(1, 2, 1, dtype=F64)]).forward(np.zeros((1, 1, 5, 5)))
    with pytest.raises(ConfigError, match="differ outside axis 1"):
        Concat([Conv2D(1, 2, 3), Conv2D(1, 2, 1)]).output_shape((1, 5, 5))
    with pytest.raises(ConfigError, match="batch axis"):
        Concat([Identity()], axis=0)
    with pytest.raises(ConfigError, match="Add branch 1"):
        Add([Dense(2, 3), Identity()]).forward(np.zeros((1, 2), dtype=np.float32))
    with pytest.raises(ConfigError, match="at least one branch"):
        Add([])


def test_registered():
    layers = registry("layers")
    assert layers.get("Concat") is Concat and layers.get("Add") is Add and layers.get("Identity") is Identity


# -- CUDA (simulator: tiny shapes) ---------------------------------------------------
def test_concat_cuda_matches_cpu():
    check_cuda_parity(lambda: Concat([Dense(3, 2), Dense(3, 4), Identity()], axis=-1), (2, 3))
    # axis 1 of a 3-d input: blocks are copied per sample (outer size 2)
    check_cuda_parity(lambda: Concat([Identity(), Tanh()], axis=1), (2, 2, 3))


def test_add_cuda_matches_cpu():
    check_cuda_parity(lambda: Add([rabbitkit.Sequential([Dense(3, 3), Tanh()]), Identity()]), (2, 3))


def test_containers_refuse_cuda_for_host_only_branches():
    from rabbitkit.errors import BackendError
    from rabbitkit.layers.base import Layer

    class HostOnly(Layer):  # a third party's layer with CPU kernels only
        def forward_cpu(self, x, training):
            return x

    with pytest.raises(BackendError, match="HostOnly"):
        Concat([Identity(), HostOnly()]).to("cuda")
