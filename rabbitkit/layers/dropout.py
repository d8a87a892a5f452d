"""Inverted dropout: zero each input with probability p in training and scale the
kept ones by 1/(1-p), so evaluation is the identity.

The keep mask is drawn on the host from the layer's own generator (``self.rng``),
so ``layer.seed(s)`` or ``rabbitkit.manual_seed`` reproduce it on any device and
with any thread count; on CUDA it is copied over and applied by a kernel.
"""
import numpy as np
from numba import prange

from ..backend.cpu import kernel
from ..backend.cuda import cuda_kernel
from ..errors import ConfigError
from ..hookspecs import hookimpl
from .base import Layer

cuda = None  # numba.cuda, bound on the first CUDA launch


@kernel
def apply_mask_cpu(x, keep, scale, y):
    """y = x * scale where keep, else 0 (flat arrays); also the backward pass."""
    for i in prange(x.size):
        y[i] = x[i] * scale if keep[i] else 0.0


@cuda_kernel
def apply_mask_cuda(x, keep, scale, y):
    for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        y[i] = x[i] * scale if keep[i] else 0.0


class Dropout(Layer):
    """Inverted dropout with drop probability ``p`` (0 <= p <= 1); works on any shape."""

    def __init__(self, p=0.5, dtype=np.float32):
        super().__init__(dtype)
        self.p = float(p)
        if not 0.0 <= self.p <= 1.0:
            raise ConfigError(f"Dropout probability must be in [0, 1], got {p}")
        # p = 1 drops everything; the scale then never multiplies a kept value.
        self.scale = 1.0 / (1.0 - self.p) if self.p < 1.0 else 0.0
        self._keep = None

    def _draw_mask(self, shape):
        """Keep each entry with probability 1 - p (uint8, so kernels read one byte each)."""
        return (self.rng.random(shape, dtype=np.float32) >= self.p).view(np.uint8)

    def _active(self, training):
        return training and self.p > 0.0

    def forward_cpu(self, x, training):
        if not self._active(training):
            self._keep = None
            return x
        self._keep = self._draw_mask(x.shape)
        y = np.empty_like(x)
        apply_mask_cpu(x.reshape(-1), self._keep.reshape(-1), self.dtype.type(self.scale), y.reshape(-1))
        return y

    def backward_cpu(self, dy):
        if self._keep is None:
            return dy
        dx = np.empty_like(dy)
        apply_mask_cpu(dy.reshape(-1), self._keep.reshape(-1), self.dtype.type(self.scale), dx.reshape(-1))
        return dx

    def forward_cuda(self, x, training):
        if not self._active(training):
            self._keep = None
            return x
        self._keep = self.backend.cuda.to_device(self._draw_mask(x.shape).reshape(-1))
        return self._apply_cuda(x)

    def backward_cuda(self, dy):
        if self._keep is None:
            return dy
        return self._apply_cuda(dy)

    def _apply_cuda(self, x):
        y = self.backend.empty(x.shape, self.dtype)
        apply_mask_cuda.launch(x.size, x.reshape(x.size), self._keep, self.dtype.type(self.scale), y.reshape(y.size))
        return y

    def output_shape(self, input_shape):
        return tuple(input_shape)

    def extra_repr(self):
        return f"p={self.p}"


@hookimpl
def rabbit_layers():
    return {"Dropout": Dropout}
