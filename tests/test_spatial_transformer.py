"""SpatialTransformer: grid generator, bilinear sampler, gradients, container behaviour."""
import numpy as np
import pytest

import rabbitkit
from rabbitkit.errors import ConfigError
from rabbitkit.layers.base import Layer
from rabbitkit.layers.dense import Dense
from rabbitkit.layers.flatten import Flatten
from rabbitkit.layers.spatial_transformer import (
    SpatialTransformer,
    affine_grid,
    default_localization,
    grid_sample,
)
from rabbitkit.plugins import registry
from rabbitkit.testing import check_gradients

IDENTITY = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]


class FixedTheta(Layer):
    """A localization 'net' whose output is one trainable theta for every sample."""

    def __init__(self, theta, input_shape, dtype=np.float64):
        super().__init__(dtype)
        self.input_shape = tuple(input_shape)
        self.add_param("theta", np.asarray(theta, dtype=float).ravel())

    def forward_cpu(self, x, training):
        self._n = x.shape[0]
        return np.tile(self.params["theta"], (x.shape[0], 1))

    def backward_cpu(self, dy):
        self.grads["theta"] += dy.sum(axis=0)
        return np.zeros((self._n, *self.input_shape), dtype=self.dtype)  # theta ignores x


def reference_sample(x, theta, out_height, out_width):
    """Pixel-by-pixel affine_grid + grid_sample (bilinear, zeros, align_corners=False)."""
    n, channels, height, width = x.shape
    y = np.zeros((n, channels, out_height, out_width))
    for b in range(n):
        for i in range(out_height):
            for j in range(out_width):
                xt = (2 * j + 1) / out_width - 1
                yt = (2 * i + 1) / out_height - 1
                xs, ys = theta[b] @ np.array([xt, yt, 1.0])
                px = ((xs + 1) * width - 1) / 2
                py = ((ys + 1) * height - 1) / 2
                x0, y0 = int(np.floor(px)), int(np.floor(py))
                for dyy, wy in ((0, 1 - (py - y0)), (1, py - y0)):
                    for dxx, wx in ((0, 1 - (px - x0)), (1, px - x0)):
                        r, c = y0 + dyy, x0 + dxx
                        if 0 <= r < height and 0 <= c < width:
                            y[b, :, i, j] += wy * wx * x[b, :, r, c]
    return y


def constant_localization(shape):
    """Flatten -> Dense(6) localization with zero weight (theta = its bias), float64."""
    dense = Dense(int(np.prod(shape[1:])), 6, dtype=np.float64)
    dense.params["weight"][...] = 0.0
    return rabbitkit.Sequential([Flatten(dtype=np.float64), dense])


def random_theta(rng, n):
    theta = np.tile(np.array(IDENTITY).reshape(2, 3), (n, 1, 1))
    return theta + rng.uniform(-0.4, 0.4, (n, 2, 3))


def test_identity_reproduces_the_input(rng):
    x = rng.standard_normal((2, 3, 5, 7)).astype(np.float32)
    layer = SpatialTransformer(FixedTheta(IDENTITY, (3, 5, 7), dtype=np.float32))
    np.testing.assert_allclose(layer.forward(x), x, rtol=0, atol=1e-6)


