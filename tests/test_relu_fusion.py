"""A ReLU after Conv2D or BatchNorm runs inside that layer's kernels (Sequential's fusion):
same outputs and gradients as the separate ReLU, bit for bit, and gradient-checked."""
import numpy as np
import pytest

from rabbitkit.layers.activations import LeakyReLU, ReLU
from rabbitkit.layers.batchnorm import BatchNorm
from rabbitkit.layers.conv2d import Conv2D
from rabbitkit.layers.dense import Dense
from rabbitkit.layers.sequential import Sequential
from rabbitkit.testing import check_gradients


def make_pair(kind, dtype=np.float32):
    """(producer layer, input shape) for each fusable layer and geometry."""
    if kind == "conv_wide":
        return Conv2D(3, 5, 3, padding=1, dtype=dtype), (4, 3, 7, 6)
    if kind == "conv_strided":
        return Conv2D(2, 4, (3, 2), stride=(2, 1), padding=(1, 0), dtype=dtype), (3, 2, 9, 7)
    if kind == "batchnorm_conv":
        return BatchNorm(3, dtype=dtype), (4, 3, 5, 6)
    if kind == "batchnorm_dense":
        return BatchNorm(7, dtype=dtype), (5, 7)
    raise ValueError(kind)


def run(model, x, dy, training):
    model.zero_grad()
    y = model.forward(x, training=training)
    dx = model.backward(dy)
    return y, dx, {name: p.grad.copy() for name, p in zip([p.name for p in model.parameters()], model.parameters())}


@pytest.mark.parametrize("kind", ["conv_wide", "conv_strided", "batchnorm_conv", "batchnorm_dense"])
@pytest.mark.parametrize("training", [True, False])
def test_fused_relu_matches_separate_relu_exactly(kind, training, rng):
    producer, shape = make_pair(kind)
    if isinstance(producer, BatchNorm):  # non-trivial scale, shift and running statistics
        producer.params["weight"][:] = rng.uniform(0.5, 1.5, producer.num_features)
        producer.params["bias"][:] = rng.uniform(-0.3, 0.3, producer.num_features)
        producer.buffers["running_mean"][:] = rng.uniform(-0.2, 0.2, producer.num_features)
        producer.buffers["running_var"][:] = rng.uniform(0.5, 2.0, producer.num_features)
    model = Sequential([producer, ReLU()])
    x = rng.standard_normal(shape).astype(np.float32)
    dy = rng.standard_normal(model.forward(x, training=training).shape).astype(np.float32)

    model.fuse_relu = False
    y_ref, dx_ref, grads_ref = run(model, x, dy, training)
    assert not producer.fused_relu and not model[1].absorbed
    model.fuse_relu = True
    y, dx, grads = run(model, x, dy, training)
    assert producer.fused_relu and model[1].absorbed

    assert (y_ref > 0).any() and (y_ref == 0).any()  # the mask matters in this case
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_array_equal(dx, dx_ref)
    for name in grads_ref:
        np.testing.assert_array_equal(grads[name], grads_ref[name], err_msg=name)


@pytest.mark.parametrize("kind", ["conv_wide", "conv_strided", "batchnorm_conv", "batchnorm_dense"])
def test_fused_pair_passes_gradient_check(kind):
    producer, shape = make_pair(kind, dtype=np.float64)
    model = Sequential([producer, ReLU(dtype=np.float64)])
    check_gradients(model, shape)
    assert producer.fused_relu and model[1].absorbed  # the check ran the fused kernels


def test_conv_bn_relu_stack_passes_gradient_check():
    model = Sequential([Conv2D(2, 3, 3, padding=1, bias=False, dtype=np.float64), BatchNorm(3, dtype=np.float64),
                        ReLU(dtype=np.float64)])
    check_gradients(model, (3, 2, 5, 4))
    assert not model[0].fused_relu and model[1].fused_relu and model[2].absorbed


def test_only_an_exact_relu_right_after_a_capable_layer_is_fused():
    conv, dense, bn = Conv2D(1, 2, 3), Dense(4, 4), BatchNorm(4)
    leaky, relu_after_dense, relu_after_bn = LeakyReLU(), ReLU(), ReLU()
    model = Sequential([Sequential([conv, leaky]), Sequential([dense, relu_after_dense, bn, relu_after_bn])])
    model[0].forward(np.zeros((2, 1, 5, 5), np.float32))
    model[1].forward(np.zeros((2, 4), np.float32))
    assert not conv.fused_relu  # LeakyReLU is not a ReLU
    assert not relu_after_dense.absorbed  # Dense does not absorb
    assert bn.fused_relu and relu_after_bn.absorbed


def test_a_producer_moved_to_the_end_is_unfused(rng):
    conv = Conv2D(1, 2, 3)
    relu = ReLU()
    x = rng.standard_normal((2, 1, 5, 5)).astype(np.float32)
    Sequential([conv, relu]).forward(x)
    assert conv.fused_relu
    y = Sequential([conv]).forward(x)  # the same layer, now with nothing after it
    assert not conv.fused_relu and (y < 0).any()
