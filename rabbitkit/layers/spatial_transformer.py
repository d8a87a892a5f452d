"""Spatial transformer (Jaderberg, Simonyan, Zisserman & Kavukcuoglu, NIPS 2015).

Three stages per sample:

1. a *localization* layer maps the input (N, C, H, W) to six numbers
   ``theta = [[t00, t01, t02], [t10, t11, t12]]`` (row-major, as PyTorch);
2. the *grid generator* maps every output pixel's normalised coordinates
   ``(x_t, y_t)`` to source coordinates ``(x_s, y_s) = theta @ (x_t, y_t, 1)``;
3. the *bilinear sampler* reads the input at ``(x_s, y_s)``.

Coordinates follow PyTorch's ``affine_grid``/``grid_sample`` with
``align_corners=False`` and ``padding_mode="zeros"``: -1 and +1 are the outer
*edges* of the border pixels, so output pixel ``j`` of ``W_out`` sits at
``x_t = (2 j + 1) / W_out - 1`` and a source coordinate maps to the pixel index
``ix = ((x_s + 1) W_in - 1) / 2``.  The sample is the bilinear blend of the four
neighbouring pixels, where pixels outside the image read as zero.  The identity
``theta = [[1, 0, 0], [0, 1, 0]]`` with an unchanged size reproduces the input
exactly.

The backward pass gives the input gradient (scattered by the sampler, plus the
localization net's own input gradient) and the gradient of ``theta``, which flows
on into the localization net's parameters.  The sampler is piecewise bilinear,
so its derivative jumps where a source coordinate crosses a pixel centre.
"""
import math

import numpy as np
from numba import prange

from ..backend.cpu import kernel
from ..errors import ConfigError
from ..hookspecs import hookimpl
from .activations import ReLU
from .base import Layer
from .conv2d import Conv2D
from .dense import Dense
from .flatten import Flatten
from .pooling import MaxPool2D
from .sequential import Sequential


# -- CPU kernels ----------------------------------------------------------------
@kernel(parallel=False)
def source_position(gx, gy, height, width):
    """Top-left neighbour (x0, y0) and blend fractions (fx, fy) of a normalised point."""
    ix = ((gx + 1.0) * width - 1.0) * 0.5
    iy = ((gy + 1.0) * height - 1.0) * 0.5
    fx0 = math.floor(ix)
    fy0 = math.floor(iy)
    return int(fx0), int(fy0), ix - fx0, iy - fy0


@kernel(parallel=False)
def pixel_or_zero(x, n, c, row, col):
    """x[n, c, row, col], or 0 outside the image (zero padding)."""
    if 0 <= row < x.shape[2] and 0 <= col < x.shape[3]:
        return x[n, c, row, col]
    return 0.0


@kernel(parallel=False)
def add_if_inside(dx, n, c, row, col, value):
    if 0 <= row < dx.shape[2] and 0 <= col < dx.shape[3]:
        dx[n, c, row, col] += value


@kernel
def bilinear_sample_cpu(x, grid, y):
    """y[n, c, i, j] = bilinear read of x[n, c] at grid[n, i, j] = (x_s, y_s)."""
    n_batch, channels, height, width = x.shape
    out_height, out_width = y.shape[2], y.shape[3]
    for nc in prange(n_batch * channels):
        n = nc // channels
        c = nc - n * channels
        for i in range(out_height):
            for j in range(out_width):
                x0, y0, fx, fy = source_position(grid[n, i, j, 0], grid[n, i, j, 1], height, width)
                top = (1.0 - fx) * pixel_or_zero(x, n, c, y0, x0) + fx * pixel_or_zero(x, n, c, y0, x0 + 1)
                bottom = (1.0 - fx) * pixel_or_zero(x, n, c, y0 + 1, x0) + fx * pixel_or_zero(x, n, c, y0 + 1, x0 + 1)
                y[n, c, i, j] = (1.0 - fy) * top + fy * bottom


@kernel
def bilinear_sample_input_grad_cpu(dy, grid, dx):
    """dx += the sampler's scatter of dy (dx zeroed by the caller).

    Parallel over (n, c) planes: every plane is written by one thread only, so
    the scatter-add needs no atomics.
    """
    n_batch, channels, height, width = dx.shape
    out_height, out_width = dy.shape[2], dy.shape[3]
    for nc in prange(n_batch * channels):
        n = nc // channels
        c = nc - n * channels
        for i in range(out_height):
            for j in range(out_width):
                x0, y0, fx, fy = source_position(grid[n, i, j, 0], grid[n, i, j, 1], height, width)
                g = dy[n, c, i, j]
                add_if_inside(dx, n, c, y0, x0, (1.0 - fy) * (1.0 - fx) * g)
                add_if_inside(dx, n, c, y0, x0 + 1, (1.0 - fy) * fx * g)
                add_if_inside(dx, n, c, y0 + 1, x0, fy * (1.0 - fx) * g)
                add_if_inside(dx, n, c, y0 + 1, x0 + 1, fy * fx * g)


