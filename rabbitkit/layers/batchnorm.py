"""Batch normalisation (Ioffe & Szegedy 2015) for dense (N, F) and image (N, C, H, W) inputs.

Statistics are per feature / channel (axis 1) over every other axis.  Training
uses the batch's mean and biased variance and updates running averages
(``running = (1 - momentum) * running + momentum * batch``, the variance
unbiased), as PyTorch does; evaluation uses the running averages.  Parameters
and buffers carry PyTorch's names (``weight``, ``bias``, ``running_mean``,
``running_var``) so state dicts exchange.

Kernels see the input as (N, C, S), S the product of the trailing axes (1 for
dense input), and are parallel over channels: each channel's reduction and
update belong to one thread.  Backward recomputes the normalised input from the
saved mean and inverse deviation instead of keeping a copy of it.
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


@kernel
def batch_statistics(x, mean, var):
    """Per-channel mean and biased variance of x (N, C, S), two-pass for accuracy."""
    n, channels, size = x.shape
    count = n * size
    for c in prange(channels):
        total = 0.0
        for b in range(n):
            for k in range(size):
                total += x[b, c, k]
        mu = total / count
        squares = 0.0
        for b in range(n):
            for k in range(size):
                d = x[b, c, k] - mu
                squares += d * d
        mean[c] = mu
        var[c] = squares / count


@kernel(parallel=False)
def affine_coefficients(mean, inv_std, weight, bias, c):
    """(gain, shift) of channel c: y = x * gain + shift.  One place, so that forward and
    backward compute the fused ReLU's pre-activation with the same operations."""
    gain = inv_std[c] * weight[c]
    return gain, bias[c] - mean[c] * gain


@kernel
def normalize_affine(x, mean, inv_std, weight, bias, relu, y):
    """y = (x - mean) * inv_std * weight + bias, per channel of (N, C, S); rectified
    (max(0, .)) when ``relu`` (a fused ReLU)."""
    n, channels, size = x.shape
    for c in prange(channels):
        gain, shift = affine_coefficients(mean, inv_std, weight, bias, c)
        for b in range(n):
            if relu:
                for k in range(size):
                    v = x[b, c, k] * gain + shift
                    y[b, c, k] = v if v > 0 else 0.0
            else:
                for k in range(size):
                    y[b, c, k] = x[b, c, k] * gain + shift


@kernel
def normalize_backward(x, dy, mean, inv_std, weight, bias, relu, batch_stats, dx, dweight, dbias):
    """dx, and dweight += sum(dy * xhat), dbias += sum(dy), per channel of (N, C, S).

    With batch statistics the mean and variance depend on x, giving
    dx = weight * inv_std * (dy - mean(dy) - xhat * mean(dy * xhat));
    with running statistics (evaluation) they are constants: dx = weight * inv_std * dy.
    With a fused ``relu``, dy is 0 where the pre-activation x * gain + shift is not
    positive (recomputed from x, so no mask is stored); the masked dy is written
    over ``dx`` in the first pass and read back in the second.
    """
    n, channels, size = x.shape
    count = n * size
    for c in prange(channels):
        gain, shift = affine_coefficients(mean, inv_std, weight, bias, c)
        sum_dy = 0.0
        sum_dy_xhat = 0.0
        for b in range(n):
            for k in range(size):
                g = dy[b, c, k]
                if relu:
                    if not x[b, c, k] * gain + shift > 0:
                        g = 0.0
                    dx[b, c, k] = g
                xhat = (x[b, c, k] - mean[c]) * inv_std[c]
                sum_dy += g
                sum_dy_xhat += g * xhat
        dweight[c] += sum_dy_xhat
        dbias[c] += sum_dy
        if batch_stats:
            mean_dy = sum_dy / count
            mean_dy_xhat = sum_dy_xhat / count
        else:
            mean_dy = 0.0
            mean_dy_xhat = 0.0
        for b in range(n):
            for k in range(size):
                xhat = (x[b, c, k] - mean[c]) * inv_std[c]
                g = dx[b, c, k] if relu else dy[b, c, k]
                dx[b, c, k] = gain * (g - mean_dy - xhat * mean_dy_xhat)


# -- CUDA kernels -----------------------------------------------------------------
# One block per channel for both reductions: its threads stride over the channel's
# N*S entries in a fixed pattern and a fixed-order tree sums them (float64), so the
# statistics and the parameter gradients are the same bits on every run.

#: The CPU's per-channel (gain, shift), compiled for the device: forward and
#: backward of both devices take the fused ReLU's pre-activation from one formula.
affine_coefficients_cuda = cuda_device(affine_coefficients.py_func)


