"""Local response normalisation across channels (Krizhevsky et al. 2012; Caffe's LRN).

For an input ``a`` of shape (N, C, *spatial)::

    scale_c = k + alpha / size * sum_{c' in window(c)} a_{c'}^2
    b_c     = a_c * scale_c^(-beta)

with the window ``c - size//2 .. c + (size-1)//2`` clipped to the channels (zero
padding).  This is PyTorch's ``nn.LocalResponseNorm`` exactly and, for the odd
sizes Caffe accepts, Caffe's ``ACROSS_CHANNELS`` LRN (both divide ``alpha`` by
``size``).  Caffe refuses even sizes; PyTorch's window is used for them.

Backward (Caffe's formula), with the scale kept from forward::

    da_c = dy_c scale_c^(-beta)
           - 2 alpha beta / size * a_c * sum_{c': c in window(c')} dy_{c'} b_{c'} / scale_{c'}

CPU kernels run in parallel over (sample, block of spatial positions) tasks and
sweep the channels of a block with vectorisable inner loops; CUDA kernels run one
thread per (sample, position) down its channels.  Both sum each window directly
(no running sum), in the same channel order.
"""
import numpy as np
from numba import prange

from ..backend.cpu import kernel
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


channel_window_cpu, channel_window_cuda = device_pair(_channel_window)


# -- CPU kernels ----------------------------------------------------------------
@kernel
def lrn_forward_cpu(x, scale, y, before, after, coeff, beta, k):
    """scale = k + coeff * window sums of x^2 over channels; y = x * scale^-beta (x is (N, C, P))."""
    n_batch, channels, positions = x.shape
    blocks = (positions + BLOCK - 1) // BLOCK
    for task in prange(n_batch * blocks):
        n = task // blocks
        start = (task - n * blocks) * BLOCK
        length = min(positions, start + BLOCK) - start
        for c in range(channels):
            lo, hi = channel_window_cpu(c, before, after, channels)
            s = scale[n, c, start : start + length]
            for p in range(length):
                s[p] = 0.0
            for cc in range(lo, hi):
                src = x[n, cc, start : start + length]
                for p in range(length):
                    s[p] += src[p] * src[p]
            xc = x[n, c, start : start + length]
            out = y[n, c, start : start + length]
            for p in range(length):
                value = k + coeff * s[p]
                s[p] = value
                out[p] = xc[p] * value ** -beta


@kernel
def lrn_backward_cpu(x, y, scale, dy, dx, before, after, coeff, beta):
    """dx = dy * scale^-beta - 2 coeff beta x * sum over the windows holding c of dy y / scale."""
    n_batch, channels, positions = x.shape
    blocks = (positions + BLOCK - 1) // BLOCK
    factor = 2.0 * coeff * beta
    for task in prange(n_batch * blocks):
        n = task // blocks
        start = (task - n * blocks) * BLOCK
        length = min(positions, start + BLOCK) - start
        for c in range(channels):
            # the outputs c' whose window holds c: c - after .. c + before
            lo, hi = channel_window_cpu(c, after, before, channels)
            acc = dx[n, c, start : start + length]
            for p in range(length):
                acc[p] = 0.0
            for cc in range(lo, hi):
                g = dy[n, cc, start : start + length]
                b = y[n, cc, start : start + length]
                s = scale[n, cc, start : start + length]
                for p in range(length):
                    acc[p] += g[p] * b[p] / s[p]
            xc = x[n, c, start : start + length]
            gc = dy[n, c, start : start + length]
            sc = scale[n, c, start : start + length]
            for p in range(length):
                acc[p] = gc[p] * sc[p] ** -beta - factor * xc[p] * acc[p]


# -- CUDA kernels ---------------------------------------------------------------
@cuda_kernel
def lrn_forward_cuda(x, scale, y, before, after, coeff, beta, k):
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
            value = k + coeff * acc
            scale[n, c, p] = value
            y[n, c, p] = x[n, c, p] * value ** -beta


@cuda_kernel
def lrn_backward_cuda(x, y, scale, dy, dx, before, after, coeff, beta):
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
                acc += dy[n, cc, p] * y[n, cc, p] / scale[n, cc, p]
            dx[n, c, p] = dy[n, c, p] * scale[n, c, p] ** -beta - factor * x[n, c, p] * acc


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
        self._scale = np.empty_like(x3)
        lrn_forward_cpu(x3, self._scale, y.reshape(x3.shape), *self._args(), self.dtype.type(self.k))
        self._x, self._y = x, y
        return y

    def backward_cpu(self, dy):
        x3 = self._columns(self._x)
        dx = np.empty_like(self._x)
        lrn_backward_cpu(x3, self._y.reshape(x3.shape), self._scale, dy.reshape(x3.shape), dx.reshape(x3.shape),
                         *self._args())
        return dx

    def forward_cuda(self, x, training):
        x3 = self._columns(x)
        y = self.backend.empty(x.shape, self.dtype)
        self._scale = self.backend.empty(x3.shape, self.dtype)
        lrn_forward_cuda.launch(x3.shape[0] * x3.shape[2], x3, self._scale, y.reshape(x3.shape), *self._args(),
                                self.dtype.type(self.k))
        self._x, self._y = x, y
        return y

    def backward_cuda(self, dy):
        x3 = self._columns(self._x)
        dx = self.backend.empty(self._x.shape, self.dtype)
        lrn_backward_cuda.launch(x3.shape[0] * x3.shape[2], x3, self._y.reshape(x3.shape), self._scale,
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
