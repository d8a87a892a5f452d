"""Pooling on NCHW images: max, average and global average.

Windows follow PyTorch's defaults (floor mode): output size per axis is
``(size + 2*padding - kernel) // stride + 1``.  Every kernel is parallel over
(sample, channel) planes, so the overlapping windows of one plane are handled
by one thread and the backward scatter has no races.
"""
import math

import numpy as np
from numba import prange

from ..backend.cpu import kernel
from ..errors import ConfigError
from ..hookspecs import hookimpl
from .base import Layer
from .conv2d import conv_output_size, pair, valid_output_range


# -- CPU kernels ----------------------------------------------------------------
@kernel(parallel=False)
def later_wins(value, best):
    """Whether a value later in scan order replaces the running maximum.

    Strictly greater only, so ties keep the first maximum; a NaN replaces a
    number (NaN propagates, as in PyTorch).  Written as a select, not a branch:
    on real data the comparison is a coin flip the branch predictor loses.
    """
    return (value > best) | ((value != value) & (best == best))


@kernel
def max_pool_forward(x, y, argmax, kh, kw, sh, sw, ph, pw):
    """y = window maxima of x (planes, H, W); argmax = flat H*W index of the first maximum.

    Padding acts as -inf: positions outside the plane are never candidates.
    Windows are scanned row-major; for each window offset (i, j) one pass runs
    along the output row, so the inner loop is long and branch-free.
    """
    planes, h, w = x.shape
    ho, wo = y.shape[1], y.shape[2]
    for plane in prange(planes):
        for oh in range(ho):
            best = y[plane, oh]
            where = argmax[plane, oh]
            for ow in range(wo):
                where[ow] = -1  # no candidate yet: the first one always wins
                best[ow] = 0.0
            h0 = oh * sh - ph
            for i in range(max(0, h0), min(h, h0 + kh)):
                row = x[plane, i]
                for j in range(kw):
                    lo, hi = valid_output_range(wo, w, sw, pw, j)
                    start = lo * sw - pw + j
                    best_run = best[lo:hi]
                    where_run = where[lo:hi]
                    for k in range(hi - lo):
                        value = row[start + k * sw]
                        current = best_run[k]
                        previous = where_run[k]
                        take = (previous < 0) | later_wins(value, current)
                        best_run[k] = value if take else current
                        where_run[k] = i * w + start + k * sw if take else previous


@kernel
def max_pool_2x2_forward(x, y, argmax):
    """max_pool_forward for the common 2x2 window, stride 2, no padding.

    With the window fixed, the four loads per output have constant offsets and
    the loop vectorises (about 20x faster than the general kernel).
    """
    planes, h, w = x.shape
    ho, wo = y.shape[1], y.shape[2]
    for plane in prange(planes):
        for oh in range(ho):
            top = x[plane, 2 * oh]
            bottom = x[plane, 2 * oh + 1]
            best_row = y[plane, oh]
            where_row = argmax[plane, oh]
            base = 2 * oh * w
            for ow in range(wo):
                best = top[2 * ow]
                where = base + 2 * ow
                value = top[2 * ow + 1]
                take = later_wins(value, best)
                best = value if take else best
                where = base + 2 * ow + 1 if take else where
                value = bottom[2 * ow]
                take = later_wins(value, best)
                best = value if take else best
                where = base + w + 2 * ow if take else where
                value = bottom[2 * ow + 1]
                take = later_wins(value, best)
                best = value if take else best
                where = base + w + 2 * ow + 1 if take else where
                best_row[ow] = best
                where_row[ow] = where


@kernel
def max_pool_backward(dy, argmax, dx):
    """dx (planes, H*W) = dy routed to each window's arg-max (adds where windows overlap)."""
    planes = dy.shape[0]
    for plane in prange(planes):
        dx[plane, :] = 0.0
        for k in range(dy.shape[1]):
            dx[plane, argmax[plane, k]] += dy[plane, k]


@kernel
def avg_pool_forward(x, y, kh, kw, sh, sw, ph, pw):
    """y = window sums / (kh*kw): zero padding counts in the divisor (count_include_pad)."""
    planes, h, w = x.shape
    ho, wo = y.shape[1], y.shape[2]
    scale = 1.0 / (kh * kw)
    for plane in prange(planes):
        for oh in range(ho):
            h0 = oh * sh - ph
            for ow in range(wo):
                w0 = ow * sw - pw
                total = 0.0
                for i in range(max(0, h0), min(h, h0 + kh)):
                    for j in range(max(0, w0), min(w, w0 + kw)):
                        total += x[plane, i, j]
                y[plane, oh, ow] = total * scale


@kernel
def avg_pool_backward(dy, dx, kh, kw, sh, sw, ph, pw):
    """dx = each output's gradient / (kh*kw) spread over its window."""
    planes, h, w = dx.shape
    ho, wo = dy.shape[1], dy.shape[2]
    scale = 1.0 / (kh * kw)
    for plane in prange(planes):
        dx[plane, :, :] = 0.0
        for oh in range(ho):
            h0 = oh * sh - ph
            for ow in range(wo):
                w0 = ow * sw - pw
                share = dy[plane, oh, ow] * scale
                for i in range(max(0, h0), min(h, h0 + kh)):
                    for j in range(max(0, w0), min(w, w0 + kw)):
                        dx[plane, i, j] += share


@kernel
def plane_means(x, y):
    """y[plane] = mean of x[plane, :] (x is (planes, H*W))."""
    planes, size = x.shape
    for plane in prange(planes):
        total = 0.0
        for k in range(size):
            total += x[plane, k]
        y[plane] = total / size


