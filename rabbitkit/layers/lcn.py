"""Local contrast normalisation (Jarrett, Kavukcuoglu, Ranzato & LeCun, ICCV 2009).

For an input ``x`` of shape (N, C, H, W) and a normalised Gaussian window ``g``
(``kernel_size`` x ``kernel_size`` taps, standard deviation ``sigma``, sum of taps 1),
the layer computes, per sample::

    m[h, w]   = sum_{c,p,q} g[p, q] x[c, h+p, w+q]  / (C * cover[h, w])     (local mean)
    v         = x - m                                                        (subtractive)
    s[h, w]   = sqrt( sum_{c,p,q} g[p, q] v[c, h+p, w+q]^2 / (C * cover[h, w]) + eps )
    y         = v / max(mean_{h,w} s, s[h, w])                               (divisive)

with ``p, q`` running over the centred window and samples outside the image
counting as zero.  This is Jarrett et al.'s formula, whose window ``w_ipq = g_pq / C``
sums to one over channels *and* space.  Two documented choices beyond the paper:

* ``cover[h, w] = sum_{p,q inside the image} g[p, q]`` renormalises the window
  at the borders, so the local mean near an edge is a true weighted average
  instead of being pulled towards zero by the padding (as EBLearn/Torch's
  ``SpatialContrastiveNormalization`` do).  Inside the image ``cover = 1``.
* ``eps`` is added to the local variance *inside* the square root; it keeps the
  divisor positive and the gradient finite on flat regions.

The ``max`` is taken exactly (not smoothed): where the local deviation wins the
gradient flows into ``s[h, w]``, elsewhere into the per-sample mean deviation.
The Gaussian is separable, so every window sum is a row pass and a column pass.
"""
import math

import numpy as np
from numba import prange

from ..backend.cpu import kernel
from ..backend.cuda import REDUCE_THREADS, block_reduce_sum, cuda_device, cuda_kernel
from ..errors import ConfigError
from ..hookspecs import hookimpl
from .base import Layer

cuda = None  # numba.cuda, bound on the first CUDA launch


# -- CPU kernels ----------------------------------------------------------------
@kernel
def channel_sum_cpu(x, out):
    """out[n, h, w] = sum_c x[n, c, h, w]."""
    n_batch, channels, height, width = x.shape
    for nh in prange(n_batch * height):
        n = nh // height
        h = nh - n * height
        for w in range(width):
            out[n, h, w] = 0.0
        for c in range(channels):
            for w in range(width):
                out[n, h, w] += x[n, c, h, w]


@kernel
def window_sum_cpu(src, taps, scale, scale_after, tmp, out):
    """Zero-padded separable window sum of (N, H, W) planes, times a per-pixel scale.

    ``scale_after`` True: out = scale * window(src) (the forward average);
    False: out = window(scale * src) (its adjoint, since the window is symmetric).
    ``tmp`` holds the row pass.
    """
    n_batch, height, width = src.shape
    radius = taps.size // 2
    for nh in prange(n_batch * height):
        n = nh // height
        h = nh - n * height
        for w in range(width):
            acc = 0.0
            for k in range(taps.size):
                ww = w + k - radius
                if 0 <= ww < width:
                    value = src[n, h, ww]
                    if not scale_after:
                        value *= scale[h, ww]
                    acc += taps[k] * value
            tmp[n, h, w] = acc
    for nh in prange(n_batch * height):
        n = nh // height
        h = nh - n * height
        for w in range(width):
            out[n, h, w] = 0.0
        for k in range(taps.size):
            hh = h + k - radius
            if 0 <= hh < height:
                for w in range(width):
                    out[n, h, w] += taps[k] * tmp[n, hh, w]
        if scale_after:
            for w in range(width):
                out[n, h, w] *= scale[h, w]


@kernel
def subtract_mean_cpu(x, mean, v, square_sum):
    """v = x - mean (broadcast over channels); square_sum = sum_c v^2."""
    n_batch, channels, height, width = x.shape
    for nh in prange(n_batch * height):
        n = nh // height
        h = nh - n * height
        for w in range(width):
            square_sum[n, h, w] = 0.0
        for c in range(channels):
            for w in range(width):
                value = x[n, c, h, w] - mean[n, h, w]
                v[n, c, h, w] = value
                square_sum[n, h, w] += value * value


