"""AdaptiveAvgPool2D: average pooling to a fixed output size, as PyTorch's ``AdaptiveAvgPool2d``.

Output cell (i, j) of an H x W plane averages rows ``floor(i*H/Ho)`` to
``ceil((i+1)*H/Ho)`` (exclusive) and the same for columns, so every input
pixel is covered and the bins overlap when the size does not divide.  At the
output size itself (VGG's 7x7 at 224 px) the layer is the identity and copies
nothing; smaller inputs are spread over the bins (a 1x1 map becomes 7x7).
"""
import numpy as np
from numba import prange

from ..backend.cpu import kernel
from ..backend.cuda import cuda_kernel, device_pair
from ..errors import ConfigError
from ..hookspecs import hookimpl
from .base import Layer
from .conv2d import pair

cuda = None  # numba.cuda, bound on the first CUDA launch


def _bin(index, size_in, size_out):
    """[start, stop) of input rows (or columns) that output bin ``index`` averages."""
    return (index * size_in) // size_out, -((-(index + 1) * size_in) // size_out)


def _bin_mean(x, plane, i, j, ho, wo):
    """Mean of x[plane] over output cell (i, j)'s bin (the bounds of :func:`_bin`,
    written out: a device function cannot call another pair's CPU build)."""
    h, w = x.shape[1], x.shape[2]
    r0, r1 = (i * h) // ho, -((-(i + 1) * h) // ho)
    c0, c1 = (j * w) // wo, -((-(j + 1) * w) // wo)
    total = x.dtype.type(0.0)  # a literal 0.0 or an integer divisor would widen float32 sums to float64
    for r in range(r0, r1):
        for c in range(c0, c1):
            total += x[plane, r, c]
    return total / x.dtype.type((r1 - r0) * (c1 - c0))


bin_bounds_cpu, bin_bounds_cuda = device_pair(_bin)
bin_mean_cpu, bin_mean_cuda = device_pair(_bin_mean)


@kernel
def adaptive_avg_forward(x, y):
    ho, wo = y.shape[1], y.shape[2]
    for plane in prange(x.shape[0]):
        for i in range(ho):
            for j in range(wo):
                y[plane, i, j] = bin_mean_cpu(x, plane, i, j, ho, wo)


@kernel
def adaptive_avg_backward(dy, dx):
    planes, h, w = dx.shape
    ho, wo = dy.shape[1], dy.shape[2]
    for plane in prange(planes):
        dx[plane, :, :] = 0.0
        for i in range(ho):
            r0, r1 = bin_bounds_cpu(i, h, ho)
            for j in range(wo):
                c0, c1 = bin_bounds_cpu(j, w, wo)
                share = dy[plane, i, j] / dx.dtype.type((r1 - r0) * (c1 - c0))
                for r in range(r0, r1):
                    for c in range(c0, c1):
                        dx[plane, r, c] += share


@cuda_kernel
def adaptive_avg_forward_cuda(x, y):
    """One thread per output cell."""
    ho, wo = y.shape[1], y.shape[2]
    for k in range(cuda.grid(1), y.size, cuda.gridsize(1)):
        plane = k // (ho * wo)
        i = (k // wo) % ho
        j = k % wo
        y[plane, i, j] = bin_mean_cuda(x, plane, i, j, ho, wo)


@cuda_kernel
def adaptive_avg_backward_cuda(dy, dx):
    """One thread per input pixel, gathering the bins that cover it (no atomics)."""
    h, w = dx.shape[1], dx.shape[2]
    ho, wo = dy.shape[1], dy.shape[2]
    for k in range(cuda.grid(1), dx.size, cuda.gridsize(1)):
        plane = k // (h * w)
        r = (k // w) % h
        c = k % w
        acc = dx.dtype.type(0.0)
        for i in range(ho):
            r0, r1 = bin_bounds_cuda(i, h, ho)
            if r0 <= r < r1:
                for j in range(wo):
                    c0, c1 = bin_bounds_cuda(j, w, wo)
                    if c0 <= c < c1:
                        acc += dy[plane, i, j] / dx.dtype.type((r1 - r0) * (c1 - c0))
        dx[plane, r, c] = acc


class AdaptiveAvgPool2D(Layer):
    """(N, C, H, W) -> (N, C, *output_size): the mean over each adaptive bin."""

    def __init__(self, output_size, dtype=np.float32):
        super().__init__(dtype)
        self.output_size = pair(output_size, "output_size")
        if min(self.output_size) < 1:
            raise ConfigError(f"AdaptiveAvgPool2D output_size must be positive, got {self.output_size}")

    def output_shape(self, input_shape):
        if len(input_shape) != 3:
            raise ConfigError(f"AdaptiveAvgPool2D expects a (C, H, W) input shape, got {tuple(input_shape)}")
        return (input_shape[0], *self.output_size)

    def _check(self, x):
        if x.ndim != 4:
            raise ConfigError(f"AdaptiveAvgPool2D expects (N, C, H, W) input, got shape {tuple(x.shape)}")
        self._x_shape = tuple(x.shape)
        return self._x_shape

    def forward_cpu(self, x, training):
        n, c, h, w = self._check(x)
        if (h, w) == self.output_size:
            return x
        y = np.empty((n, c, *self.output_size), dtype=self.dtype)
        adaptive_avg_forward(x.reshape(n * c, h, w), y.reshape(n * c, *self.output_size))
        return y

    def backward_cpu(self, dy):
        n, c, h, w = self._x_shape
        if (h, w) == self.output_size:
            return dy
        dx = np.empty(self._x_shape, dtype=self.dtype)
        adaptive_avg_backward(dy.reshape(n * c, *self.output_size), dx.reshape(n * c, h, w))
        return dx

    def forward_cuda(self, x, training):
        n, c, h, w = self._check(x)
        if (h, w) == self.output_size:
            return x
        y = self.backend.empty((n, c, *self.output_size), self.dtype)
        adaptive_avg_forward_cuda.launch(y.size, x.reshape(n * c, h, w), y.reshape(n * c, *self.output_size))
        return y

    def backward_cuda(self, dy):
        n, c, h, w = self._x_shape
        if (h, w) == self.output_size:
            return dy
        dx = self.backend.empty(self._x_shape, self.dtype)
        adaptive_avg_backward_cuda.launch(dx.size, dy.reshape(n * c, *self.output_size), dx.reshape(n * c, h, w))
        return dx

    def extra_repr(self):
        return f"output_size={self.output_size}"


@hookimpl
def rabbit_layers():
    return {"AdaptiveAvgPool2D": AdaptiveAvgPool2D}