def test_default_localization_starts_at_the_identity(rng):
    x = rng.standard_normal((3, 2, 12, 10)).astype(np.float32)
    layer = SpatialTransformer(default_localization((2, 12, 10)))
    np.testing.assert_allclose(layer.forward(x), x, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(layer.theta, np.tile(np.reshape(IDENTITY, (2, 3)), (3, 1, 1)))


def test_one_pixel_translation(rng):
    x = rng.standard_normal((1, 2, 4, 6))
    # x_s = x_t + 2/W: one pixel to the right in the source, so the image moves left.
    layer = SpatialTransformer(FixedTheta([1, 0, 2 / 6, 0, 1, 0], (2, 4, 6)))
    y = layer.forward(x)
    np.testing.assert_allclose(y[..., :-1], x[..., 1:], atol=1e-12)
    np.testing.assert_allclose(y[..., -1], 0.0, atol=1e-12)  # sampled outside: zero padding


def test_zoom_by_two_matches_half_pixel_blend():
    # theta = 0.5 I magnifies the centre; on a 4-pixel row output pixel j reads
    # source index (j + 0.5) / 2 + 0.5, i.e. blends of neighbouring pixels.
    x = np.arange(4.0).reshape(1, 1, 1, 4) * np.ones((1, 1, 2, 1))
    y = grid_sample(x, affine_grid(np.array([[[0.5, 0, 0], [0, 1, 0]]]), 2, 4))
    np.testing.assert_allclose(y[0, 0, 0], [0.75, 1.25, 1.75, 2.25])


@pytest.mark.parametrize("shape,out_size", [((2, 3, 5, 7), None), ((1, 1, 6, 4), (3, 5)), ((3, 2, 4, 4), (7, 6))])
def test_sampler_matches_reference(shape, out_size, rng):
    x = rng.standard_normal(shape)
    theta = random_theta(rng, shape[0])
    out_height, out_width = out_size or shape[2:]
    expected = reference_sample(x, theta, out_height, out_width)
    np.testing.assert_allclose(grid_sample(x, affine_grid(theta, out_height, out_width)), expected, atol=1e-12)
    layer = SpatialTransformer(constant_localization(shape), output_size=out_size)
    layer.localization.layers[-1].params["bias"][...] = theta[0].ravel()
    np.testing.assert_allclose(layer.forward(x)[0], expected[0], atol=1e-12)
    assert layer.output_shape(shape[1:]) == (shape[1], out_height, out_width)


@pytest.mark.parametrize("shape,out_size", [((1, 1, 4, 5), None), ((2, 3, 5, 4), (3, 6)), ((3, 2, 3, 3), (4, 4))])
def test_sampler_gradients_for_input_and_theta(shape, out_size, rng):
    theta = random_theta(rng, 1)[0]
    layer = SpatialTransformer(FixedTheta(theta, shape[1:]), output_size=out_size)
    report = check_gradients(layer, shape)
    assert report.checked["0.theta"] == 6 and report.checked["input"] == min(int(np.prod(shape)), 150)


def test_whole_layer_gradients_through_a_dense_localization(rng):
    shape = (2, 2, 4, 5)
    localization = constant_localization(shape)
    localization.layers[-1].params["weight"][...] = rng.uniform(-0.05, 0.05, (6, 40))
    localization.layers[-1].params["bias"][...] = random_theta(rng, 1)[0].ravel()
    report = check_gradients(SpatialTransformer(localization), shape)
    assert {"input", "0.1.weight", "0.1.bias"} <= set(report.checked)


def test_whole_layer_gradients_through_the_default_localization(rng):
    shape = (2, 2, 8, 9)
    localization = default_localization(shape[1:], channels=(3, 4), hidden=5, dtype=np.float64)
    # Start away from the identity so that gradients reach every localization parameter.
    localization.layers[-1].params["weight"][...] = rng.uniform(-0.3, 0.3, (6, 5))
    report = check_gradients(SpatialTransformer(localization), shape, max_checks=60)
    names = {name for name, *_ in localization.named_parameters("0.")}
    assert names <= set(report.checked) and "input" in report.checked


def test_container_names_seeding_and_devices():
    layer = SpatialTransformer(default_localization((1, 8, 8)))
    state = layer.state_dict()
    assert list(state)[:2] == ["0.0.weight", "0.0.bias"] and "0.9.bias" in state
    np.testing.assert_array_equal(state["0.9.bias"], IDENTITY)
    assert layer.num_parameters() == layer.localization.num_parameters()
    assert layer.to("cuda").device == "cuda" and layer.localization.layers[0].device == "cuda"


def test_errors_and_registration():
    with pytest.raises(ConfigError, match=r"\(N, 6\)"):
        SpatialTransformer(rabbitkit.Sequential([Flatten(), Dense(12, 4)])).forward(np.zeros((1, 3, 2, 2), np.float32))
    with pytest.raises(ConfigError, match="4x4"):
        default_localization((3, 3, 8))
    with pytest.raises(ConfigError, match="output_size"):
        SpatialTransformer(Dense(2, 6), output_size=(0, 3))
    assert registry("layers").get("SpatialTransformer") is SpatialTransformer