@cuda_kernel
def statistics_cuda(x, batch_stats, eps, momentum, unbias, mean, var, inv_std, running_mean, running_var):
    """Block c: with ``batch_stats`` the channel's mean and biased variance of x (N, C, S)
    (two passes, as the CPU), and the running averages updated; otherwise the running
    statistics.  Then inv_std = 1 / sqrt(var + eps)."""
    partial = cuda.shared.array(shape=REDUCE_THREADS, dtype=np.float64)
    c = cuda.blockIdx.x
    size = x.shape[2]
    count = x.shape[0] * size
    if batch_stats:
        acc = np.float64(0.0)
        for e in range(cuda.threadIdx.x, count, cuda.blockDim.x):
            b = e // size
            acc += x[b, c, e - b * size]
        mu = block_reduce_sum(partial, acc) / count
        acc = np.float64(0.0)
        for e in range(cuda.threadIdx.x, count, cuda.blockDim.x):
            b = e // size
            d = x[b, c, e - b * size] - mu
            acc += d * d
        squares = block_reduce_sum(partial, acc)
        if cuda.threadIdx.x == 0:
            mean[c] = mu
            var[c] = squares / count
            # in the array's precision, as the CPU's numpy update
            running_mean[c] = running_mean[c] * (1 - momentum) + momentum * mean[c]
            running_var[c] = running_var[c] * (1 - momentum) + (momentum * unbias) * var[c]
    elif cuda.threadIdx.x == 0:
        mean[c] = running_mean[c]
        var[c] = running_var[c]
    if cuda.threadIdx.x == 0:
        inv_std[c] = 1 / math.sqrt(var[c] + eps)


@cuda_kernel
def normalize_affine_cuda(x, mean, inv_std, weight, bias, relu, y):
    """y = x * gain + shift per channel of (N, C, S), rectified if ``relu``."""
    channels = x.shape[1]
    size = x.shape[2]
    for e in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        b = e // (channels * size)
        rest = e - b * channels * size
        c = rest // size
        k = rest - c * size
        gain, shift = affine_coefficients_cuda(mean, inv_std, weight, bias, c)
        v = x[b, c, k] * gain + shift
        if relu and not v > 0:
            v = 0
        y[b, c, k] = v


@cuda_kernel
def normalize_backward_cuda(x, dy, mean, inv_std, weight, bias, relu, batch_stats, dx, dweight, dbias):
    """Block c: sums of dy and dy * xhat over the channel (fixed-order trees), the
    parameter gradients, then dx for the channel's entries (the CPU's formula)."""
    partial = cuda.shared.array(shape=REDUCE_THREADS, dtype=np.float64)
    c = cuda.blockIdx.x
    size = x.shape[2]
    count = x.shape[0] * size
    gain, shift = affine_coefficients_cuda(mean, inv_std, weight, bias, c)
    sum_dy = np.float64(0.0)
    sum_dy_xhat = np.float64(0.0)
    for e in range(cuda.threadIdx.x, count, cuda.blockDim.x):
        b = e // size
        k = e - b * size
        g = dy[b, c, k]
        if relu and not x[b, c, k] * gain + shift > 0:
            g = 0
        sum_dy += g
        sum_dy_xhat += g * ((x[b, c, k] - mean[c]) * inv_std[c])
    sum_dy = block_reduce_sum(partial, sum_dy)
    sum_dy_xhat = block_reduce_sum(partial, sum_dy_xhat)
    if cuda.threadIdx.x == 0:
        dweight[c] += sum_dy_xhat
        dbias[c] += sum_dy
    mean_dy = sum_dy / count if batch_stats else 0.0
    mean_dy_xhat = sum_dy_xhat / count if batch_stats else 0.0
    for e in range(cuda.threadIdx.x, count, cuda.blockDim.x):
        b = e // size
        k = e - b * size
        g = dy[b, c, k]
        if relu and not x[b, c, k] * gain + shift > 0:
            g = 0
        xhat = (x[b, c, k] - mean[c]) * inv_std[c]
        dx[b, c, k] = gain * (g - mean_dy - xhat * mean_dy_xhat)


