"""AdaptiveAvgPool2D: PyTorch's bins, the identity at its own size, gradients."""
import numpy as np
import pytest

from rabbitkit.errors import ConfigError
from rabbitkit.layers.adaptive_pool import AdaptiveAvgPool2D
from rabbitkit.testing import check_gradients


def test_bins_overlap_as_pytorchs():
    # 5 -> 3: rows [0, 2), [1, 4), [3, 5) (start floor(i*5/3), end ceil((i+1)*5/3)); 4 -> 2: [0, 2), [2, 4)
    x = np.arange(2 * 5 * 4, dtype=np.float64).reshape(1, 2, 5, 4)
    y = AdaptiveAvgPool2D((3, 2), dtype=np.float64).forward(x, training=False)
    rows, cols = [(0, 2), (1, 4), (3, 5)], [(0, 2), (2, 4)]
    expected = np.array([[[x[0, c, r0:r1, c0:c1].mean() for c0, c1 in cols] for r0, r1 in rows] for c in range(2)])
    np.testing.assert_allclose(y[0], expected, rtol=1e-12)


def test_identity_at_its_size_and_spread_below_it():
    x = np.random.default_rng(0).standard_normal((2, 3, 7, 7)).astype(np.float32)
    layer = AdaptiveAvgPool2D(7)
    assert layer.forward(x) is x and layer.output_shape((3, 7, 7)) == (3, 7, 7)
    one = np.random.default_rng(1).standard_normal((1, 2, 1, 1)).astype(np.float32)
    np.testing.assert_array_equal(layer.forward(one), np.broadcast_to(one, (1, 2, 7, 7)))


@pytest.mark.parametrize("size,shape", [((3, 2), (2, 2, 5, 4)), (4, (1, 3, 2, 3)), (2, (1, 1, 2, 2))])
def test_gradients(size, shape):
    report = check_gradients(AdaptiveAvgPool2D(size, dtype=np.float64), shape)
    assert "input" in report.checked


def test_bad_size():
    with pytest.raises(ConfigError, match="output_size must be positive"):
        AdaptiveAvgPool2D(0)


@pytest.mark.parametrize("size,shape", [((3, 2), (2, 2, 5, 4)), (7, (1, 2, 1, 1)), (2, (1, 1, 2, 2))])
def test_cuda_matches_cpu(size, shape):
    from rabbitkit.testing import check_cuda_parity

    check_cuda_parity(lambda: AdaptiveAvgPool2D(size), shape)


def test_channel_affine_cpu_cuda_and_gradients():
    from rabbitkit.models._zoo_layers import ChannelAffine
    from rabbitkit.testing import check_cuda_parity

    make = lambda: ChannelAffine([0.5, 2.0, -1.0], [0.1, 0.0, 3.0])  # noqa: E731
    x = np.arange(2 * 3 * 2 * 2, dtype=np.float32).reshape(2, 3, 2, 2)
    np.testing.assert_allclose(make().forward(x)[1, 2], x[1, 2] * -1.0 + 3.0)
    check_cuda_parity(make, (2, 3, 2, 2))
    assert "input" in check_gradients(ChannelAffine([0.5, 2.0], [1.0, -1.0], dtype=np.float64), (2, 2, 3)).checked