@kernel
def spread_plane_means(dy, dx):
    """dx[plane, :] = dy[plane] / (H*W): the gradient of plane_means."""
    planes, size = dx.shape
    for plane in prange(planes):
        share = dy[plane] / size
        for k in range(size):
            dx[plane, k] = share


# -- layers ---------------------------------------------------------------------
class Pool2D(Layer):
    """Shared window geometry and checks of MaxPool2D and AvgPool2D."""

    def __init__(self, kernel_size, stride=None, padding=0, dtype=np.float32):
        super().__init__(dtype)
        self.kernel_size = pair(kernel_size, "kernel_size")
        self.stride = self.kernel_size if stride is None else pair(stride, "stride")
        self.padding = pair(padding, "padding")
        name = type(self).__name__
        if min(self.kernel_size) < 1 or min(self.stride) < 1 or min(self.padding) < 0:
            raise ConfigError(
                f"{name} needs kernel_size >= 1, stride >= 1, padding >= 0; got "
                f"{self.kernel_size}, {self.stride}, {self.padding}"
            )
        if any(p > k // 2 for p, k in zip(self.padding, self.kernel_size)):
            # Otherwise a window could lie entirely in the padding.
            raise ConfigError(f"{name} padding {self.padding} must be at most half the kernel size {self.kernel_size}")

    def output_shape(self, input_shape):
        if len(input_shape) != 3:
            raise ConfigError(f"{type(self).__name__} expects a (C, H, W) input shape, got {tuple(input_shape)}")
        channels, height, width = input_shape
        ho = conv_output_size(height, self.kernel_size[0], self.stride[0], self.padding[0])
        wo = conv_output_size(width, self.kernel_size[1], self.stride[1], self.padding[1])
        if ho < 1 or wo < 1:
            raise ConfigError(f"{type(self).__name__} window {self.kernel_size} does not fit a {height}x{width} input")
        return (channels, ho, wo)

    def _planes(self, x):
        """x as (N*C, H, W) and the output shape (N, C, Ho, Wo)."""
        if x.ndim != 4:
            raise ConfigError(f"{type(self).__name__} expects (N, C, H, W) input, got shape {tuple(x.shape)}")
        n, c, h, w = x.shape
        _, ho, wo = self.output_shape((c, h, w))
        return x.reshape(n * c, h, w), (n, c, ho, wo)

    def _window(self):
        return (*self.kernel_size, *self.stride, *self.padding)

    def flops(self, input_shape):
        channels, ho, wo = self.output_shape(input_shape)
        return channels * ho * wo * math.prod(self.kernel_size)

    def extra_repr(self):
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


class MaxPool2D(Pool2D):
    """Max over each window; the gradient goes to the first maximum in row-major scan order."""

    def forward_cpu(self, x, training):
        planes, out_shape = self._planes(x)
        y = np.empty(out_shape, dtype=self.dtype)
        self._argmax = np.empty(out_shape, dtype=np.int32)
        flat = (planes.shape[0], out_shape[2], out_shape[3])
        if self._window() == (2, 2, 2, 2, 0, 0):
            max_pool_2x2_forward(planes, y.reshape(flat), self._argmax.reshape(flat))
        else:
            max_pool_forward(planes, y.reshape(flat), self._argmax.reshape(flat), *self._window())
        self._x_shape = x.shape
        return y

    def backward_cpu(self, dy):
        n, c, h, w = self._x_shape
        dx = np.empty(self._x_shape, dtype=self.dtype)
        max_pool_backward(dy.reshape(n * c, -1), self._argmax.reshape(n * c, -1), dx.reshape(n * c, h * w))
        return dx


class AvgPool2D(Pool2D):
    """Mean over each window; padding counts as zeros in the mean (PyTorch's count_include_pad)."""

    def forward_cpu(self, x, training):
        planes, out_shape = self._planes(x)
        y = np.empty(out_shape, dtype=self.dtype)
        avg_pool_forward(planes, y.reshape(planes.shape[0], out_shape[2], out_shape[3]), *self._window())
        self._x_shape = x.shape
        return y

    def backward_cpu(self, dy):
        n, c, h, w = self._x_shape
        dx = np.empty(self._x_shape, dtype=self.dtype)
        avg_pool_backward(dy.reshape(n * c, dy.shape[2], dy.shape[3]), dx.reshape(n * c, h, w), *self._window())
        return dx


class GlobalAvgPool2D(Layer):
    """(N, C, H, W) -> (N, C): the mean of each channel plane."""

    def forward_cpu(self, x, training):
        if x.ndim != 4:
            raise ConfigError(f"GlobalAvgPool2D expects (N, C, H, W) input, got shape {tuple(x.shape)}")
        n, c, h, w = x.shape
        y = np.empty((n, c), dtype=self.dtype)
        plane_means(x.reshape(n * c, h * w), y.reshape(n * c))
        self._x_shape = x.shape
        return y

    def backward_cpu(self, dy):
        n, c, h, w = self._x_shape
        dx = np.empty(self._x_shape, dtype=self.dtype)
        spread_plane_means(dy.reshape(n * c), dx.reshape(n * c, h * w))
        return dx

    def output_shape(self, input_shape):
        if len(input_shape) != 3:
            raise ConfigError(f"GlobalAvgPool2D expects a (C, H, W) input shape, got {tuple(input_shape)}")
        return (input_shape[0],)

    def flops(self, input_shape):
        return math.prod(input_shape)


@hookimpl
def rabbit_layers():
    return {"MaxPool2D": MaxPool2D, "AvgPool2D": AvgPool2D, "GlobalAvgPool2D": GlobalAvgPool2D}