@kernel
def bilinear_sample_grid_grad_cpu(x, dy, grid, dgrid):
    """dgrid[n, i, j] = d(loss)/d(x_s, y_s), summed over channels (one row per thread)."""
    n_batch, channels, height, width = x.shape
    out_height, out_width = dy.shape[2], dy.shape[3]
    for ni in prange(n_batch * out_height):
        n = ni // out_height
        i = ni - n * out_height
        for j in range(out_width):
            x0, y0, fx, fy = source_position(grid[n, i, j, 0], grid[n, i, j, 1], height, width)
            dix = 0.0
            diy = 0.0
            for c in range(channels):
                v00 = pixel_or_zero(x, n, c, y0, x0)
                v01 = pixel_or_zero(x, n, c, y0, x0 + 1)
                v10 = pixel_or_zero(x, n, c, y0 + 1, x0)
                v11 = pixel_or_zero(x, n, c, y0 + 1, x0 + 1)
                g = dy[n, c, i, j]
                dix += g * ((1.0 - fy) * (v01 - v00) + fy * (v11 - v10))
                diy += g * ((1.0 - fx) * (v10 - v00) + fx * (v11 - v01))
            # ix = ((x_s + 1) W - 1) / 2, so d ix / d x_s = W / 2
            dgrid[n, i, j, 0] = dix * (0.5 * width)
            dgrid[n, i, j, 1] = diy * (0.5 * height)


# -- grid generator and sampler as functions ---------------------------------------
def base_grid(out_height, out_width, dtype=np.float64):
    """(H_out * W_out, 3) rows ``(x_t, y_t, 1)`` at pixel centres, align_corners=False."""
    xs = (2.0 * np.arange(out_width) + 1.0) / out_width - 1.0
    ys = (2.0 * np.arange(out_height) + 1.0) / out_height - 1.0
    grid_x, grid_y = np.meshgrid(xs, ys)  # (H_out, W_out), x varies along columns
    return np.ascontiguousarray(np.stack([grid_x.ravel(), grid_y.ravel(), np.ones(grid_x.size)], axis=1), dtype=dtype)


def affine_grid(theta, out_height, out_width):
    """Sampling grid (N, H_out, W_out, 2) of ``(x_s, y_s)`` for affine ``theta`` (N, 2, 3)."""
    theta = np.asarray(theta)
    base = base_grid(out_height, out_width, theta.dtype)
    grid = np.matmul(base[None], theta.transpose(0, 2, 1))  # (N, H_out*W_out, 2)
    return np.ascontiguousarray(grid.reshape(theta.shape[0], out_height, out_width, 2))


def affine_grid_backward(dgrid):
    """d(loss)/d(theta) (N, 2, 3) from d(loss)/d(grid) (N, H_out, W_out, 2)."""
    n_batch, out_height, out_width, _ = dgrid.shape
    base = base_grid(out_height, out_width, dgrid.dtype)
    return np.matmul(dgrid.reshape(n_batch, -1, 2).transpose(0, 2, 1), base)


def grid_sample(x, grid):
    """Bilinear sample of ``x`` (N, C, H, W) at ``grid`` (N, H_out, W_out, 2), zero padding."""
    x = np.ascontiguousarray(x)
    grid = np.ascontiguousarray(grid, dtype=x.dtype)
    y = np.empty((x.shape[0], x.shape[1], grid.shape[1], grid.shape[2]), dtype=x.dtype)
    bilinear_sample_cpu(x, grid, y)
    return y


def grid_sample_backward(x, grid, dy):
    """(dx, dgrid) of :func:`grid_sample` for output gradient ``dy``."""
    x = np.ascontiguousarray(x)
    grid = np.ascontiguousarray(grid, dtype=x.dtype)
    dy = np.ascontiguousarray(dy, dtype=x.dtype)
    dx = np.zeros_like(x)
    bilinear_sample_input_grad_cpu(dy, grid, dx)
    dgrid = np.empty_like(grid)
    bilinear_sample_grid_grad_cpu(x, dy, grid, dgrid)
    return dx, dgrid


IDENTITY_THETA = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


