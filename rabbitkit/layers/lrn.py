"""Local response normalisation across channels (Krizhevsky et al. 2012; Caffe's LRN).

For an input ``a`` of shape (N, C, *spatial)::

    scale_c = k + alpha / size * sum_{c' in window(c)} a_{c'}^2
    b_c     = a_c * scale_c^(-beta)

with the window ``c - size//2 .. c + (size-1)//2`` clipped to the channels (zero
padding).  This is PyTorch's ``nn.LocalResponseNorm`` exactly and, for the odd
sizes Caffe accepts, Caffe's ``ACROSS_CHANNELS`` LRN (both divide ``alpha`` by
``size``).  Caffe refuses even sizes; PyTorch's window is used for them.

Backward (Caffe's formula)::

    da_c = dy_c scale_c^(-beta)
           - 2 alpha beta / size * a_c * sum_{c': c in window(c')} dy_{c'} b_{c'} / scale_{c'}

Forward keeps ``scale^-beta`` and ``scale^(-beta-1)`` (``b / scale = a scale^(-beta-1)``),
so backward has neither a division nor a power in it.

CPU kernels run in parallel over (sample, block of spatial positions) tasks and
sweep the channels of a block with vectorisable inner loops; CUDA kernels run one
thread per (sample, position) down its channels.  Both sum each window directly
(no running sum), in the same channel order.
"""
import math

import numpy as np
from numba import prange

from ..backend.cpu import kernel, kernel_per_constant
from ..backend.cuda import cuda_kernel, device_pair
from ..errors import ConfigError
from ..hookspecs import hookimpl
from .base import Layer

cuda = None  # numba.cuda, bound on the first CUDA launch

# Spatial positions per CPU task: long enough to vectorise, short enough that a
# window's rows stay in L1 while the block's channels are swept.
BLOCK = 512


def _channel_window(c, before, after, channels):
    """[lo, hi) of channels c - before .. c + after, clipped to [0, channels)."""
    return max(0, c - before), min(channels, c + after + 1)


# betas whose power is taken by square roots (AlexNet's and GoogLeNet's 0.75 among them)
ROOT_BETAS = (0.75, 0.5, 1.0)


def _scale_power(scale, inverse, beta, exponent):
    """scale^-beta, given inverse = 1 / scale.  ``exponent`` is beta where beta is one of
    ROOT_BETAS, which take square roots (they vectorise), and 0 for any other beta,
    a libm power per element.  The CPU kernels are compiled with ``exponent`` a
    constant, so the choice is made at compile time and the loop holds one path."""
    if exponent == 0.75:
        return math.sqrt(inverse * math.sqrt(inverse))
    if exponent == 0.5:
        return math.sqrt(inverse)
    if exponent == 1.0:
        return inverse
    return scale ** -beta


def _task_block(task, blocks, positions):
    """(sample, first position, length) of CPU task ``task``: sample by sample, each
    cut into ``blocks`` blocks of BLOCK positions."""
    n = task // blocks
    start = (task - n * blocks) * BLOCK
    return n, start, min(positions, start + BLOCK) - start


channel_window_cpu, channel_window_cuda = device_pair(_channel_window)
task_block, _ = device_pair(_task_block)
scale_power_cpu, scale_power_cuda = device_pair(_scale_power)


