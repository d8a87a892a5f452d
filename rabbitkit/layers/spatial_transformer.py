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
from ..backend.cuda import REDUCE_THREADS, block_reduce_sum, cuda_device, cuda_kernel
from ..errors import ConfigError
from ..hookspecs import hookimpl
from .activations import ReLU
from .base import Layer
from .conv2d import Conv2D
from .dense import Dense
from .flatten import Flatten
from .pooling import MaxPool2D
from .sequential import Sequential

cuda = None  # numba.cuda, bound on the first CUDA launch


# -- CPU kernels ----------------------------------------------------------------
def snap_tolerance(dtype):
    """Pixel distance below which a source coordinate counts as a pixel centre
    (see :func:`source_position`): a few float32 roundings of an image 100 pixels
    wide; float64's is far below any finite-difference step."""
    return 1e-5 if np.dtype(dtype) == np.float32 else 1e-12


@kernel(parallel=False)
def source_position(gx, gy, height, width, snap):
    """Top-left neighbour (x0, y0) and blend fractions (fx, fy) of a normalised point.

    A source coordinate at a pixel centre is where the sampler's derivative jumps,
    and the identity transform (the transformer's start) puts every point exactly
    there, give or take a rounding of the grid.  Coordinates within ``snap`` of a
    centre are therefore put on it, so that both devices (and both roundings) take
    the same neighbours and the same one-sided derivative; the sample changes by
    at most ``snap`` times a pixel difference.  float64 arithmetic on every device.
    """
    ix = ((float(gx) + 1.0) * width - 1.0) * 0.5
    iy = ((float(gy) + 1.0) * height - 1.0) * 0.5
    # (inline, not a helper: the CUDA build of this function must call no CPU function)
    nearest = math.floor(ix + 0.5)
    if abs(ix - nearest) <= snap:
        ix = float(nearest)
    nearest = math.floor(iy + 0.5)
    if abs(iy - nearest) <= snap:
        iy = float(nearest)
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
def bilinear_sample_cpu(x, grid, y, snap):
    """y[n, c, i, j] = bilinear read of x[n, c] at grid[n, i, j] = (x_s, y_s)."""
    n_batch, channels, height, width = x.shape
    out_height, out_width = y.shape[2], y.shape[3]
    for nc in prange(n_batch * channels):
        n = nc // channels
        c = nc - n * channels
        for i in range(out_height):
            for j in range(out_width):
                x0, y0, fx, fy = source_position(grid[n, i, j, 0], grid[n, i, j, 1], height, width, snap)
                top = (1.0 - fx) * pixel_or_zero(x, n, c, y0, x0) + fx * pixel_or_zero(x, n, c, y0, x0 + 1)
                bottom = (1.0 - fx) * pixel_or_zero(x, n, c, y0 + 1, x0) + fx * pixel_or_zero(x, n, c, y0 + 1, x0 + 1)
                y[n, c, i, j] = (1.0 - fy) * top + fy * bottom


@kernel
def bilinear_sample_input_grad_cpu(dy, grid, dx, snap):
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
                x0, y0, fx, fy = source_position(grid[n, i, j, 0], grid[n, i, j, 1], height, width, snap)
                g = dy[n, c, i, j]
                add_if_inside(dx, n, c, y0, x0, (1.0 - fy) * (1.0 - fx) * g)
                add_if_inside(dx, n, c, y0, x0 + 1, (1.0 - fy) * fx * g)
                add_if_inside(dx, n, c, y0 + 1, x0, fy * (1.0 - fx) * g)
                add_if_inside(dx, n, c, y0 + 1, x0 + 1, fy * fx * g)


@kernel
def bilinear_sample_grid_grad_cpu(x, dy, grid, dgrid, snap):
    """dgrid[n, i, j] = d(loss)/d(x_s, y_s), summed over channels (one row per thread)."""
    n_batch, channels, height, width = x.shape
    out_height, out_width = dy.shape[2], dy.shape[3]
    for ni in prange(n_batch * out_height):
        n = ni // out_height
        i = ni - n * out_height
        for j in range(out_width):
            x0, y0, fx, fy = source_position(grid[n, i, j, 0], grid[n, i, j, 1], height, width, snap)
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


# -- CUDA kernels -----------------------------------------------------------------
# The per-point helpers above, compiled for the device: both devices find the
# neighbours and blend weights with the same code.
source_position_cuda = cuda_device(source_position.py_func)
pixel_or_zero_cuda = cuda_device(pixel_or_zero.py_func)
add_if_inside_cuda = cuda_device(add_if_inside.py_func)


