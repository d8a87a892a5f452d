"""MaxPool2D, AvgPool2D, GlobalAvgPool2D: numpy loop references, ties, gradients, errors, ceil mode, CUDA."""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rabbitkit.errors import ConfigError
from rabbitkit.layers.pooling import (
    MAX_POOL_FORWARD,
    AvgPool2D,
    GlobalAvgPool2D,
    MaxPool2D,
)
from rabbitkit.testing import check_cuda_parity, check_gradients

# (input shape, kernel, stride, padding): square and rectangular windows, overlapping
# windows, strides that leave a ragged edge, padding.
CASES = [
    ((2, 3, 8, 8), 2, None, 0),
    ((1, 2, 7, 5), 3, 2, 1),
    ((2, 1, 9, 7), (3, 2), (3, 1), (1, 1)),
    ((1, 3, 6, 11), (2, 5), (2, 3), (0, 2)),
    ((3, 2, 5, 5), 3, 1, 0),
    ((1, 2, 7, 5), 2, 2, 0),  # the 2x2 fast path with an odd leftover row and column
]


def windows(x, kernel, stride, padding, fill):
    """Yield (n, c, oh, ow, padded window) by plain loops."""
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    stride = (kh, kw) if stride is None else stride
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=fill)
    ho = (x.shape[2] + 2 * ph - kh) // sh + 1
    wo = (x.shape[3] + 2 * pw - kw) // sw + 1
    for n in range(x.shape[0]):
        for c in range(x.shape[1]):
            for oh in range(ho):
                for ow in range(wo):
                    yield n, c, oh, ow, xp[n, c, oh * sh : oh * sh + kh, ow * sw : ow * sw + kw], (ho, wo)


def reference_pool(x, kernel, stride, padding, reduce, fill):
    results = {}
    shape = None
    for n, c, oh, ow, window, shape in windows(x, kernel, stride, padding, fill):
        results[n, c, oh, ow] = reduce(window)
    out = np.empty((x.shape[0], x.shape[1], *shape))
    for index, value in results.items():
        out[index] = value
    return out


@pytest.mark.parametrize("shape,kernel,stride,padding", CASES)
def test_max_pool_forward_matches_loops(shape, kernel, stride, padding, rng):
    x = rng.standard_normal(shape).astype(np.float32)
    layer = MaxPool2D(kernel, stride, padding)
    y = layer.forward(x)
    np.testing.assert_array_equal(y, reference_pool(x, kernel, stride, padding, np.max, -np.inf))
    assert layer.output_shape(shape[1:]) == y.shape[1:]


@pytest.mark.parametrize("shape,kernel,stride,padding", CASES)
def test_avg_pool_forward_matches_loops_with_padding_counted(shape, kernel, stride, padding, rng):
    x = rng.standard_normal(shape).astype(np.float32)
    layer = AvgPool2D(kernel, stride, padding)
    y = layer.forward(x)
    expected = reference_pool(x, kernel, stride, padding, np.mean, 0.0)  # zeros count in the mean
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)
    assert layer.output_shape(shape[1:]) == y.shape[1:]


@pytest.mark.parametrize("shape,kernel,stride,padding", CASES)
@pytest.mark.parametrize("pool", [MaxPool2D, AvgPool2D])
def test_pool_gradients(pool, shape, kernel, stride, padding):
    report = check_gradients(pool(kernel, stride, padding, dtype=np.float64), shape)
    assert report.checked["input"] == min(np.prod(shape), 150)


def test_max_pool_ties_go_to_the_first_maximum_in_scan_order():
    x = np.zeros((1, 1, 4, 4), np.float32)
    x[0, 0, 1, 1] = x[0, 0, 1, 0] = 5.0  # a tie inside the first window (row-major: (1, 0) first)
    layer = MaxPool2D(2)
    layer.forward(x)
    dx = layer.backward(np.ones((1, 1, 2, 2), np.float32))
    expected = np.zeros((4, 4), np.float32)
    expected[1, 0] = 1.0  # the first 5 in the first window
    expected[0, 2] = expected[2, 0] = expected[2, 2] = 1.0  # all-zero windows: their first entry
    np.testing.assert_array_equal(dx[0, 0], expected)


