"""Preprocessing: colour spaces against independent references, fitted statistics,
LCN against a scipy implementation, state round trips and config errors."""
import colorsys

import numpy as np
import pytest
from scipy.ndimage import convolve1d

from rabbitkit.data import preprocess
from rabbitkit.data.filters import gaussian_weights
from rabbitkit.data.preprocess import Pipeline
from rabbitkit.errors import ConfigError


@pytest.fixture
def images(rng):
    return rng.integers(0, 256, (5, 3, 7, 6), dtype=np.uint8)


def per_pixel(x, fn):
    """Apply a (r, g, b) -> (a, b, c) function to every pixel of float NCHW images."""
    out = np.empty_like(x, dtype=np.float64)
    n, _, h, w = x.shape
    for s in range(n):
        for i in range(h):
            for j in range(w):
                out[s, :, i, j] = fn(*x[s, :, i, j])
    return out


def test_scale_maps_uint8_to_unit_interval(images):
    y = Pipeline.from_config(["scale"]).apply(images)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, images / 255.0, rtol=1e-6)
    # float input is taken as already scaled
    np.testing.assert_array_equal(Pipeline.from_config([]).apply(y), y)


@pytest.mark.parametrize("name, reference", [
    ("hsv", colorsys.rgb_to_hsv),
    ("hsl", lambda r, g, b: (lambda h, l, s: (h, s, l))(*colorsys.rgb_to_hls(r, g, b))),
    ("yuv", lambda r, g, b: (lambda y: (y, 0.492 * (b - y), 0.877 * (r - y)))(0.299 * r + 0.587 * g + 0.114 * b)),
])
def test_colour_spaces_match_references(images, name, reference):
    expected = per_pixel(images / 255.0, reference)
    np.testing.assert_allclose(Pipeline.from_config([name]).apply(images), expected, atol=2e-6)