@cuda_device
def target_coordinate(index, size):
    """Normalised centre of output pixel ``index`` of ``size`` (align_corners=False), as base_grid."""
    return (2.0 * index + 1.0) / size - 1.0


@cuda_kernel
def affine_grid_cuda(theta, grid):
    """grid[n, i, j] = theta[n] (as 2 x 3, row-major in a row of 6) @ (x_t, y_t, 1)."""
    out_height = grid.shape[1]
    out_width = grid.shape[2]
    for e in range(cuda.grid(1), grid.shape[0] * out_height * out_width, cuda.gridsize(1)):
        n = e // (out_height * out_width)
        rest = e - n * out_height * out_width
        i = rest // out_width
        j = rest - i * out_width
        xt = target_coordinate(j, out_width)
        yt = target_coordinate(i, out_height)
        grid[n, i, j, 0] = theta[n, 0] * xt + theta[n, 1] * yt + theta[n, 2]
        grid[n, i, j, 1] = theta[n, 3] * xt + theta[n, 4] * yt + theta[n, 5]


@cuda_kernel
def affine_grid_backward_cuda(dgrid, dtheta):
    """Block n: dtheta[n, 3r + k] = sum over output pixels of dgrid[n, ., ., r] * (x_t, y_t, 1)[k],
    six fixed-order tree sums (deterministic)."""
    partial = cuda.shared.array(shape=REDUCE_THREADS, dtype=np.float64)
    n = cuda.blockIdx.x
    out_height = dgrid.shape[1]
    out_width = dgrid.shape[2]
    for slot in range(6):
        r = slot // 3
        k = slot - r * 3
        acc = np.float64(0.0)
        for e in range(cuda.threadIdx.x, out_height * out_width, cuda.blockDim.x):
            i = e // out_width
            j = e - i * out_width
            if k == 0:
                basis = target_coordinate(j, out_width)
            elif k == 1:
                basis = target_coordinate(i, out_height)
            else:
                basis = 1.0
            acc += dgrid[n, i, j, r] * basis
        total = block_reduce_sum(partial, acc)
        if cuda.threadIdx.x == 0:
            dtheta[n, slot] = total