def test_max_pool_overlapping_windows_add_their_gradients():
    x = np.arange(9, dtype=np.float32).reshape(1, 1, 3, 3)
    layer = MaxPool2D(2, stride=1)
    layer.forward(x)
    dx = layer.backward(np.ones((1, 1, 2, 2), np.float32))
    np.testing.assert_array_equal(dx[0, 0], [[0, 0, 0], [0, 1, 1], [0, 1, 1]])


def test_max_pool_padding_never_wins_over_negative_values():
    x = -np.ones((1, 1, 3, 3), np.float32) * np.arange(1, 10, dtype=np.float32).reshape(3, 3)
    y = MaxPool2D(3, stride=2, padding=1).forward(x)
    # Windows cover rows/columns {-1, 0, 1} and {1, 2, 3}; -1 and 3 are padding.
    np.testing.assert_array_equal(y[0, 0], [[-1, -2], [-4, -5]])


@pytest.mark.parametrize("stride", [2, (2, 1)])  # the 2x2 fast path and the general kernel
def test_max_pool_propagates_nan_and_routes_its_gradient(stride):
    x = np.ones((1, 1, 2, 3), np.float32)
    x[0, 0, 1, 0] = np.nan
    layer = MaxPool2D(2, stride=stride)
    y = layer.forward(x)
    assert np.isnan(y[0, 0, 0, 0])
    dx = layer.backward(np.ones_like(y))
    assert dx[0, 0, 1, 0] == 1.0


def test_general_kernel_breaks_ties_by_scan_order():
    x = np.zeros((1, 1, 3, 3), np.float32)
    x[0, 0, 0, 1] = x[0, 0, 1, 0] = 2.0  # both in the first window of a 2x2, stride 1 pool
    layer = MaxPool2D(2, stride=1)
    layer.forward(x)
    dx = layer.backward(np.ones((1, 1, 2, 2), np.float32))
    # windows: (0,0) -> (0,1) first; (0,1) -> (0,1); (1,0) -> (1,0); (1,1) -> its first entry (1,1)
    np.testing.assert_array_equal(dx[0, 0], [[0, 2, 0], [1, 1, 0], [0, 0, 0]])