@kernel
def local_deviation_cpu(variance, eps, deviation, mean_deviation):
    """deviation = sqrt(variance + eps); mean_deviation[n] = its mean over the image."""
    n_batch, height, width = variance.shape
    for n in prange(n_batch):
        acc = 0.0
        for h in range(height):
            for w in range(width):
                value = math.sqrt(variance[n, h, w] + eps)
                deviation[n, h, w] = value
                acc += value
        mean_deviation[n] = acc / (height * width)


@kernel
def divide_by_deviation_cpu(v, deviation, mean_deviation, y):
    """y = v / max(mean_deviation[n], deviation[n, h, w])."""
    n_batch, channels, height, width = v.shape
    for nc in prange(n_batch * channels):
        n = nc // channels
        c = nc - n * channels
        floor = mean_deviation[n]
        for h in range(height):
            for w in range(width):
                y[n, c, h, w] = v[n, c, h, w] / max(floor, deviation[n, h, w])


@kernel
def divisive_backward_cpu(dy, y, deviation, mean_deviation, dv, dvariance):
    """Gradients of y = v / max(mean_dev, dev): dv = dy / d and d(loss)/d(variance).

    First pass (rows): d(loss)/d(divisor) = -sum_c dy * y / divisor, kept in
    ``dvariance``.  Second pass (samples): route it to the local deviation where
    that won the max, otherwise to the per-sample mean deviation, which then
    spreads evenly over all pixels; finally d(sqrt(var + eps)) = 1 / (2 dev).
    """
    n_batch, channels, height, width = dy.shape
    for nh in prange(n_batch * height):
        n = nh // height
        h = nh - n * height
        floor = mean_deviation[n]
        for w in range(width):
            dvariance[n, h, w] = 0.0
        for c in range(channels):
            for w in range(width):
                divisor = max(floor, deviation[n, h, w])
                dv[n, c, h, w] = dy[n, c, h, w] / divisor
                dvariance[n, h, w] -= dy[n, c, h, w] * y[n, c, h, w] / divisor
    for n in prange(n_batch):
        floor = mean_deviation[n]
        dfloor = 0.0
        for h in range(height):
            for w in range(width):
                if deviation[n, h, w] <= floor:
                    dfloor += dvariance[n, h, w]
                    dvariance[n, h, w] = 0.0
        dfloor /= height * width
        for h in range(height):
            for w in range(width):
                dvariance[n, h, w] = (dvariance[n, h, w] + dfloor) / (2.0 * deviation[n, h, w])


@kernel
def subtractive_backward_cpu(v, dsquare_sum, dv, dmean):
    """dv += 2 v dsquare_sum (through the variance); dmean = -sum_c dv."""
    n_batch, channels, height, width = v.shape
    for nh in prange(n_batch * height):
        n = nh // height
        h = nh - n * height
        for w in range(width):
            dmean[n, h, w] = 0.0
        for c in range(channels):
            for w in range(width):
                grad = dv[n, c, h, w] + 2.0 * v[n, c, h, w] * dsquare_sum[n, h, w]
                dv[n, c, h, w] = grad
                dmean[n, h, w] -= grad


@kernel
def add_over_channels_cpu(dv, dsum, dx):
    """dx[n, c] = dv[n, c] + dsum[n] (the channel sum's adjoint)."""
    n_batch, channels, height, width = dv.shape
    for nc in prange(n_batch * channels):
        n = nc // channels
        c = nc - n * channels
        for h in range(height):
            for w in range(width):
                dx[n, c, h, w] = dv[n, c, h, w] + dsum[n, h, w]


# -- CUDA kernels ---------------------------------------------------------------
# One thread per pixel (n, h, w) where the CPU loops over channels for it, one per
# element where it is elementwise, and one block per sample for the per-sample
# mean deviation, summed by a fixed-order tree: deterministic, no atomics.

@cuda_device
def pixel_of(e, height, width):
    """(n, h, w) of flat pixel index e of (N, H, W) planes."""
    n = e // (height * width)
    rest = e - n * height * width
    h = rest // width
    return n, h, rest - h * width


@cuda_kernel
def channel_sum_cuda(x, out):
    channels, height, width = x.shape[1], x.shape[2], x.shape[3]
    for e in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        n, h, w = pixel_of(e, height, width)
        acc = 0.0
        for c in range(channels):
            acc += x[n, c, h, w]
        out[n, h, w] = acc