# -- the layer ------------------------------------------------------------------
class SpatialTransformer(Layer):
    """Localization net -> affine grid -> bilinear sampler (see the module docstring).

    ``localization``: any layer mapping the input batch to (N, 6) affine
    parameters (see :func:`default_localization`).  ``output_size``: (H_out, W_out)
    of the resampled image, the input's size by default.  A container: its one
    child is the localization net, so its parameters are named ``"0.<name>"`` and
    move, seed and save with the transformer.  The last ``theta`` (N, 2, 3) is kept
    in ``self.theta`` for inspection.
    """

    def __init__(self, localization, output_size=None, dtype=None):
        super().__init__(dtype if dtype is not None else localization.dtype)
        self.localization = localization
        if output_size is not None:
            if np.isscalar(output_size):
                output_size = (output_size, output_size)
            output_size = tuple(int(v) for v in output_size)
            if len(output_size) != 2 or min(output_size) < 1:
                raise ConfigError(f"SpatialTransformer output_size must be (height, width), got {output_size}")
        self.output_size = output_size
        self.theta = None

    def children(self):
        return [self.localization]

    def _out_size(self, height, width):
        return self.output_size if self.output_size is not None else (height, width)

    def forward_cpu(self, x, training):
        if x.ndim != 4:
            raise ConfigError(f"SpatialTransformer expects (N, C, H, W) input, got shape {x.shape}")
        n_batch, _, height, width = x.shape
        params = np.asarray(self.backend.to_host(self.localization.forward(x, training)), dtype=self.dtype)
        if params.shape != (n_batch, 6):
            raise ConfigError(f"the localization net must output (N, 6) affine parameters, got {params.shape}")
        self.theta = params.reshape(n_batch, 2, 3)
        grid = affine_grid(self.theta, *self._out_size(height, width))
        self._saved = (x, grid)
        return grid_sample(x, grid)

    def backward_cpu(self, dy):
        x, grid = self._saved
        dx, dgrid = grid_sample_backward(x, grid, dy)
        dtheta = affine_grid_backward(dgrid).reshape(x.shape[0], 6)
        dx += self.localization.backward(np.ascontiguousarray(dtheta, dtype=self.dtype))
        return dx

    def output_shape(self, input_shape):
        channels, height, width = input_shape
        return (channels, *self._out_size(height, width))

    def flops(self, input_shape):
        channels, height, width = input_shape
        out_height, out_width = self._out_size(height, width)
        # 4 taps x (multiply + add) per channel, plus 2 x 3 multiply-adds per grid point
        return self.localization.flops(tuple(input_shape)) + out_height * out_width * (8 * channels + 12)

    def extra_repr(self):
        return f"{self.localization!r}, output_size={self.output_size}"


def default_localization(input_shape, channels=(8, 10), hidden=32, dtype=np.float32):
    """A small localization net for ``input_shape`` (C, H, W), starting at the identity.

    conv 5x5 (pad 2) -> max-pool 2 -> ReLU -> conv 5x5 (pad 2) -> max-pool 2 -> ReLU
    -> flatten -> dense ``hidden`` -> ReLU -> dense 6 (after the PyTorch STN tutorial,
    with "same" convolutions so any input of at least 4x4 works).  The last dense
    layer starts with zero weight and bias ``[1, 0, 0, 0, 1, 0]``, so an untrained
    transformer passes its input through unchanged (Jaderberg et al.); both have
    the parameter role ``"other"``, so :func:`rabbitkit.initializers.initialize`
    and weight decay keep that start.
    """
    in_channels, height, width = (int(v) for v in input_shape)
    if min(height, width) < 4:
        raise ConfigError(f"the default localization net needs inputs of at least 4x4, got {height}x{width}")
    c1, c2 = (int(c) for c in channels)
    features = Sequential(
        [
            Conv2D(in_channels, c1, 5, padding=2, dtype=dtype), MaxPool2D(2, dtype=dtype), ReLU(dtype=dtype),
            Conv2D(c1, c2, 5, padding=2, dtype=dtype), MaxPool2D(2, dtype=dtype), ReLU(dtype=dtype),
            Flatten(dtype=dtype),
        ],
        dtype=dtype,
    )
    flat = math.prod(features.output_shape((in_channels, height, width)))
    regressor = Dense(hidden, 6, dtype=dtype)
    regressor.params["weight"][...] = 0.0
    regressor.params["bias"][...] = IDENTITY_THETA
    # Role "other": a run's initializer (which redraws every "weight" and resets
    # every "bias") and weight decay leave this start alone.
    regressor.param_roles["weight"] = regressor.param_roles["bias"] = "other"
    return Sequential([*features.layers, Dense(flat, hidden, dtype=dtype), ReLU(dtype=dtype), regressor], dtype=dtype)


@hookimpl
def rabbit_layers():
    return {"SpatialTransformer": SpatialTransformer}
