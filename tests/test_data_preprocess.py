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


def clahe_reference(plane, tiles, clip_limit, levels):
    """CLAHE of one [0, 1] plane written out directly: per-region clipped histograms with
    the excess spread evenly (remainder one per bin from bin 0 at stride levels // rest),
    cumulative maps, then bilinear interpolation between the region centres."""
    h, w = plane.shape
    bins = np.floor(np.clip(plane, 0, 1) * (levels - 1) + 0.5).astype(int)
    rows = [(k * h) // tiles for k in range(tiles + 1)]
    cols = [(k * w) // tiles for k in range(tiles + 1)]
    maps = np.empty((tiles, tiles, levels))
    for a in range(tiles):
        for b in range(tiles):
            region = bins[rows[a]:rows[a + 1], cols[b]:cols[b + 1]]
            counts = np.bincount(region.ravel(), minlength=levels)
            clip = max(int(clip_limit * region.size / levels), 1)
            excess = np.maximum(counts - clip, 0).sum()
            counts = np.minimum(counts, clip) + excess // levels
            rest = excess % levels
            if rest:
                counts[::max(levels // rest, 1)][:rest] += 1
            maps[a, b] = np.cumsum(counts) / counts.sum()

    def between(position, edges):
        centres = [(edges[k] + edges[k + 1]) / 2 for k in range(tiles)]
        if position <= centres[0]:
            return 0, 0, 0.0
        if position >= centres[-1]:
            return tiles - 1, tiles - 1, 0.0
        k = int(np.searchsorted(centres, position, side="right")) - 1
        return k, k + 1, (position - centres[k]) / (centres[k + 1] - centres[k])

    out = np.empty((h, w))
    for i in range(h):
        a0, a1, wy = between(i + 0.5, rows)
        for j in range(w):
            b0, b1, wx = between(j + 0.5, cols)
            v = bins[i, j]
            top = (1 - wx) * maps[a0, b0, v] + wx * maps[a0, b1, v]
            bottom = (1 - wx) * maps[a1, b0, v] + wx * maps[a1, b1, v]
            out[i, j] = (1 - wy) * top + wy * bottom
    return out


@pytest.mark.parametrize("shape, tiles, clip_limit, levels", [
    ((2, 1, 9, 7), 2, 2.0, 16),     # odd sizes: regions of unequal size
    ((1, 3, 11, 13), 3, 1.5, 8),    # colour: channel by channel
    ((2, 1, 16, 16), 4, 40.0, 4),   # a limit no bin reaches: plain adaptive equalisation
    ((1, 1, 8, 8), 1, 1.0, 256),    # one region, every bin clipped to one pixel
])
def test_clahe_matches_reference(rng, shape, tiles, clip_limit, levels):
    x = (rng.random(shape) ** 2).astype(np.float32)  # skewed towards dark, as badly lit signs
    y = Pipeline.from_config([{"name": "clahe", "tiles": tiles, "clip_limit": clip_limit,
                               "levels": levels}]).apply(x)
    assert y.dtype == np.float32 and y.shape == x.shape
    for s in range(shape[0]):
        for c in range(shape[1]):
            expected = clahe_reference(x[s, c].astype(np.float64), tiles, clip_limit, levels)
            np.testing.assert_allclose(y[s, c], expected, rtol=0, atol=1e-6)


def test_clahe_with_one_region_and_no_clipping_is_the_cumulative_histogram(rng):
    x = rng.integers(20, 61, (2, 1, 12, 10)).astype(np.uint8)
    y = Pipeline.from_config([{"name": "clahe", "tiles": 1, "clip_limit": 1e9}]).apply(x)
    for s in range(2):
        flat = x[s, 0].ravel()
        at_or_below = (flat[None, :] <= flat[:, None]).mean(axis=1)
        np.testing.assert_allclose(y[s, 0].ravel(), at_or_below, rtol=0, atol=1e-6)


def test_clahe_stretches_a_dark_region_as_far_as_the_clip_limit_allows():
    x = np.full((1, 1, 16, 16), 0.8, np.float32)
    x[0, 0, :, :8] = np.linspace(0.02, 0.1, 128, dtype=np.float32).reshape(16, 8)  # a dark left half
    dark = x[0, 0, :, :4].mean()
    free = Pipeline.from_config([{"name": "clahe", "tiles": 2, "clip_limit": 100.0}]).apply(x)[0, 0, :, :4]
    limited = Pipeline.from_config([{"name": "clahe", "tiles": 2, "clip_limit": 2.0}]).apply(x)[0, 0, :, :4]
    assert dark < 0.1 and free.mean() > 0.4  # stretched over the whole range
    assert free.mean() > limited.mean() > 2 * dark  # stretched less, but still brightened
    flat = np.full((1, 1, 8, 8), 0.3, np.float32)
    clipped = Pipeline.from_config(["clahe"]).apply(flat)
    assert np.ptp(clipped) == 0 and 0 < clipped[0, 0, 0, 0] < 1  # one value: no texture is made up
    unclipped = Pipeline.from_config([{"name": "clahe", "clip_limit": 1e9}]).apply(flat)
    np.testing.assert_array_equal(unclipped, 1.0)  # every pixel is at or below its own value


def test_clahe_config_errors():
    with pytest.raises(ConfigError, match="tiles must be 1..64"):
        Pipeline.from_config([{"name": "clahe", "tiles": 0}])
    with pytest.raises(ConfigError, match="clip_limit must be > 0"):
        Pipeline.from_config([{"name": "clahe", "clip_limit": 0.0}])
    with pytest.raises(ConfigError, match="8 tiles per side do not fit 6x9 images"):
        Pipeline.from_config([{"name": "clahe", "tiles": 8}]).apply(np.zeros((1, 1, 6, 9), np.float32))