@cuda_kernel
def window_rows_cuda(src, taps, scale, scale_after, tmp):
    """The row pass of window_sum_cpu: tmp = taps along w (of scale * src when not scale_after)."""
    height, width = src.shape[1], src.shape[2]
    radius = taps.size // 2
    for e in range(cuda.grid(1), src.size, cuda.gridsize(1)):
        n, h, w = pixel_of(e, height, width)
        acc = 0.0
        for k in range(taps.size):
            ww = w + k - radius
            if 0 <= ww < width:
                value = src[n, h, ww]
                if not scale_after:
                    value *= scale[h, ww]
                acc += taps[k] * value
        tmp[n, h, w] = acc


@cuda_kernel
def window_columns_cuda(tmp, taps, scale, scale_after, out):
    """The column pass: out = taps along h of tmp (times scale when scale_after)."""
    height, width = tmp.shape[1], tmp.shape[2]
    radius = taps.size // 2
    for e in range(cuda.grid(1), tmp.size, cuda.gridsize(1)):
        n, h, w = pixel_of(e, height, width)
        acc = 0.0
        for k in range(taps.size):
            hh = h + k - radius
            if 0 <= hh < height:
                acc += taps[k] * tmp[n, hh, w]
        if scale_after:
            acc *= scale[h, w]
        out[n, h, w] = acc


@cuda_kernel
def subtract_mean_cuda(x, mean, v, square_sum):
    channels, height, width = x.shape[1], x.shape[2], x.shape[3]
    for e in range(cuda.grid(1), mean.size, cuda.gridsize(1)):
        n, h, w = pixel_of(e, height, width)
        acc = 0.0
        for c in range(channels):
            value = x[n, c, h, w] - mean[n, h, w]
            v[n, c, h, w] = value
            acc += value * value
        square_sum[n, h, w] = acc


@cuda_kernel
def local_deviation_cuda(variance, eps, deviation, mean_deviation):
    """Block n: deviation = sqrt(variance + eps) and its mean over the image."""
    partial = cuda.shared.array(shape=REDUCE_THREADS, dtype=np.float64)
    n = cuda.blockIdx.x
    height, width = variance.shape[1], variance.shape[2]
    acc = np.float64(0.0)
    for e in range(cuda.threadIdx.x, height * width, cuda.blockDim.x):
        h = e // width
        w = e - h * width
        value = math.sqrt(variance[n, h, w] + eps)
        deviation[n, h, w] = value
        acc += value
    total = block_reduce_sum(partial, acc)
    if cuda.threadIdx.x == 0:
        mean_deviation[n] = total / (height * width)