class BatchNorm(Layer):
    """Batch normalisation over axis 1 of (N, F), (N, C, L) or (N, C, H, W) input.

    ``weight`` (role "scale", init 1) and ``bias`` (init 0) are the learnable
    affine map; ``running_mean`` / ``running_var`` are buffers.
    """

    absorbs_relu = True  # normalize_affine rectifies, normalize_backward masks (see Sequential)

    def __init__(self, num_features, eps=1e-5, momentum=0.1, dtype=np.float32):
        super().__init__(dtype)
        self.num_features = int(num_features)
        if self.num_features < 1:
            raise ConfigError(f"BatchNorm num_features must be positive, got {num_features}")
        self.eps = float(eps)
        self.momentum = float(momentum)
        self.add_param("weight", np.ones(self.num_features), role="scale")
        self.add_param("bias", np.zeros(self.num_features), role="bias")
        self.add_buffer("running_mean", np.zeros(self.num_features))
        self.add_buffer("running_var", np.ones(self.num_features))

    def _channels_view(self, x):
        if x.ndim < 2 or x.shape[1] != self.num_features:
            raise ConfigError(f"BatchNorm({self.num_features}) expects (N, {self.num_features}, ...) input, got {tuple(x.shape)}")
        return x.reshape(x.shape[0], self.num_features, -1)

    def forward_cpu(self, x, training):
        x3 = self._channels_view(x)
        count = x3.shape[0] * x3.shape[2]
        if training:
            if count < 2:
                raise ConfigError(f"BatchNorm needs more than one value per channel in training, got input {tuple(x.shape)}")
            mean = np.empty(self.num_features, dtype=self.dtype)
            var = np.empty(self.num_features, dtype=self.dtype)
            batch_statistics(x3, mean, var)
            momentum = self.momentum
            self.buffers["running_mean"] *= 1.0 - momentum
            self.buffers["running_mean"] += momentum * mean
            self.buffers["running_var"] *= 1.0 - momentum
            self.buffers["running_var"] += (momentum * count / (count - 1)) * var
        else:
            mean = self.buffers["running_mean"].copy()
            var = self.buffers["running_var"]
        inv_std = (1.0 / np.sqrt(var + self.eps)).astype(self.dtype)
        y = np.empty_like(x3)
        relu = self.fused_relu
        normalize_affine(x3, mean, inv_std, self.params["weight"], self.params["bias"], relu, y)
        self._saved = (x3, mean, inv_std, training, x.shape, relu)
        return y.reshape(x.shape)

    def backward_cpu(self, dy):
        x3, mean, inv_std, batch_stats, shape, relu = self._saved
        dx = np.empty_like(x3)
        normalize_backward(
            x3, dy.reshape(x3.shape), mean, inv_std, self.params["weight"], self.params["bias"], relu, batch_stats,
            dx, self.grads["weight"], self.grads["bias"],
        )
        return dx.reshape(shape)

    def forward_cuda(self, x, training):
        x3 = self._channels_view(x)
        count = x3.shape[0] * x3.shape[2]
        if training and count < 2:
            raise ConfigError(f"BatchNorm needs more than one value per channel in training, got input {tuple(x.shape)}")
        channels = self.num_features
        mean, var, inv_std = (self.backend.empty(channels, self.dtype) for _ in range(3))
        kind = self.dtype.type
        statistics_cuda.launch_blocks(
            channels, x3, bool(training), kind(self.eps), kind(self.momentum), kind(count / max(count - 1, 1)),
            mean, var, inv_std, self.buffers["running_mean"], self.buffers["running_var"],
        )
        y = self.backend.empty(x3.shape, self.dtype)
        relu = self.fused_relu
        normalize_affine_cuda.launch(x3.size, x3, mean, inv_std, self.params["weight"], self.params["bias"], relu, y)
        self._saved = (x3, mean, inv_std, training, x.shape, relu)
        return y.reshape(x.shape)

    def backward_cuda(self, dy):
        x3, mean, inv_std, batch_stats, shape, relu = self._saved
        dx = self.backend.empty(x3.shape, self.dtype)
        normalize_backward_cuda.launch_blocks(
            self.num_features, x3, dy.reshape(x3.shape), mean, inv_std, self.params["weight"], self.params["bias"],
            relu, bool(batch_stats), dx, self.grads["weight"], self.grads["bias"],
        )
        return dx.reshape(shape)

    def output_shape(self, input_shape):
        if not input_shape or input_shape[0] != self.num_features:
            raise ConfigError(f"BatchNorm({self.num_features}) expects ({self.num_features}, ...) input, got {tuple(input_shape)}")
        return tuple(input_shape)

    def flops(self, input_shape):
        return 2 * math.prod(input_shape)

    def extra_repr(self):
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"


@hookimpl
def rabbit_layers():
    return {"BatchNorm": BatchNorm}
