"""MaxPool2D, AvgPool2D, GlobalAvgPool2D: numpy loop references, ties, gradients, errors."""
import numpy as np
import pytest

from rabbitkit.errors import ConfigError
from rabbitkit.layers.pooling import AvgPool2D, GlobalAvgPool2D, MaxPool2D
from rabbitkit.testing import check_gradients

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
