"""Pooling on NCHW images: max, average and global average.

Windows follow PyTorch: in floor mode (the default) the output size per axis is
``(size + 2*padding - kernel) // stride + 1``; with ``ceil_mode=True`` (Caffe's
shapes) it is ``ceil((size + 2*padding - kernel) / stride) + 1``, less one where the
last window would start past the input and its left padding (PyTorch's rule,
``(out - 1) * stride >= size + padding``), so every window holds input entries.

Windows that run past the edge: max pooling ignores positions outside the input
(padding acts as -inf); average pooling divides by the part of the window inside
the zero-padded input, ``(min(start + kernel, size + padding) - start)`` per axis
with ``start = o * stride - padding``.  That is PyTorch's ``count_include_pad=True``
(its default) and Caffe's AVE pooling, in both modes: in floor mode no window
leaves the padded input, so the divisor is always ``kh * kw``; in ceil mode the
part of a last window beyond the right/bottom padding does not count.

CPU kernels are parallel over (sample, channel) planes, so the overlapping
windows of one plane are handled by one thread and the backward scatter has no
races.  CUDA kernels run one thread per output (forward) and one per input entry
(backward: a gather over the windows that hold it), so no two threads write one
entry and nothing needs atomics; the sums are deterministic.

:func:`swap_max_to_avg` turns every MaxPool2D of a model into an AvgPool2D of the
same geometry (average pooling for style transfer, Gatys et al. 2016).
"""
import math

import numpy as np
from numba import prange

from ..backend.cpu import kernel, kernel_per_constant
from ..backend.cuda import cuda_device, cuda_kernel, device_pair
from ..errors import ConfigError
from ..hookspecs import hookimpl
from .base import Layer
from .conv2d import conv_output_size, pair, valid_output_range

cuda = None  # numba.cuda, bound on the first CUDA launch