@cuda_kernel
def divide_by_deviation_cuda(v, deviation, mean_deviation, y):
    channels, height, width = v.shape[1], v.shape[2], v.shape[3]
    for e in range(cuda.grid(1), v.size, cuda.gridsize(1)):
        w = e % width
        h = (e // width) % height
        n = e // (width * height * channels)
        c = (e // (width * height)) % channels
        y[n, c, h, w] = v[n, c, h, w] / max(mean_deviation[n], deviation[n, h, w])


@cuda_kernel
def divisive_rows_cuda(dy, y, deviation, mean_deviation, dv, dvariance):
    """First pass of divisive_backward_cpu, one thread per pixel."""
    channels, height, width = dy.shape[1], dy.shape[2], dy.shape[3]
    for e in range(cuda.grid(1), deviation.size, cuda.gridsize(1)):
        n, h, w = pixel_of(e, height, width)
        divisor = max(mean_deviation[n], deviation[n, h, w])
        acc = 0.0
        for c in range(channels):
            dv[n, c, h, w] = dy[n, c, h, w] / divisor
            acc -= dy[n, c, h, w] * y[n, c, h, w] / divisor
        dvariance[n, h, w] = acc


@cuda_kernel
def divisive_samples_cuda(deviation, mean_deviation, dvariance):
    """Block n: the second pass of divisive_backward_cpu.  The pixels where the mean
    deviation won the max send their gradient to it (a fixed-order tree sum), which
    spreads evenly; then d sqrt(var + eps) = 1 / (2 dev).  Each thread updates only
    the pixels it read, so the in-place update needs no further barrier."""
    partial = cuda.shared.array(shape=REDUCE_THREADS, dtype=np.float64)
    n = cuda.blockIdx.x
    height, width = deviation.shape[1], deviation.shape[2]
    floor = mean_deviation[n]
    acc = np.float64(0.0)
    for e in range(cuda.threadIdx.x, height * width, cuda.blockDim.x):
        h = e // width
        w = e - h * width
        if deviation[n, h, w] <= floor:
            acc += dvariance[n, h, w]
    dfloor = block_reduce_sum(partial, acc) / (height * width)
    for e in range(cuda.threadIdx.x, height * width, cuda.blockDim.x):
        h = e // width
        w = e - h * width
        own = dvariance[n, h, w] if deviation[n, h, w] > floor else 0.0
        dvariance[n, h, w] = (own + dfloor) / (2.0 * deviation[n, h, w])


@cuda_kernel
def subtractive_backward_cuda(v, dsquare_sum, dv, dmean):
    channels, height, width = v.shape[1], v.shape[2], v.shape[3]
    for e in range(cuda.grid(1), dmean.size, cuda.gridsize(1)):
        n, h, w = pixel_of(e, height, width)
        acc = 0.0
        for c in range(channels):
            grad = dv[n, c, h, w] + 2.0 * v[n, c, h, w] * dsquare_sum[n, h, w]
            dv[n, c, h, w] = grad
            acc -= grad
        dmean[n, h, w] = acc


@cuda_kernel
def add_over_channels_cuda(dv, dsum, dx):
    channels, height, width = dv.shape[1], dv.shape[2], dv.shape[3]
    for e in range(cuda.grid(1), dv.size, cuda.gridsize(1)):
        w = e % width
        h = (e // width) % height
        n = e // (width * height * channels)
        c = (e // (width * height)) % channels
        dx[n, c, h, w] = dv[n, c, h, w] + dsum[n, h, w]


# -- the layer ------------------------------------------------------------------
def gaussian_taps(kernel_size, sigma):
    """1-D Gaussian taps summing to 1; their outer product is the 2-D window."""
    offsets = np.arange(kernel_size) - (kernel_size - 1) / 2
    taps = np.exp(-0.5 * (offsets / sigma) ** 2)
    return taps / taps.sum()


class LocalContrastNorm(Layer):
    """Subtractive then divisive local contrast normalisation (see the module docstring).

    ``kernel_size``: odd width of the Gaussian window (9 in Jarrett et al.);
    ``sigma``: its standard deviation, ``kernel_size / 4`` by default (Torch's
    ``image.gaussian`` convention); ``eps``: added to the local variance.  No
    trainable parameters; the output has the input's shape.
    """

    def __init__(self, num_channels, kernel_size=9, sigma=None, eps=1e-4, dtype=np.float32):
        super().__init__(dtype)
        if int(kernel_size) < 1 or int(kernel_size) % 2 == 0:
            raise ConfigError(f"LocalContrastNorm kernel_size must be a positive odd number, got {kernel_size}")
        self.num_channels = int(num_channels)
        self.kernel_size = int(kernel_size)
        self.sigma = float(sigma) if sigma is not None else self.kernel_size / 4.0
        if self.sigma <= 0:
            raise ConfigError(f"LocalContrastNorm sigma must be positive, got {sigma}")
        self.eps = float(eps)
        self.taps = gaussian_taps(self.kernel_size, self.sigma).astype(self.dtype)
        self._scales = {}

    def _scale(self, height, width):
        """1 / (C * cover): the window's mass inside the image, per pixel (cached per size)."""
        key = (height, width)
        if key not in self._scales:
            radius = self.kernel_size // 2
            taps = self.taps.astype(np.float64)
            # cover along one axis = sum of the taps whose sample lands inside.
            rows = np.array([taps[max(0, radius - h): radius + height - h].sum() for h in range(height)])
            cols = np.array([taps[max(0, radius - w): radius + width - w].sum() for w in range(width)])
            cover = np.outer(rows, cols)
            self._scales[key] = np.ascontiguousarray(1.0 / (self.num_channels * cover), dtype=self.dtype)
        return self._scales[key]

    def _window_average(self, src, scale, scale_after):
        out = np.empty_like(src)
        window_sum_cpu(src, self.taps, scale, scale_after, np.empty_like(src), out)
        return out

    def forward_cpu(self, x, training):
        if x.ndim != 4 or x.shape[1] != self.num_channels:
            raise ConfigError(
                f"LocalContrastNorm({self.num_channels}) expects (N, {self.num_channels}, H, W) input, got {x.shape}"
            )
        n_batch, _, height, width = x.shape
        scale = self._scale(height, width)
        plane = (n_batch, height, width)
        total = np.empty(plane, dtype=self.dtype)
        channel_sum_cpu(x, total)
        mean = self._window_average(total, scale, True)
        v = np.empty_like(x)
        square_sum = np.empty(plane, dtype=self.dtype)
        subtract_mean_cpu(x, mean, v, square_sum)
        variance = self._window_average(square_sum, scale, True)
        deviation = np.empty(plane, dtype=self.dtype)
        mean_deviation = np.empty(n_batch, dtype=self.dtype)
        local_deviation_cpu(variance, self.dtype.type(self.eps), deviation, mean_deviation)
        y = np.empty_like(x)
        divide_by_deviation_cpu(v, deviation, mean_deviation, y)
        self._saved = (v, y, deviation, mean_deviation, scale)
        return y

    def backward_cpu(self, dy):
        v, y, deviation, mean_deviation, scale = self._saved
        dv = np.empty_like(dy)
        dvariance = np.empty_like(deviation)
        divisive_backward_cpu(dy, y, deviation, mean_deviation, dv, dvariance)
        dsquare_sum = self._window_average(dvariance, scale, False)
        dmean = np.empty_like(deviation)
        subtractive_backward_cpu(v, dsquare_sum, dv, dmean)
        dsum = self._window_average(dmean, scale, False)
        dx = np.empty_like(dy)
        add_over_channels_cpu(dv, dsum, dx)
        return dx

    # -- CUDA (the same stages, on the device) -------------------------------------
    def _device_constants(self, height, width):
        key = ("cuda", height, width)
        if key not in self._scales:
            self._scales[key] = (self.backend.asarray(self.taps, self.dtype),
                                 self.backend.asarray(self._scale(height, width), self.dtype))
        return self._scales[key]

    def _window_average_cuda(self, src, scale_after):
        taps, scale = self._device_constants(src.shape[1], src.shape[2])
        tmp = self.backend.empty(src.shape, self.dtype)
        out = self.backend.empty(src.shape, self.dtype)
        window_rows_cuda.launch(src.size, src, taps, scale, scale_after, tmp)
        window_columns_cuda.launch(src.size, tmp, taps, scale, scale_after, out)
        return out

    def forward_cuda(self, x, training):
        if x.ndim != 4 or x.shape[1] != self.num_channels:
            raise ConfigError(
                f"LocalContrastNorm({self.num_channels}) expects (N, {self.num_channels}, H, W) input, got {x.shape}"
            )
        n_batch, _, height, width = x.shape
        plane = (n_batch, height, width)
        empty = self.backend.empty
        total = empty(plane, self.dtype)
        channel_sum_cuda.launch(total.size, x, total)
        mean = self._window_average_cuda(total, True)
        v = empty(x.shape, self.dtype)
        square_sum = empty(plane, self.dtype)
        subtract_mean_cuda.launch(mean.size, x, mean, v, square_sum)
        variance = self._window_average_cuda(square_sum, True)
        deviation = empty(plane, self.dtype)
        mean_deviation = empty(n_batch, self.dtype)
        local_deviation_cuda.launch_blocks(n_batch, variance, self.dtype.type(self.eps), deviation, mean_deviation)
        y = empty(x.shape, self.dtype)
        divide_by_deviation_cuda.launch(y.size, v, deviation, mean_deviation, y)
        self._saved = (v, y, deviation, mean_deviation)
        return y

    def backward_cuda(self, dy):
        v, y, deviation, mean_deviation = self._saved
        empty = self.backend.empty
        dv = empty(dy.shape, self.dtype)
        dvariance = empty(deviation.shape, self.dtype)
        divisive_rows_cuda.launch(deviation.size, dy, y, deviation, mean_deviation, dv, dvariance)
        divisive_samples_cuda.launch_blocks(deviation.shape[0], deviation, mean_deviation, dvariance)
        dsquare_sum = self._window_average_cuda(dvariance, False)
        dmean = empty(deviation.shape, self.dtype)
        subtractive_backward_cuda.launch(dmean.size, v, dsquare_sum, dv, dmean)
        dsum = self._window_average_cuda(dmean, False)
        dx = empty(dy.shape, self.dtype)
        add_over_channels_cuda.launch(dx.size, dv, dsum, dx)
        return dx

    def output_shape(self, input_shape):
        return tuple(input_shape)

    def flops(self, input_shape):
        channels, height, width = input_shape
        # two channel reductions, four separable window passes, a few elementwise ops
        return 2 * height * width * (2 * channels + 2 * self.kernel_size) + 6 * channels * height * width

    def extra_repr(self):
        return f"{self.num_channels}, kernel_size={self.kernel_size}, sigma={self.sigma:g}, eps={self.eps:g}"


@hookimpl
def rabbit_layers():
    return {"LocalContrastNorm": LocalContrastNorm}