# -- CPU kernels ----------------------------------------------------------------
def _lrn_forward(exponent):
    """The forward kernel for one ``exponent`` (see :func:`_scale_power`)."""

    def lrn_forward_cpu(x, power, power_per_scale, y, before, after, coeff, beta, k):
        """scale = k + coeff * window sums of x^2 over channels; power = scale^-beta,
        power_per_scale = scale^(-beta-1) (what backward needs: no division or power
        there); y = x * power.  Arrays are (N, C, P)."""
        n_batch, channels, positions = x.shape
        blocks = (positions + BLOCK - 1) // BLOCK
        one = x.dtype.type(1)  # of the array's type, as in the Winograd kernels: a literal 1.0 widens float32 math
        for task in prange(n_batch * blocks):
            n, start, length = task_block(task, blocks, positions)
            for c in range(channels):
                lo, hi = channel_window_cpu(c, before, after, channels)
                s = power[n, c, start : start + length]
                for p in range(length):
                    s[p] = 0.0
                for cc in range(lo, hi):
                    src = x[n, cc, start : start + length]
                    for p in range(length):
                        s[p] += src[p] * src[p]
                xc = x[n, c, start : start + length]
                q = power_per_scale[n, c, start : start + length]
                out = y[n, c, start : start + length]
                for p in range(length):
                    scale = k + coeff * s[p]
                    inverse = one / scale
                    value = scale_power_cpu(scale, inverse, beta, exponent)
                    s[p] = value
                    q[p] = value * inverse
                    out[p] = xc[p] * value

    return lrn_forward_cpu


LRN_FORWARD = kernel_per_constant(_lrn_forward, (*ROOT_BETAS, 0.0))


def lrn_forward_cpu(x, power, power_per_scale, y, before, after, coeff, beta, k):
    """LRN forward on the CPU (see :func:`_lrn_forward`), compiled for the layer's beta."""
    exponent = float(beta) if float(beta) in ROOT_BETAS else 0.0
    LRN_FORWARD[exponent](x, power, power_per_scale, y, before, after, coeff, beta, k)


@kernel
def lrn_backward_cpu(x, power, power_per_scale, dy, dx, before, after, coeff, beta):
    """dx = dy * scale^-beta - 2 coeff beta x * sum over the windows holding c of dy y / scale,
    with y / scale = x * power_per_scale."""
    n_batch, channels, positions = x.shape
    blocks = (positions + BLOCK - 1) // BLOCK
    factor = 2.0 * coeff * beta
    for task in prange(n_batch * blocks):
        n, start, length = task_block(task, blocks, positions)
        for c in range(channels):
            # the outputs c' whose window holds c: c - after .. c + before
            lo, hi = channel_window_cpu(c, after, before, channels)
            acc = dx[n, c, start : start + length]
            for p in range(length):
                acc[p] = 0.0
            for cc in range(lo, hi):
                g = dy[n, cc, start : start + length]
                a = x[n, cc, start : start + length]
                q = power_per_scale[n, cc, start : start + length]
                for p in range(length):
                    acc[p] += g[p] * a[p] * q[p]
            xc = x[n, c, start : start + length]
            gc = dy[n, c, start : start + length]
            pc = power[n, c, start : start + length]
            for p in range(length):
                acc[p] = gc[p] * pc[p] - factor * xc[p] * acc[p]


# -- CUDA kernels ---------------------------------------------------------------
@cuda_kernel
def lrn_forward_cuda(x, power, power_per_scale, y, before, after, coeff, beta, k):
    """One thread per (sample, position), down the channels (x is (N, C, P))."""
    channels = x.shape[1]
    positions = x.shape[2]
    for i in range(cuda.grid(1), x.shape[0] * positions, cuda.gridsize(1)):
        n = i // positions
        p = i - n * positions
        for c in range(channels):
            lo, hi = channel_window_cuda(c, before, after, channels)
            acc = 0.0
            for cc in range(lo, hi):
                acc += x[n, cc, p] * x[n, cc, p]
            scale = k + coeff * acc
            inverse = k / k / scale
            value = scale_power_cuda(scale, inverse, beta, beta)
            power[n, c, p] = value
            power_per_scale[n, c, p] = value * inverse
            y[n, c, p] = x[n, c, p] * value


@cuda_kernel
def lrn_backward_cuda(x, power, power_per_scale, dy, dx, before, after, coeff, beta):
    channels = x.shape[1]
    positions = x.shape[2]
    factor = 2.0 * coeff * beta
    for i in range(cuda.grid(1), x.shape[0] * positions, cuda.gridsize(1)):
        n = i // positions
        p = i - n * positions
        for c in range(channels):
            lo, hi = channel_window_cuda(c, after, before, channels)
            acc = 0.0
            for cc in range(lo, hi):
                acc += dy[n, cc, p] * x[n, cc, p] * power_per_scale[n, cc, p]
            dx[n, c, p] = dy[n, c, p] * power[n, c, p] - factor * x[n, c, p] * acc