def pool_output_size(size, kernel_size, stride, padding, ceil_mode=False):
    """Output length of a pooling window along one axis (PyTorch's floor or ceil mode)."""
    if not ceil_mode:
        return conv_output_size(size, kernel_size, stride, padding)
    out = -(-(size + 2 * padding - kernel_size) // stride) + 1
    if (out - 1) * stride >= size + padding:  # the last window would start in the right padding
        out -= 1
    return out


# -- helpers shared by the CPU and CUDA kernels -----------------------------------
def _later_wins(value, best):
    """Whether a value later in scan order replaces the running maximum.

    Strictly greater only, so ties keep the first maximum; a NaN replaces a
    number (NaN propagates, as in PyTorch).  Written as a select, not a branch:
    on real data the comparison is a coin flip the branch predictor loses.
    """
    return (value > best) | ((value != value) & (best == best))


def _padded_extent(start, kernel_size, size, padding):
    """Length of the window [start, start + kernel) inside the padded input [-padding, size + padding):
    the average's divisor along one axis (``start >= -padding`` always)."""
    return min(start + kernel_size, size + padding) - start


def _covering_outputs(index, kernel_size, stride, padding, size_out):
    """[lo, hi) of the outputs whose window o*stride - padding + [0, kernel) holds input ``index``."""
    first = index + padding - kernel_size + 1
    lo = 0 if first <= 0 else (first + stride - 1) // stride
    hi = min(size_out, (index + padding) // stride + 1)
    return lo, max(lo, hi)


later_wins, later_wins_cuda = device_pair(_later_wins)
padded_extent, padded_extent_cuda = device_pair(_padded_extent)
covering_outputs_cuda = cuda_device(_covering_outputs)  # the CPU backward scatters instead


# -- CPU kernels ----------------------------------------------------------------


def _max_pool_forward(column_stride):
    """The max-pool forward kernel for one column stride (0: any, read at run time).

    y = window maxima of x (planes, H, W); argmax = flat H*W index of the first maximum.
    Padding acts as -inf: positions outside the plane are never candidates.
    Windows are scanned row-major; for each window offset (i, j) one pass runs
    along the output row, so the inner loop is long and branch-free.  Each pass
    reads a view that starts at its first entry, so its indices k * stride are
    provably >= 0, and with the stride a compile-time constant the loads are
    affine and the pass vectorises (2-3.5x faster at GoogLeNet's 3x3 windows, on
    AMD EPYC, where a loop with a run-time stride is compiled to gathers).
    """
    def max_pool_forward(x, y, argmax, kh, kw, sh, sw, ph, pw):
        planes, h, w = x.shape
        ho, wo = y.shape[1], y.shape[2]
        stride = column_stride if column_stride else sw
        for plane in prange(planes):
            for oh in range(ho):
                best = y[plane, oh]
                where = argmax[plane, oh]
                for ow in range(wo):
                    where[ow] = -1  # no candidate yet: the first one always wins
                    best[ow] = 0.0
                h0 = oh * sh - ph
                for i in range(max(0, h0), min(h, h0 + kh)):
                    for j in range(kw):
                        lo, hi = valid_output_range(wo, w, stride, pw, j)
                        start = lo * stride - pw + j
                        row = x[plane, i, start:]
                        best_run = best[lo:hi]
                        where_run = where[lo:hi]
                        first = i * w + start
                        for k in range(hi - lo):
                            value = row[k * stride]
                            current = best_run[k]
                            previous = where_run[k]
                            take = (previous < 0) | later_wins(value, current)
                            best_run[k] = value if take else current
                            where_run[k] = first + k * stride if take else previous

    return max_pool_forward


# column strides 1 and 2 (nearly every net's) compiled as constants; 0 for the rest
MAX_POOL_FORWARD = kernel_per_constant(_max_pool_forward, (0, 1, 2))


def max_pool_forward(x, y, argmax, kh, kw, sh, sw, ph, pw):
    """Window maxima and first arg-max indices of x (planes, H, W) into y and argmax
    (see :func:`_max_pool_forward`), with the kernel compiled for the column stride."""
    MAX_POOL_FORWARD.get(sw, MAX_POOL_FORWARD[0])(x, y, argmax, kh, kw, sh, sw, ph, pw)


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
    """y = window sums / the window's extent inside the padded input (count_include_pad;
    kh*kw except for ceil-mode windows past the right/bottom padding)."""
    planes, h, w = x.shape
    ho, wo = y.shape[1], y.shape[2]
    for plane in prange(planes):
        for oh in range(ho):
            h0 = oh * sh - ph
            rows = padded_extent(h0, kh, h, ph)
            for ow in range(wo):
                w0 = ow * sw - pw
                scale = 1.0 / (rows * padded_extent(w0, kw, w, pw))
                total = 0.0
                for i in range(max(0, h0), min(h, h0 + kh)):
                    for j in range(max(0, w0), min(w, w0 + kw)):
                        total += x[plane, i, j]
                y[plane, oh, ow] = total * scale


@kernel
def avg_pool_backward(dy, dx, kh, kw, sh, sw, ph, pw):
    """dx = each output's gradient / its divisor (as in avg_pool_forward) spread over its window."""
    planes, h, w = dx.shape
    ho, wo = dy.shape[1], dy.shape[2]
    for plane in prange(planes):
        dx[plane, :, :] = 0.0
        for oh in range(ho):
            h0 = oh * sh - ph
            rows = padded_extent(h0, kh, h, ph)
            for ow in range(wo):
                w0 = ow * sw - pw
                share = dy[plane, oh, ow] * (1.0 / (rows * padded_extent(w0, kw, w, pw)))
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


# -- CUDA kernels ---------------------------------------------------------------
# Arrays as the CPU kernels take them: x (planes, H, W), y and argmax (planes, Ho, Wo).
@cuda_kernel
def max_pool_forward_cuda(x, y, argmax, kh, kw, sh, sw, ph, pw):
    """One thread per output: the window's first maximum in row-major scan order."""
    h, w = x.shape[1], x.shape[2]
    ho, wo = y.shape[1], y.shape[2]
    for k in range(cuda.grid(1), y.size, cuda.gridsize(1)):
        plane = k // (ho * wo)
        oh = (k // wo) % ho
        ow = k % wo
        h0 = oh * sh - ph
        w0 = ow * sw - pw
        i0 = max(0, h0)
        j0 = max(0, w0)
        best = x[plane, i0, j0]  # every window holds an input entry (padding <= kernel/2)
        where = i0 * w + j0
        for i in range(i0, min(h, h0 + kh)):
            for j in range(j0, min(w, w0 + kw)):
                value = x[plane, i, j]
                if later_wins_cuda(value, best):
                    best = value
                    where = i * w + j
        y[plane, oh, ow] = best
        argmax[plane, oh, ow] = where


@cuda_kernel
def max_pool_backward_cuda(dy, argmax, dx, kh, kw, sh, sw, ph, pw):
    """One thread per input entry: the sum of dy over the windows whose arg-max it is
    (a gather in output order, so no atomics and a deterministic sum)."""
    h, w = dx.shape[1], dx.shape[2]
    ho, wo = dy.shape[1], dy.shape[2]
    for k in range(cuda.grid(1), dx.size, cuda.gridsize(1)):
        plane = k // (h * w)
        i = (k // w) % h
        j = k % w
        oh_lo, oh_hi = covering_outputs_cuda(i, kh, sh, ph, ho)
        ow_lo, ow_hi = covering_outputs_cuda(j, kw, sw, pw, wo)
        target = i * w + j
        acc = 0.0
        for oh in range(oh_lo, oh_hi):
            for ow in range(ow_lo, ow_hi):
                if argmax[plane, oh, ow] == target:
                    acc += dy[plane, oh, ow]
        dx[plane, i, j] = acc


@cuda_kernel
def avg_pool_forward_cuda(x, y, kh, kw, sh, sw, ph, pw):
    """One thread per output: the window sum over the divisor of avg_pool_forward."""
    h, w = x.shape[1], x.shape[2]
    ho, wo = y.shape[1], y.shape[2]
    for k in range(cuda.grid(1), y.size, cuda.gridsize(1)):
        plane = k // (ho * wo)
        oh = (k // wo) % ho
        ow = k % wo
        h0 = oh * sh - ph
        w0 = ow * sw - pw
        total = 0.0
        for i in range(max(0, h0), min(h, h0 + kh)):
            for j in range(max(0, w0), min(w, w0 + kw)):
                total += x[plane, i, j]
        y[plane, oh, ow] = total * (1.0 / (padded_extent_cuda(h0, kh, h, ph) * padded_extent_cuda(w0, kw, w, pw)))


@cuda_kernel
def avg_pool_backward_cuda(dy, dx, kh, kw, sh, sw, ph, pw):
    """One thread per input entry: the shares of every window that holds it (a gather)."""
    h, w = dx.shape[1], dx.shape[2]
    ho, wo = dy.shape[1], dy.shape[2]
    for k in range(cuda.grid(1), dx.size, cuda.gridsize(1)):
        plane = k // (h * w)
        i = (k // w) % h
        j = k % w
        oh_lo, oh_hi = covering_outputs_cuda(i, kh, sh, ph, ho)
        ow_lo, ow_hi = covering_outputs_cuda(j, kw, sw, pw, wo)
        acc = 0.0
        for oh in range(oh_lo, oh_hi):
            rows = padded_extent_cuda(oh * sh - ph, kh, h, ph)
            for ow in range(ow_lo, ow_hi):
                acc += dy[plane, oh, ow] * (1.0 / (rows * padded_extent_cuda(ow * sw - pw, kw, w, pw)))
        dx[plane, i, j] = acc


@cuda_kernel
def plane_means_cuda(x, y):
    """One thread per plane: y[plane] = mean of x[plane, :] (serial sum, deterministic)."""
    size = x.shape[1]
    for plane in range(cuda.grid(1), x.shape[0], cuda.gridsize(1)):
        total = 0.0
        for k in range(size):
            total += x[plane, k]
        y[plane] = total / size


@cuda_kernel
def spread_plane_means_cuda(dy, dx):
    size = dx.shape[1]
    for k in range(cuda.grid(1), dx.size, cuda.gridsize(1)):
        plane = k // size
        dx[plane, k - plane * size] = dy[plane] / size


# -- layers ---------------------------------------------------------------------
class Pool2D(Layer):
    """Shared window geometry and checks of MaxPool2D and AvgPool2D.

    ``ceil_mode=True`` gives Caffe's (and PyTorch's ceil-mode) output shapes; see the
    module docstring for the windows that then run past the edge.
    """

    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode=False, dtype=np.float32):
        super().__init__(dtype)
        self.kernel_size = pair(kernel_size, "kernel_size")
        self.stride = self.kernel_size if stride is None else pair(stride, "stride")
        self.padding = pair(padding, "padding")
        name = type(self).__name__
        if not isinstance(ceil_mode, (bool, np.bool_)):
            raise ConfigError(f"{name} ceil_mode must be true or false, got {ceil_mode!r}")
        self.ceil_mode = bool(ceil_mode)
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
        ho = pool_output_size(height, self.kernel_size[0], self.stride[0], self.padding[0], self.ceil_mode)
        wo = pool_output_size(width, self.kernel_size[1], self.stride[1], self.padding[1], self.ceil_mode)
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
        ceil = ", ceil_mode=True" if self.ceil_mode else ""
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}{ceil}"


class MaxPool2D(Pool2D):
    """Max over each window; the gradient goes to the first maximum in row-major scan order."""

    def forward_cpu(self, x, training):
        planes, out_shape = self._planes(x)
        y = np.empty(out_shape, dtype=self.dtype)
        self._argmax = np.empty(out_shape, dtype=np.int32)
        flat = (planes.shape[0], out_shape[2], out_shape[3])
        # the 2x2 kernel reads whole windows: not for ceil-mode windows past the edge
        inside = 2 * out_shape[2] <= x.shape[2] and 2 * out_shape[3] <= x.shape[3]
        if self._window() == (2, 2, 2, 2, 0, 0) and inside:
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

    def forward_cuda(self, x, training):
        planes, out_shape = self._planes(x)
        y = self.backend.empty(out_shape, self.dtype)
        self._argmax = self.backend.empty(out_shape, np.int32)
        flat = (planes.shape[0], out_shape[2], out_shape[3])
        max_pool_forward_cuda.launch(y.size, planes, y.reshape(flat), self._argmax.reshape(flat), *self._window())
        self._x_shape = x.shape
        return y

    def backward_cuda(self, dy):
        n, c, h, w = self._x_shape
        dx = self.backend.empty(self._x_shape, self.dtype)
        flat = (n * c, dy.shape[2], dy.shape[3])
        max_pool_backward_cuda.launch(dx.size, dy.reshape(flat), self._argmax.reshape(flat), dx.reshape(n * c, h, w),
                                      *self._window())
        return dx


class AvgPool2D(Pool2D):
    """Mean over each window; padding counts as zeros in the mean (PyTorch's count_include_pad).

    In ceil mode a window past the right/bottom padding divides by its part inside the
    padded input, as PyTorch's ``nn.AvgPool2d(ceil_mode=True)`` and Caffe's AVE pooling.
    """

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

    def forward_cuda(self, x, training):
        planes, out_shape = self._planes(x)
        y = self.backend.empty(out_shape, self.dtype)
        avg_pool_forward_cuda.launch(y.size, planes, y.reshape(planes.shape[0], out_shape[2], out_shape[3]),
                                     *self._window())
        self._x_shape = x.shape
        return y

    def backward_cuda(self, dy):
        n, c, h, w = self._x_shape
        dx = self.backend.empty(self._x_shape, self.dtype)
        avg_pool_backward_cuda.launch(dx.size, dy.reshape(n * c, dy.shape[2], dy.shape[3]), dx.reshape(n * c, h, w),
                                      *self._window())
        return dx


class GlobalAvgPool2D(Layer):
    """(N, C, H, W) -> (N, C): the mean of each channel plane."""

    def _check(self, x):
        if x.ndim != 4:
            raise ConfigError(f"GlobalAvgPool2D expects (N, C, H, W) input, got shape {tuple(x.shape)}")
        self._x_shape = x.shape
        n, c, h, w = x.shape
        return n, c, h * w

    def forward_cpu(self, x, training):
        n, c, size = self._check(x)
        y = np.empty((n, c), dtype=self.dtype)
        plane_means(x.reshape(n * c, size), y.reshape(n * c))
        return y

    def backward_cpu(self, dy):
        n, c, h, w = self._x_shape
        dx = np.empty(self._x_shape, dtype=self.dtype)
        spread_plane_means(dy.reshape(n * c), dx.reshape(n * c, h * w))
        return dx

    def forward_cuda(self, x, training):
        n, c, size = self._check(x)
        y = self.backend.empty((n, c), self.dtype)
        plane_means_cuda.launch(n * c, x.reshape(n * c, size), y.reshape(n * c))
        return y

    def backward_cuda(self, dy):
        n, c, h, w = self._x_shape
        dx = self.backend.empty(self._x_shape, self.dtype)
        spread_plane_means_cuda.launch(dx.size, dy.reshape(n * c), dx.reshape(n * c, h * w))
        return dx

    def output_shape(self, input_shape):
        if len(input_shape) != 3:
            raise ConfigError(f"GlobalAvgPool2D expects a (C, H, W) input shape, got {tuple(input_shape)}")
        return (input_shape[0],)

    def flops(self, input_shape):
        return math.prod(input_shape)


# -- max to average -------------------------------------------------------------
def _as_average(pool):
    """An AvgPool2D with ``pool``'s geometry, dtype and device."""
    avg = AvgPool2D(pool.kernel_size, pool.stride, pool.padding, ceil_mode=pool.ceil_mode, dtype=pool.dtype)
    avg.needs_input_grad = pool.needs_input_grad
    return avg.to(pool.device) if pool.device != "cpu" else avg


def _replace_child(container, index, old, new):
    """Put ``new`` where ``old`` sits among the container's children, in the container's own storage."""
    children = container.children()
    children[index] = new
    if container.children()[index] is new:  # children() is the container's list (Sequential, branches)
        return
    for name, value in vars(container).items():  # a container that builds its list from attributes
        if value is old:
            setattr(container, name, new)
            return
        if isinstance(value, list) and any(item is old for item in value):
            value[[i for i, item in enumerate(value) if item is old][0]] = new
            return
    raise ConfigError(f"swap_max_to_avg cannot replace child {index} of {type(container).__name__}")


def swap_max_to_avg(model):
    """Turn every MaxPool2D of ``model`` into an AvgPool2D of the same geometry.

    Average pooling gives smoother gradients to the image in neural style transfer
    (Gatys, Ecker & Bethge 2016).  Containers are changed in place (each pool keeps its
    position, so every dotted layer and parameter name stays); the model is returned,
    or the new layer where ``model`` is itself a MaxPool2D.  Padding then counts as
    zeros in the average (see :class:`AvgPool2D`) where it was ignored by the max.
    """
    if isinstance(model, MaxPool2D):
        return _as_average(model)
    for index, child in enumerate(list(model.children())):
        swapped = swap_max_to_avg(child)
        if swapped is not child:
            _replace_child(model, index, child, swapped)
    return model


@hookimpl
def rabbit_layers():
    return {"MaxPool2D": MaxPool2D, "AvgPool2D": AvgPool2D, "GlobalAvgPool2D": GlobalAvgPool2D}