@cuda_kernel
def bilinear_sample_cuda(x, grid, y, snap):
    """y[n, c, i, j] = bilinear read of x[n, c] at grid[n, i, j] (one thread per output)."""
    channels, height, width = x.shape[1], x.shape[2], x.shape[3]
    out_height, out_width = y.shape[2], y.shape[3]
    for e in range(cuda.grid(1), y.size, cuda.gridsize(1)):
        j = e % out_width
        i = (e // out_width) % out_height
        c = (e // (out_width * out_height)) % channels
        n = e // (out_width * out_height * channels)
        x0, y0, fx, fy = source_position_cuda(grid[n, i, j, 0], grid[n, i, j, 1], height, width, snap)
        top = (1.0 - fx) * pixel_or_zero_cuda(x, n, c, y0, x0) + fx * pixel_or_zero_cuda(x, n, c, y0, x0 + 1)
        bottom = (1.0 - fx) * pixel_or_zero_cuda(x, n, c, y0 + 1, x0) + fx * pixel_or_zero_cuda(x, n, c, y0 + 1, x0 + 1)
        y[n, c, i, j] = (1.0 - fy) * top + fy * bottom


@cuda_kernel
def bilinear_sample_input_grad_cuda(dy, grid, dx, snap):
    """dx += the sampler's scatter of dy (dx zeroed by the caller), by ownership: one
    thread per (n, c) plane walks the plane's outputs in the CPU's order and adds
    into its own plane only.  No atomics, the CPU's order of additions: the same
    bits on every run.  The price is parallelism N*C (the transformer sits on small
    images in front of a net, where that is a few hundred to thousands of threads)."""
    n_batch, channels, height, width = dx.shape
    out_height, out_width = dy.shape[2], dy.shape[3]
    for nc in range(cuda.grid(1), n_batch * channels, cuda.gridsize(1)):
        n = nc // channels
        c = nc - n * channels
        for i in range(out_height):
            for j in range(out_width):
                x0, y0, fx, fy = source_position_cuda(grid[n, i, j, 0], grid[n, i, j, 1], height, width, snap)
                g = dy[n, c, i, j]
                add_if_inside_cuda(dx, n, c, y0, x0, (1.0 - fy) * (1.0 - fx) * g)
                add_if_inside_cuda(dx, n, c, y0, x0 + 1, (1.0 - fy) * fx * g)
                add_if_inside_cuda(dx, n, c, y0 + 1, x0, fy * (1.0 - fx) * g)
                add_if_inside_cuda(dx, n, c, y0 + 1, x0 + 1, fy * fx * g)


@cuda_kernel
def bilinear_sample_grid_grad_cuda(x, dy, grid, dgrid, snap):
    """dgrid[n, i, j] = d(loss)/d(x_s, y_s), summed over channels (one thread per point)."""
    n_batch, channels, height, width = x.shape
    out_height, out_width = dy.shape[2], dy.shape[3]
    for e in range(cuda.grid(1), n_batch * out_height * out_width, cuda.gridsize(1)):
        n = e // (out_height * out_width)
        rest = e - n * out_height * out_width
        i = rest // out_width
        j = rest - i * out_width
        x0, y0, fx, fy = source_position_cuda(grid[n, i, j, 0], grid[n, i, j, 1], height, width, snap)
        dix = 0.0
        diy = 0.0
        for c in range(channels):
            v00 = pixel_or_zero_cuda(x, n, c, y0, x0)
            v01 = pixel_or_zero_cuda(x, n, c, y0, x0 + 1)
            v10 = pixel_or_zero_cuda(x, n, c, y0 + 1, x0)
            v11 = pixel_or_zero_cuda(x, n, c, y0 + 1, x0 + 1)
            g = dy[n, c, i, j]
            dix += g * ((1.0 - fy) * (v01 - v00) + fy * (v11 - v10))
            diy += g * ((1.0 - fx) * (v10 - v00) + fx * (v11 - v01))
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
    bilinear_sample_cpu(x, grid, y, snap_tolerance(x.dtype))
    return y


def grid_sample_backward(x, grid, dy):
    """(dx, dgrid) of :func:`grid_sample` for output gradient ``dy``."""
    x = np.ascontiguousarray(x)
    grid = np.ascontiguousarray(grid, dtype=x.dtype)
    dy = np.ascontiguousarray(dy, dtype=x.dtype)
    dx = np.zeros_like(x)
    bilinear_sample_input_grad_cpu(dy, grid, dx, snap_tolerance(x.dtype))
    dgrid = np.empty_like(grid)
    bilinear_sample_grid_grad_cpu(x, dy, grid, dgrid, snap_tolerance(x.dtype))
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

    def forward_cuda(self, x, training):
        if x.ndim != 4:
            raise ConfigError(f"SpatialTransformer expects (N, C, H, W) input, got shape {x.shape}")
        n_batch, channels, height, width = x.shape
        params = self.backend.asarray(self.localization.forward(x, training), self.dtype)
        if tuple(params.shape) != (n_batch, 6):
            raise ConfigError(f"the localization net must output (N, 6) affine parameters, got {tuple(params.shape)}")
        self.theta = params.reshape(n_batch, 2, 3)  # on the device: to_host() it to inspect
        out_height, out_width = self._out_size(height, width)
        grid = self.backend.empty((n_batch, out_height, out_width, 2), self.dtype)
        affine_grid_cuda.launch(n_batch * out_height * out_width, params, grid)
        y = self.backend.empty((n_batch, channels, out_height, out_width), self.dtype)
        bilinear_sample_cuda.launch(y.size, x, grid, y, snap_tolerance(self.dtype))
        self._saved = (x, grid)
        return y

    def backward_cuda(self, dy):
        x, grid = self._saved
        dx = self.backend.zeros(x.shape, self.dtype)
        bilinear_sample_input_grad_cuda.launch(x.shape[0] * x.shape[1], dy, grid, dx, snap_tolerance(self.dtype))
        dgrid = self.backend.empty(grid.shape, self.dtype)
        bilinear_sample_grid_grad_cuda.launch(grid.shape[0] * grid.shape[1] * grid.shape[2], x, dy, grid, dgrid,
                                              snap_tolerance(self.dtype))
        dtheta = self.backend.empty((x.shape[0], 6), self.dtype)
        affine_grid_backward_cuda.launch_blocks(x.shape[0], dgrid, dtheta)
        self.backend.add_into(dx, self.backend.asarray(self.localization.backward(dtheta), self.dtype))
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