# -- the layer ------------------------------------------------------------------
class LocalResponseNorm(Layer):
    """Across-channel LRN on (N, C, *spatial) input, as Caffe's LRN and PyTorch's
    ``nn.LocalResponseNorm(size, alpha, beta, k)`` (see the module docstring)."""

    def __init__(self, size=5, alpha=1e-4, beta=0.75, k=1.0, dtype=np.float32):
        super().__init__(dtype)
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
            raise ConfigError(f"LocalResponseNorm size must be a positive int, got {size!r}")
        self.size = int(size)
        self.alpha, self.beta, self.k = float(alpha), float(beta), float(k)
        if self.alpha < 0 or self.k <= 0:
            raise ConfigError(
                f"LocalResponseNorm needs alpha >= 0 and k > 0 (a positive divisor), got alpha={alpha}, k={k}"
            )

    def _args(self):
        """(before, after, alpha / size, beta[, k]) as the kernels take them, in the layer's dtype."""
        f = self.dtype.type
        return self.size // 2, (self.size - 1) // 2, f(self.alpha / self.size), f(self.beta)

    def _columns(self, x):
        if x.ndim < 3:
            raise ConfigError(f"LocalResponseNorm expects (N, C, ...) input, got shape {tuple(x.shape)}")
        return x.reshape(x.shape[0], x.shape[1], x.size // (x.shape[0] * x.shape[1]))

    def forward_cpu(self, x, training):
        x3 = self._columns(x)
        y = np.empty_like(x)
        self._power, self._power_per_scale = np.empty_like(x3), np.empty_like(x3)
        lrn_forward_cpu(x3, self._power, self._power_per_scale, y.reshape(x3.shape), *self._args(),
                        self.dtype.type(self.k))
        self._x = x
        return y

    def backward_cpu(self, dy):
        x3 = self._columns(self._x)
        dx = np.empty_like(self._x)
        lrn_backward_cpu(x3, self._power, self._power_per_scale, dy.reshape(x3.shape), dx.reshape(x3.shape),
                         *self._args())
        return dx

    def forward_cuda(self, x, training):
        x3 = self._columns(x)
        y = self.backend.empty(x.shape, self.dtype)
        self._power = self.backend.empty(x3.shape, self.dtype)
        self._power_per_scale = self.backend.empty(x3.shape, self.dtype)
        lrn_forward_cuda.launch(x3.shape[0] * x3.shape[2], x3, self._power, self._power_per_scale,
                                y.reshape(x3.shape), *self._args(), self.dtype.type(self.k))
        self._x = x
        return y

    def backward_cuda(self, dy):
        x3 = self._columns(self._x)
        dx = self.backend.empty(self._x.shape, self.dtype)
        lrn_backward_cuda.launch(x3.shape[0] * x3.shape[2], x3, self._power, self._power_per_scale,
                                 dy.reshape(x3.shape), dx.reshape(x3.shape), *self._args())
        return dx

    def output_shape(self, input_shape):
        if len(input_shape) < 2:
            raise ConfigError(f"LocalResponseNorm expects a (C, ...) input shape, got {tuple(input_shape)}")
        return tuple(input_shape)

    def flops(self, input_shape):
        """Per element: ``size`` multiply-adds for the window, one for the scale, a power and a product."""
        return int(np.prod(input_shape)) * (2 * self.size + 4)

    def extra_repr(self):
        return f"size={self.size}, alpha={self.alpha}, beta={self.beta}, k={self.k}"


@hookimpl
def rabbit_layers():
    return {"LocalResponseNorm": LocalResponseNorm, "LRN": LocalResponseNorm}
