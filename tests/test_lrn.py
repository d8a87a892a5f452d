"""LocalResponseNorm: numpy references (PyTorch's and Caffe's formulas), gradients, CUDA parity, errors."""
import numpy as np
import pytest

from rabbitkit.errors import ConfigError
from rabbitkit.layers.lrn import LocalResponseNorm
from rabbitkit.plugins import registry
from rabbitkit.testing import check_cuda_parity, check_gradients


def reference_torch(x, size, alpha, beta, k):
    """PyTorch's F.local_response_norm, step by step: pad the squares along channels
    by size//2 in front and (size-1)//2 behind, average over size, then k + alpha*avg."""
    squares = x.astype(np.float64) ** 2
    pad = [(0, 0)] * x.ndim
    pad[1] = (size // 2, (size - 1) // 2)
    padded = np.pad(squares, pad)
    average = np.stack([padded[:, c : c + size].sum(axis=1) / size for c in range(x.shape[1])], axis=1)
    return x / (k + alpha * average) ** beta


def reference_caffe(x, size, alpha, beta, k):
    """Caffe's LRNLayer::CrossChannelForward_cpu (odd sizes): pre_pad = (size-1)/2, scale = k + alpha/size * sum."""
    channels = x.shape[1]
    pre_pad = (size - 1) // 2
    out = np.empty(x.shape)
    for c in range(channels):
        total = sum(x[:, cc].astype(np.float64) ** 2 for cc in range(c - pre_pad, c - pre_pad + size) if 0 <= cc < channels)
        out[:, c] = x[:, c] * (k + alpha / size * total) ** -beta
    return out


# (shape, size, alpha, beta, k): odd shapes, windows wider than the channels, even sizes, 3-d input
CASES = [
    ((2, 7, 5, 3), 5, 1.0, 0.75, 1.0),
    ((2, 7, 5, 3), 3, 2.0, 0.75, 2.0),
    ((1, 3, 4, 5), 7, 1.5, 0.6, 0.5),
    ((2, 6, 3, 3), 4, 1.0, 0.75, 1.0),
    ((3, 5, 7), 3, 1.0, 1.3, 1.0),
    ((1, 4, 2, 2), 1, 3.0, 0.75, 1.0),
    ((2, 5, 3, 4), 3, 1.0, 0.5, 1.0),  # the powers computed by square roots: 0.75, 0.5 and 1
    ((2, 5, 3, 4), 5, 1.0, 1.0, 2.0),
]


@pytest.mark.parametrize("shape,size,alpha,beta,k", CASES)
def test_forward_matches_pytorchs_formula(shape, size, alpha, beta, k, rng):
    x = rng.standard_normal(shape)
    layer = LocalResponseNorm(size, alpha, beta, k, dtype=np.float64)
    y = layer.forward(x)
    np.testing.assert_allclose(y, reference_torch(x, size, alpha, beta, k), rtol=1e-12, atol=1e-14)
    assert layer.output_shape(shape[1:]) == shape[1:]
    y32 = LocalResponseNorm(size, alpha, beta, k).forward(x.astype(np.float32))
    assert y32.dtype == np.float32
    np.testing.assert_allclose(y32, y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("size", [1, 3, 5, 7])
def test_odd_sizes_match_caffe(size, rng):
    x = rng.standard_normal((2, 6, 3, 4)) * 3
    y = LocalResponseNorm(size, 1e-1, 0.75, 2.0, dtype=np.float64).forward(x)
    np.testing.assert_allclose(y, reference_caffe(x, size, 1e-1, 0.75, 2.0), rtol=1e-12)


def test_defaults_are_pytorchs_and_alexnets(rng):
    layer = LocalResponseNorm()
    assert (layer.size, layer.alpha, layer.beta, layer.k) == (5, 1e-4, 0.75, 1.0)
    x = rng.standard_normal((1, 8, 3, 3)) * 20  # large enough for the default alpha to matter
    y = LocalResponseNorm(dtype=np.float64).forward(x)
    np.testing.assert_allclose(y, reference_torch(x, 5, 1e-4, 0.75, 1.0), rtol=1e-12)
    assert not np.allclose(y, x, rtol=1e-3)


@pytest.mark.parametrize("shape,size,alpha,beta,k", CASES)
def test_gradients(shape, size, alpha, beta, k):
    report = check_gradients(LocalResponseNorm(size, alpha, beta, k, dtype=np.float64), shape, input_range=(-2, 2))
    assert report.checked["input"] == min(np.prod(shape), 150)


def test_gradients_with_the_default_parameters_on_large_inputs():
    check_gradients(LocalResponseNorm(dtype=np.float64), (2, 7, 5, 3), input_range=(-30, 30))


def test_spans_more_than_one_cpu_block(rng):
    from rabbitkit.layers import lrn

    shape = (2, 4, 1, lrn.BLOCK + 37)  # a second, partial block of positions per sample
    x = rng.standard_normal(shape)
    layer = LocalResponseNorm(3, 1.0, 0.75, 1.0, dtype=np.float64)
    np.testing.assert_allclose(layer.forward(x), reference_torch(x, 3, 1.0, 0.75, 1.0), rtol=1e-12)
    dy = rng.standard_normal(shape)
    dx = layer.backward(dy)
    # the same positions computed alone (one block) give the same gradient
    tail = LocalResponseNorm(3, 1.0, 0.75, 1.0, dtype=np.float64)
    tail.forward(np.ascontiguousarray(x[..., lrn.BLOCK - 5 :]))
    np.testing.assert_allclose(dx[..., lrn.BLOCK - 5 :], tail.backward(np.ascontiguousarray(dy[..., lrn.BLOCK - 5 :])),
                               rtol=1e-12, atol=1e-15)


def test_flops_and_repr():
    layer = LocalResponseNorm(3)
    assert layer.flops((4, 5, 6)) == 4 * 5 * 6 * (2 * 3 + 4)
    assert "size=3" in repr(layer)


def test_errors():
    with pytest.raises(ConfigError, match="size must be a positive int"):
        LocalResponseNorm(0)
    with pytest.raises(ConfigError, match="size must be a positive int"):
        LocalResponseNorm(2.5)
    with pytest.raises(ConfigError, match="k > 0"):
        LocalResponseNorm(5, k=0)
    with pytest.raises(ConfigError, match="alpha >= 0"):
        LocalResponseNorm(5, alpha=-1)
    with pytest.raises(ConfigError, match=r"\(N, C, \.\.\.\)"):
        LocalResponseNorm().forward(np.zeros((2, 4), np.float32))
    with pytest.raises(ConfigError, match=r"\(C, \.\.\.\)"):
        LocalResponseNorm().output_shape((4,))


def test_registered_under_both_names():
    layers = registry("layers")
    assert layers.get("LocalResponseNorm") is LocalResponseNorm and layers.get("LRN") is LocalResponseNorm


# -- CUDA (simulator: tiny shapes) ---------------------------------------------------
@pytest.mark.parametrize("shape,size", [((1, 5, 3, 3), 5), ((2, 7, 3, 1), 3), ((1, 4, 2, 3), 4), ((2, 3, 5), 7)])
def test_cuda_matches_cpu(shape, size):
    check_cuda_parity(lambda: LocalResponseNorm(size, alpha=2.0, beta=0.75, k=1.0), shape)
