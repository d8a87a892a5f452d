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
from ..errors import ConfigError
from ..hookspecs import hookimpl
from .base import Layer
from .conv2d import pair


@kernel
def adaptive_avg_forward(x, y):
    planes, h, w = x.shape
    ho, wo = y.shape[1], y.shape[2]
    for plane in prange(planes):
        for i in range(ho):
            r0, r1 = (i * h) // ho, -((-(i + 1) * h) // ho)
            for j in range(wo):
                c0, c1 = (j * w) // wo, -((-(j + 1) * w) // wo)
                total = 0.0
                for r in range(r0, r1):
                    for c in range(c0, c1):
                        total += x[plane, r, c]
                y[plane, i, j] = total / ((r1 - r0) * (c1 - c0))


@kernel
def adaptive_avg_backward(dy, dx):
    planes, h, w = dx.shape
    ho, wo = dy.shape[1], dy.shape[2]
    for plane in prange(planes):
        dx[plane, :, :] = 0.0
        for i in range(ho):
            r0, r1 = (i * h) // ho, -((-(i + 1) * h) // ho)
            for j in range(wo):
                c0, c1 = (j * w) // wo, -((-(j + 1) * w) // wo)
                share = dy[plane, i, j] / ((r1 - r0) * (c1 - c0))
                for r in range(r0, r1):
                    for c in range(c0, c1):
                        dx[plane, r, c] += share


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

    def forward_cpu(self, x, training):
        if x.ndim != 4:
            raise ConfigError(f"AdaptiveAvgPool2D expects (N, C, H, W) input, got shape {tuple(x.shape)}")
        self._x_shape = x.shape
        n, c, h, w = x.shape
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

    def extra_repr(self):
        return f"output_size={self.output_size}"


@hookimpl
def rabbit_layers():
    return {"AdaptiveAvgPool2D": AdaptiveAvgPool2D}