@pytest.mark.parametrize("kernel,stride,padding", [(3, 1, 1), (3, 2, 1), (2, 1, 0), (5, 2, 2), (3, 2, 0)])
def test_max_pool_stride_kernels_agree_with_the_run_time_stride_kernel(kernel, stride, padding, rng):
    """The kernels compiled for column strides 1 and 2 give the generic kernel's maxima
    and arg-max indices bit for bit, ties (rounded values) and NaN included."""
    x = np.round(rng.standard_normal((5, 13, 12)) * 2).astype(np.float32)
    x[0, 3, 4] = x[2, 0, 0] = np.nan
    ho, wo = ((n + 2 * padding - kernel) // stride + 1 for n in x.shape[1:])
    outputs = []
    for variant in (MAX_POOL_FORWARD[0], MAX_POOL_FORWARD[stride]):
        y, argmax = np.empty((5, ho, wo), np.float32), np.empty((5, ho, wo), np.int32)
        variant(x, y, argmax, kernel, kernel, stride, stride, padding, padding)
        outputs.append((y, argmax))
    np.testing.assert_array_equal(outputs[0][0], outputs[1][0])
    np.testing.assert_array_equal(outputs[0][1], outputs[1][1])
    assert np.isnan(outputs[1][0]).any()


def test_stride_defaults_to_kernel_size():
    layer = MaxPool2D((2, 3))
    assert layer.stride == (2, 3)
    assert layer.output_shape((4, 9, 10)) == (4, 4, 3)
    assert AvgPool2D(2, stride=1).output_shape((1, 5, 5)) == (1, 4, 4)


def test_global_avg_pool(rng):
    x = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    layer = GlobalAvgPool2D()
    y = layer.forward(x)
    np.testing.assert_allclose(y, x.mean(axis=(2, 3)), rtol=1e-5, atol=1e-6)
    assert layer.output_shape((3, 4, 5)) == (3,)
    check_gradients(GlobalAvgPool2D(dtype=np.float64), (1, 3, 2, 5))


def test_user_errors_are_config_errors():
    with pytest.raises(ConfigError, match="at most half"):
        MaxPool2D(2, padding=2)
    with pytest.raises(ConfigError, match="does not fit"):
        AvgPool2D(5).output_shape((1, 3, 8))
    with pytest.raises(ConfigError, match=r"\(N, C, H, W\)"):
        MaxPool2D(2).forward(np.zeros((2, 4), np.float32))
    with pytest.raises(ConfigError, match="stride"):
        AvgPool2D(2, stride=0)


# -- ceil mode (Caffe's shapes) --------------------------------------------------------
def ceil_size(size, kernel, stride, padding):
    """The closed form: ceil((size + 2p - k) / s) + 1, less one where the last window
    would start past the input and its left padding (PyTorch's rule)."""
    out = math.ceil((size + 2 * padding - kernel) / stride) + 1
    return out - 1 if (out - 1) * stride >= size + padding else out


def reference_pool_ceil(x, kernel, stride, padding, kind):
    """Loops over PyTorch's ceil-mode windows: max over the entries inside the input;
    average = sum over the input entries / the window's extent inside the padded input."""
    (kh, kw), (sh, sw), (ph, pw) = (_pair(kernel), _pair(stride), _pair(padding))
    n_batch, channels, h, w = x.shape
    ho, wo = ceil_size(h, kh, sh, ph), ceil_size(w, kw, sw, pw)
    out = np.empty((n_batch, channels, ho, wo))
    for oh in range(ho):
        for ow in range(wo):
            h0, w0 = oh * sh - ph, ow * sw - pw
            inside = x[:, :, max(h0, 0) : min(h0 + kh, h), max(w0, 0) : min(w0 + kw, w)].astype(np.float64)
            if kind == "max":
                out[:, :, oh, ow] = inside.max(axis=(2, 3))
            else:
                divisor = (min(h0 + kh, h + ph) - h0) * (min(w0 + kw, w + pw) - w0)
                out[:, :, oh, ow] = inside.sum(axis=(2, 3)) / divisor
    return out


def _pair(value):
    return (value, value) if isinstance(value, int) else tuple(value)


# (input shape, kernel, stride, padding): shapes where ceil and floor modes differ, the
# last-window rule, windows past the edge with and without padding, a window wider than the input
CEIL_CASES = [
    ((1, 2, 7, 5), 3, 2, 0),
    ((2, 1, 5, 5), 2, 2, 1),  # the rule: ceil gives 4, (4-1)*2 >= 5+1, so 3
    ((1, 2, 6, 9), (3, 2), (2, 3), (1, 1)),
    ((1, 1, 4, 3), 3, 2, 1),
    ((2, 2, 7, 5), 2, 2, 0),  # 2x2/2 on odd sizes: the general kernel, not the 2x2 one
    ((1, 1, 2, 3), 3, 2, 0),  # a window wider than the input still gives one output
]


@pytest.mark.parametrize("size,kernel,stride,padding,expected", [
    (112, 3, 2, 0, 56), (56, 3, 2, 0, 28), (28, 3, 2, 0, 14), (14, 3, 2, 0, 7),  # Caffe's GoogLeNet
    (55, 3, 2, 0, 27), (13, 3, 2, 0, 6),  # AlexNet: same as floor
    (5, 2, 2, 1, 3), (7, 2, 2, 0, 4), (2, 3, 2, 0, 1), (4, 3, 2, 1, 3),
])
def test_ceil_mode_output_sizes(size, kernel, stride, padding, expected):
    assert ceil_size(size, kernel, stride, padding) == expected
    for pool in (MaxPool2D, AvgPool2D):
        assert pool(kernel, stride, padding, ceil_mode=True).output_shape((3, size, size)) == (3, expected, expected)


def test_ceil_mode_shapes_match_the_closed_form_everywhere():
    for size in range(1, 12):
        for kernel in range(1, 5):
            for stride in range(1, 4):
                for padding in range(kernel // 2 + 1):
                    expected = ceil_size(size, kernel, stride, padding)
                    if expected < 1:
                        continue
                    layer = MaxPool2D(kernel, stride, padding, ceil_mode=True)
                    assert layer.output_shape((1, size, 2 * padding + kernel))[1] == expected
                    floor = MaxPool2D(kernel, stride, padding).output_shape((1, max(size, kernel), kernel))[1]
                    assert ceil_size(max(size, kernel), kernel, stride, padding) in (floor, floor + 1)


@pytest.mark.parametrize("shape,kernel,stride,padding", CEIL_CASES)
def test_ceil_mode_forward_matches_loops(shape, kernel, stride, padding, rng):
    x = rng.standard_normal(shape).astype(np.float32)
    for pool, kind in ((MaxPool2D, "max"), (AvgPool2D, "avg")):
        layer = pool(kernel, stride, padding, ceil_mode=True)
        y = layer.forward(x)
        np.testing.assert_allclose(y, reference_pool_ceil(x, kernel, stride, padding, kind), rtol=1e-6, atol=1e-6)
        assert layer.output_shape(shape[1:]) == y.shape[1:]


def test_ceil_mode_average_divisors_are_pytorchs():
    # nn.AvgPool2d(2, ceil_mode=True) on arange(9) as 3x3: the last row/column windows
    # count only their entries inside the (unpadded) input
    x = np.arange(9, dtype=np.float32).reshape(1, 1, 3, 3)
    np.testing.assert_array_equal(AvgPool2D(2, ceil_mode=True).forward(x)[0, 0], [[2, 3.5], [6.5, 8]])
    # kernel 3, stride 2, padding 1 on [1, 2, 3, 4]: windows [-1, 1], [1, 3], [3, 5]; the last
    # counts index 4 (padding) but not index 5 (past the padding): (4 + 0) / 2
    x = np.array([[[[1, 2, 3, 4]]]], dtype=np.float32)
    np.testing.assert_array_equal(AvgPool2D((1, 3), 2, (0, 1), ceil_mode=True).forward(x)[0, 0, 0], [1, 3, 2])
    # floor mode keeps dividing by kh*kw
    np.testing.assert_array_equal(AvgPool2D((1, 3), 2, (0, 1)).forward(x)[0, 0, 0], [1, 3])


def test_ceil_mode_max_ignores_positions_past_the_edge():
    x = -np.arange(1, 10, dtype=np.float32).reshape(1, 1, 3, 3)  # all negative: an implicit 0 would win
    layer = MaxPool2D(2, ceil_mode=True)
    np.testing.assert_array_equal(layer.forward(x)[0, 0], [[-1, -3], [-7, -9]])
    dx = layer.backward(np.ones((1, 1, 2, 2), np.float32))
    np.testing.assert_array_equal(dx[0, 0], [[1, 0, 1], [0, 0, 0], [1, 0, 1]])


@pytest.mark.parametrize("shape,kernel,stride,padding", CEIL_CASES)
@pytest.mark.parametrize("pool", [MaxPool2D, AvgPool2D])
def test_ceil_mode_gradients(pool, shape, kernel, stride, padding):
    report = check_gradients(pool(kernel, stride, padding, ceil_mode=True, dtype=np.float64), shape)
    assert report.checked["input"] == min(np.prod(shape), 150)


def test_ceil_mode_repr_and_errors():
    assert "ceil_mode=True" in repr(MaxPool2D(3, 2, ceil_mode=True))
    assert "ceil_mode" not in repr(MaxPool2D(3, 2))
    with pytest.raises(ConfigError, match="ceil_mode must be true or false"):
        MaxPool2D(3, ceil_mode="yes")
    with pytest.raises(ConfigError, match="does not fit"):
        MaxPool2D(4, 2, ceil_mode=True).output_shape((1, 1, 5))  # ceil((1 - 4) / 2) + 1 = 0


# -- CUDA (simulator: tiny shapes) ---------------------------------------------------
CUDA_CASES = [
    ((1, 1, 5, 5), 2, None, 0, False),  # batch 1, the CPU's 2x2 fast path
    ((2, 1, 5, 7), 3, 2, 1, False),
    ((1, 2, 5, 4), (3, 2), (1, 2), (1, 0), False),  # non-square, overlapping rows
    ((1, 1, 7, 5), 3, 2, 0, True),  # Caffe's 3/2 ceil-mode pool
    ((1, 2, 5, 5), 2, 2, 1, True),  # the last-window rule
    ((1, 1, 4, 6), (3, 2), (2, 3), (1, 1), True),
]


@pytest.mark.parametrize("shape,kernel,stride,padding,ceil_mode", CUDA_CASES)
@pytest.mark.parametrize("pool", [MaxPool2D, AvgPool2D])
def test_pool_cuda_matches_cpu(pool, shape, kernel, stride, padding, ceil_mode):
    check_cuda_parity(lambda: pool(kernel, stride, padding, ceil_mode=ceil_mode), shape)


def _on_cuda(layer, x, dy):
    from rabbitkit.backend import to_host

    layer.to("cuda")
    y = np.array(to_host(layer.forward(x)))
    return y, np.array(to_host(layer.backward(dy)))


@pytest.mark.parametrize("stride", [1, 2])
def test_max_pool_cuda_routes_ties_and_nan_as_the_cpu(stride):
    x = np.zeros((1, 1, 4, 5), np.float32)
    x[0, 0, 0, 1] = x[0, 0, 1, 0] = 2.0  # a tie in the first window
    x[0, 0, 2, 3] = np.nan
    out = MaxPool2D(2, stride).output_shape((1, 4, 5))
    dy = np.arange(1, 1 + math.prod(out), dtype=np.float32).reshape(1, *out)
    cpu = MaxPool2D(2, stride)
    y_cpu = cpu.forward(x)
    dx_cpu = cpu.backward(dy)
    y_cuda, dx_cuda = _on_cuda(MaxPool2D(2, stride), x, dy)
    np.testing.assert_array_equal(y_cuda, y_cpu)  # NaN where the CPU has NaN
    np.testing.assert_array_equal(dx_cuda, dx_cpu)  # the same arg-max, integer sums exact
    assert np.isnan(y_cpu).any()


def test_global_avg_pool_cuda_matches_cpu():
    check_cuda_parity(GlobalAvgPool2D, (1, 3, 3, 5))
    check_cuda_parity(GlobalAvgPool2D, (2, 1, 1, 1))


# -- swap_max_to_avg -------------------------------------------------------------------
def _pools(model, prefix=""):
    """{dotted name: layer} of every pooling layer, recursively (names as the parameters')."""
    found = {}
    for index, child in enumerate(model.children()):
        name = f"{prefix}{index}"
        if isinstance(child, (MaxPool2D, AvgPool2D)):
            found[name] = child
        found.update(_pools(child, name + "."))
    return found


def _nested(pool, dtype=np.float64):
    import rabbitkit
    from rabbitkit.layers.activations import Tanh
    from rabbitkit.layers.branches import Concat, Identity
    from rabbitkit.layers.conv2d import Conv2D

    return rabbitkit.Sequential([
        Conv2D(2, 3, 3, padding=1, dtype=dtype),
        pool(3, 2, 1, ceil_mode=True, dtype=dtype),
        Concat([rabbitkit.Sequential([pool(3, 1, 1, dtype=dtype), Conv2D(3, 2, 1, dtype=dtype)]),
                Identity(dtype=dtype), pool((3, 1), 1, (1, 0), dtype=dtype)]),
        Tanh(dtype=dtype),
    ])


def test_swap_max_to_avg_in_nested_containers(rng):
    from rabbitkit.layers.pooling import swap_max_to_avg

    model = _nested(MaxPool2D)
    reference = _nested(AvgPool2D)
    reference.load_state_dict(model.state_dict())
    names = list(model.state_dict())
    containers = [model, model[2], model[2].branches[0]]
    before = {name: (p.kernel_size, p.stride, p.padding, p.ceil_mode) for name, p in _pools(model).items()}
    assert swap_max_to_avg(model) is model
    after = _pools(model)
    assert set(after) == {"1", "2.0.0", "2.2"} == set(before)
    assert all(type(p) is AvgPool2D for p in after.values())
    assert {name: (p.kernel_size, p.stride, p.padding, p.ceil_mode) for name, p in after.items()} == before
    assert list(model.state_dict()) == names  # same dotted names
    assert [model, model[2], model[2].branches[0]] == containers  # containers changed in place
    x = rng.standard_normal((1, 2, 7, 6))
    np.testing.assert_array_equal(model.forward(x), reference.forward(x))
    check_gradients(model, (1, 2, 5, 4), max_checks=40)


def test_swap_max_to_avg_on_a_pool_and_an_attribute_container():
    from rabbitkit.layers.base import Layer
    from rabbitkit.layers.pooling import swap_max_to_avg

    avg = swap_max_to_avg(MaxPool2D((3, 2), (1, 2), (1, 0), ceil_mode=True, dtype=np.float64))
    assert type(avg) is AvgPool2D and avg.dtype == np.float64
    assert (avg.kernel_size, avg.stride, avg.padding, avg.ceil_mode) == ((3, 2), (1, 2), (1, 0), True)

    class Pair(Layer):  # children() builds a fresh list from attributes, as SpatialTransformer does
        def __init__(self):
            super().__init__()
            self.first, self.second = MaxPool2D(2), GlobalAvgPool2D()

        def children(self):
            return [self.first, self.second]

    pair = Pair()
    swap_max_to_avg(pair)
    assert type(pair.first) is AvgPool2D and type(pair.second) is GlobalAvgPool2D


def test_swap_max_to_avg_keeps_the_device():
    import rabbitkit
    from rabbitkit.layers.pooling import swap_max_to_avg

    model = rabbitkit.Sequential([MaxPool2D(2), GlobalAvgPool2D()]).to("cuda")
    swap_max_to_avg(model)
    assert type(model[0]) is AvgPool2D and model[0].device == "cuda"
    check_cuda_parity(lambda: swap_max_to_avg(rabbitkit.Sequential([MaxPool2D(2, ceil_mode=True)])), (1, 1, 3, 3))


def test_swap_max_to_avg_on_googlenet_small():
    from rabbitkit.layers.pooling import swap_max_to_avg
    from rabbitkit.models.inception import googlenet_small

    model = googlenet_small((3, 16, 16), 4, width=0.05, batch_norm=False, dropout=0)
    before = {name: type(p).__name__ for name, p in _pools(model).items()}
    assert "MaxPool2D" in before.values()
    names = list(model.state_dict())
    swap_max_to_avg(model)
    assert {name: type(p).__name__ for name, p in _pools(model).items()} == {name: "AvgPool2D" for name in before}
    assert list(model.state_dict()) == names
    assert model.forward(np.zeros((1, 3, 16, 16), np.float32)).shape == (1, 4)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 8), st.integers(1, 8), st.integers(1, 4), st.integers(1, 4), st.integers(1, 3),
       st.integers(1, 3), st.integers(0, 2), st.integers(0, 2), st.integers(0, 2**16))
def test_ceil_mode_forward_and_gradient_sums_on_any_geometry(h, w, kh, kw, sh, sw, ph, pw, seed):
    ph, pw = min(ph, kh // 2), min(pw, kw // 2)
    if ceil_size(h, kh, sh, ph) < 1 or ceil_size(w, kw, sw, pw) < 1:
        return  # refused with "does not fit" (tested above)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, 2, h, w))
    for pool, kind in ((MaxPool2D, "max"), (AvgPool2D, "avg")):
        layer = pool((kh, kw), (sh, sw), (ph, pw), ceil_mode=True, dtype=np.float64)
        y = layer.forward(x)
        np.testing.assert_allclose(y, reference_pool_ceil(x, (kh, kw), (sh, sw), (ph, pw), kind), rtol=1e-12, atol=1e-12)
        dy = rng.standard_normal(y.shape)
        dx = layer.backward(dy)
        if kind == "max":  # every output's gradient lands on exactly one input entry
            np.testing.assert_allclose(dx.sum(), dy.sum(), rtol=1e-9, atol=1e-9)
        else:  # adjoint identity: <avg(x), dy> = <x, dx>
            np.testing.assert_allclose(np.sum(y * dy), np.sum(x * dx), rtol=1e-9, atol=1e-9)
