"""LocalContrastNorm: forward against a direct numpy reference, gradients, properties."""
import numpy as np
import pytest

from rabbitkit.errors import ConfigError
from rabbitkit.layers.lcn import LocalContrastNorm
from rabbitkit.plugins import registry
from rabbitkit.testing import check_gradients


def gaussian_window(kernel_size, sigma):
    offsets = np.arange(kernel_size) - (kernel_size - 1) / 2
    window = np.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / (2 * sigma**2))
    return window / window.sum()


def reference_lcn(x, kernel_size, sigma, eps):
    """Jarrett et al.'s formula with a full 2-D window and explicit zero padding."""
    n, channels, height, width = x.shape
    window = gaussian_window(kernel_size, sigma)
    radius = kernel_size // 2

    def window_sum(planes):  # (N, H, W) -> (N, H, W), zero outside the image
        padded = np.pad(planes, ((0, 0), (radius, radius), (radius, radius)))
        out = np.zeros_like(planes)
        for p in range(kernel_size):
            for q in range(kernel_size):
                out += window[p, q] * padded[:, p:p + height, q:q + width]
        return out

    cover = window_sum(np.ones((1, height, width)))[0]  # window mass inside the image
    mean = window_sum(x.sum(axis=1)) / (channels * cover)
    v = x - mean[:, None]
    deviation = np.sqrt(window_sum((v**2).sum(axis=1)) / (channels * cover) + eps)
    divisor = np.maximum(deviation.mean(axis=(1, 2))[:, None, None], deviation)
    return v / divisor[:, None]


@pytest.mark.parametrize(
    "shape,kernel_size,sigma",
    [((2, 3, 7, 5), 5, None), ((1, 1, 4, 9), 9, None), ((3, 2, 12, 11), 3, 0.7), ((1, 4, 10, 10), 9, 3.0)],
)
def test_forward_matches_reference(shape, kernel_size, sigma, rng):
    x = rng.standard_normal(shape) * 2 + 0.5
    layer = LocalContrastNorm(shape[1], kernel_size, sigma=sigma, dtype=np.float64)
    expected = reference_lcn(x, kernel_size, sigma or kernel_size / 4, 1e-4)
    np.testing.assert_allclose(layer.forward(x), expected, rtol=1e-10, atol=1e-12)


def test_float32_matches_float64(rng):
    x = rng.uniform(0, 1, (2, 3, 9, 8))
    y64 = LocalContrastNorm(3, dtype=np.float64).forward(x)
    y32 = LocalContrastNorm(3).forward(x.astype(np.float32))
    assert y32.dtype == np.float32
    np.testing.assert_allclose(y32, y64, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "shape,kernel_size", [((1, 1, 5, 7), 3), ((2, 3, 6, 5), 5), ((1, 2, 3, 4), 9), ((3, 2, 8, 7), 7)]
)
def test_gradients(shape, kernel_size):
    report = check_gradients(LocalContrastNorm(shape[1], kernel_size, dtype=np.float64), shape)
    assert report.checked["input"] == min(int(np.prod(shape)), 150)


def test_gradients_where_the_mean_deviation_wins():
    # A flat image with one textured patch: most pixels divide by the mean deviation.
    x = np.full((1, 2, 9, 9), 0.3)
    x[:, :, 2:5, 3:6] += np.random.default_rng(3).uniform(-1, 1, (1, 2, 3, 3))
    layer = LocalContrastNorm(2, 5, eps=1e-3, dtype=np.float64)
    layer.forward(x)
    _, _, deviation, mean_deviation, _ = layer._saved
    wins = deviation[0] <= mean_deviation[0]
    assert wins.any() and (~wins).any()  # both branches of the max are exercised
    check_gradients(layer, inputs=x)


def test_contrast_invariance_and_flat_images(rng):
    x = rng.uniform(0, 1, (2, 3, 10, 12))
    layer = LocalContrastNorm(3, 7, eps=1e-12, dtype=np.float64)
    np.testing.assert_allclose(layer.forward(4.0 * x + 7.0), layer.forward(x), rtol=1e-8, atol=1e-9)
    flat = np.full((1, 3, 6, 6), 5.0)
    np.testing.assert_allclose(LocalContrastNorm(3, dtype=np.float64).forward(flat), 0.0, atol=1e-12)


def test_subtracts_the_cross_channel_local_mean():
    # The symmetric window averages a linear ramp to its centre value, so away from
    # the borders v = x - mean over channels and positions = per-channel offset - mean offset.
    rows, cols = np.meshgrid(np.arange(11.0), np.arange(12.0), indexing="ij")
    offsets = np.array([0.5, -1.0, 2.0])
    x = (offsets[:, None, None] + 0.3 * rows - 0.2 * cols)[None]
    layer = LocalContrastNorm(3, 5, dtype=np.float64)
    layer.forward(x)
    v = layer._saved[0]
    interior = v[0, :, 2:-2, 2:-2]
    expected = np.broadcast_to((offsets - offsets.mean())[:, None, None], interior.shape)
    np.testing.assert_allclose(interior, expected, atol=1e-12)


def test_configuration_errors():
    with pytest.raises(ConfigError, match="odd"):
        LocalContrastNorm(3, kernel_size=4)
    with pytest.raises(ConfigError, match="sigma"):
        LocalContrastNorm(3, sigma=0)
    with pytest.raises(ConfigError, match=r"\(N, 3, H, W\)"):
        LocalContrastNorm(3).forward(np.zeros((1, 2, 5, 5), dtype=np.float32))


def test_registered_and_shapes():
    layer = registry("layers").get("LocalContrastNorm")(4)
    assert isinstance(layer, LocalContrastNorm)
    assert layer.output_shape((4, 7, 9)) == (4, 7, 9)
    assert layer.num_parameters() == 0 and layer.flops((4, 7, 9)) > 0
    assert "kernel_size=9" in repr(layer)