def test_hsv_of_grey_and_primaries():
    pixels = np.array([[0, 0, 0], [128, 128, 128], [255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)
    x = pixels.T[None, :, :, None]  # (1, 3, 5, 1)
    y = Pipeline.from_config(["hsv"]).apply(x)[0, :, :, 0].T
    np.testing.assert_allclose(y[:, 0], [0, 0, 0, 1 / 3, 2 / 3], atol=1e-6)
    np.testing.assert_allclose(y[:, 1], [0, 0, 1, 1, 1], atol=1e-6)


def test_lab_known_values():
    # CIE L*a*b* (D65) of sRGB white, red, green, blue, as published for sRGB
    pixels = np.array([[255, 255, 255], [255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)
    expected = np.array([[100.0, 0.0, 0.0], [53.2408, 80.0925, 67.2032], [87.7347, -86.1827, 83.1793],
                         [32.2970, 79.1875, -107.8602]])
    y = Pipeline.from_config(["lab"]).apply(pixels.T[None, :, :, None])[0, :, :, 0].T
    np.testing.assert_allclose(y, expected, atol=0.01)


def test_grayscale(images):
    p = Pipeline.from_config(["grayscale"])
    y = p.apply(images)
    assert y.shape == (5, 1, 7, 6) and p.output_shape((3, 7, 6)) == (1, 7, 6)
    f = images / 255.0
    np.testing.assert_allclose(y[:, 0], 0.299 * f[:, 0] + 0.587 * f[:, 1] + 0.114 * f[:, 2], atol=1e-6)
    np.testing.assert_array_equal(p.apply(y), y)  # one channel stays as it is


def test_colour_step_needs_three_channels():
    with pytest.raises(ConfigError, match="'yuv' needs 3-channel images"):
        Pipeline.from_config(["yuv"]).output_shape((1, 8, 8))


def test_standardize_uses_training_statistics(rng, monkeypatch):
    monkeypatch.setattr(preprocess, "FIT_CHUNK", 3)  # several chunks: the streamed sums must add up
    train = (rng.random((10, 3, 4, 5)) * [[[2.0]], [[0.5]], [[1.0]]] + [[[1.0]], [[-3.0]], [[0.0]]]).astype(np.float32)
    p = Pipeline.from_config(["standardize"]).fit(train)
    y = p.apply(train).astype(np.float64)
    np.testing.assert_allclose(y.mean(axis=(0, 2, 3)), 0, atol=1e-5)
    np.testing.assert_allclose(y.std(axis=(0, 2, 3)), 1, atol=1e-5)
    other = rng.random((2, 3, 4, 5)).astype(np.float32)
    mean, std = train.mean(axis=(0, 2, 3), dtype=np.float64), train.std(axis=(0, 2, 3), dtype=np.float64)
    np.testing.assert_allclose(p.apply(other), (other - mean[:, None, None]) / std[:, None, None], rtol=1e-4, atol=1e-5)


def test_steps_fit_on_the_output_of_the_steps_before(images):
    p = Pipeline.from_config(["yuv", "standardize"]).fit(images)
    y = p.apply(images).astype(np.float64)
    np.testing.assert_allclose(y.mean(axis=(0, 2, 3)), 0, atol=1e-5)


def test_zca_whitens_the_training_data(rng):
    base = rng.normal(size=(400, 2 * 3 * 3))
    mixing = rng.normal(size=(18, 18))
    train = (base @ mixing).reshape(400, 2, 3, 3).astype(np.float32)
    p = Pipeline.from_config([{"name": "zca", "epsilon": 1e-6}]).fit(train)
    white = p.apply(train).reshape(400, -1).astype(np.float64)
    np.testing.assert_allclose(white.mean(axis=0), 0, atol=1e-3)
    np.testing.assert_allclose(np.cov(white, rowvar=False, bias=True), np.eye(18), atol=2e-3)
    matrix = p.state_dict()["0.zca.matrix"]
    np.testing.assert_allclose(matrix, matrix.T, atol=1e-4)  # ZCA: the symmetric whitening matrix


def lcn_reference(x, kernel, sigma, eps=1e-2):
    """Jarrett et al. 2009 LCN with normalised Gaussian convolution, in float64 with scipy."""
    w = gaussian_weights(sigma, radius=kernel // 2)

    def blur(a):  # over the last two axes, normalised at the borders
        ones = np.ones_like(a)
        for axis in (-1, -2):
            a = convolve1d(a, w, axis=axis, mode="constant")
            ones = convolve1d(ones, w, axis=axis, mode="constant")
        return a / ones

    x = x.astype(np.float64)
    v = x - blur(x).mean(axis=1, keepdims=True)
    sd = np.sqrt(blur(v * v).mean(axis=1, keepdims=True))
    floor = sd.mean(axis=(2, 3), keepdims=True)
    return v / np.maximum(np.maximum(sd, floor), eps)


@pytest.mark.parametrize("shape, kernel, sigma", [((3, 3, 9, 7), 5, None), ((2, 1, 6, 11), 7, 1.0)])
def test_lcn_matches_reference(rng, shape, kernel, sigma):
    x = rng.random(shape).astype(np.float32)
    spec = {"name": "lcn", "kernel": kernel} | ({"sigma": sigma} if sigma else {})
    y = Pipeline.from_config([spec]).apply(x)
    np.testing.assert_allclose(y, lcn_reference(x, kernel, sigma or kernel / 4), rtol=1e-4, atol=1e-5)


def test_lcn_of_a_constant_image_is_zero():
    # float32 rounding leaves ~1e-7 after the subtraction; eps (0.01) keeps it from being amplified
    y = Pipeline.from_config(["lcn"]).apply(np.full((1, 3, 8, 8), 0.7, np.float32))
    np.testing.assert_allclose(y, 0, atol=1e-4)


def test_state_dict_round_trip(images):
    specs = ["yuv", {"name": "zca", "epsilon": 0.1}, "standardize"]
    fitted = Pipeline.from_config(specs).fit(images)
    state = fitted.state_dict()
    assert set(state) == {"1.zca.mean", "1.zca.matrix", "2.standardize.mean", "2.standardize.std"}
    assert all(isinstance(v, np.ndarray) for v in state.values())
    fresh = Pipeline.from_config(fitted.to_config())
    with pytest.raises(RuntimeError, match="not fitted"):
        fresh.apply(images)
    fresh.load_state_dict(state)
    np.testing.assert_array_equal(fresh.apply(images), fitted.apply(images))
    with pytest.raises(ConfigError, match="does not match"):
        Pipeline.from_config(["standardize"]).load_state_dict(state)


def test_config_errors():
    with pytest.raises(ConfigError, match=r"unknown preprocessing 'standardise' \(did you mean 'standardize'\?\)"):
        Pipeline.from_config(["standardise"])
    with pytest.raises(ConfigError, match=r"preprocessing 'lcn': unknown option 'kernal' \(did you mean 'kernel'\?\)"):
        Pipeline.from_config([{"name": "lcn", "kernal": 5}])
    with pytest.raises(ConfigError, match="option 'kernel' must be int"):
        Pipeline.from_config([{"name": "lcn", "kernel": 4.5}])
    with pytest.raises(ConfigError, match="odd"):
        Pipeline.from_config([{"name": "lcn", "kernel": 4}])
    with pytest.raises(ConfigError, match="it has no options"):
        Pipeline.from_config([{"name": "yuv", "gamma": 2}])


def test_output_shape():
    assert Pipeline.from_config(["scale", "lab", "lcn", "zca"]).output_shape((3, 48, 48)) == (3, 48, 48)
    assert Pipeline.from_config(["grayscale", "standardize"]).output_shape((3, 32, 32)) == (1, 32, 32)


def test_equalize_flattens_the_histogram_and_keeps_the_order():
    from rabbitkit.data.preprocess import Pipeline

    rng = np.random.default_rng(5)
    # a dark, low-contrast image: values crowd into 20..60 of 255
    x = rng.integers(20, 61, (2, 1, 16, 16)).astype(np.uint8)
    y = Pipeline.from_config(["equalize"]).apply(x)
    assert y.dtype == np.float32 and y.shape == x.shape
    assert y.min() == 0.0 and y.max() == 1.0
    for s in range(2):
        flat_x, flat_y = x[s, 0].ravel(), y[s, 0].ravel()
        order = np.argsort(flat_x, kind="stable")
        assert np.all(np.diff(flat_y[order]) >= 0)  # monotone map
        # the value at rank r maps to about r / N: a flat (uniform) output histogram
        ranks = np.searchsorted(np.sort(flat_x), flat_x, side="right") / flat_x.size
        assert np.abs(flat_y - ranks).max() < 0.05
