"""Activation layers from the talk, each with its own CPU and CUDA kernels.

Kernels work on flat views (one signature per dtype).  Where the derivative is a
function of the output (tanh, sigmoid) backward reads the saved output, not the
input, so no transcendental function is evaluated twice.
"""
import math

import numpy as np
from numba import prange

from ..backend.cpu import kernel, sized_kernel
from ..backend.cuda import cuda_kernel
from ..hookspecs import hookimpl
from .base import Layer

cuda = None  # numba.cuda, bound on the first CUDA launch


class Elementwise(Layer):
    """Shared plumbing of elementwise activations: flat views, saved tensors.

    Subclasses provide ``_forward(x, y)`` and ``_backward(dy, dx)`` per device on
    flat arrays; ``saves`` says whether backward needs the input ("x") or the
    output ("y").
    """

    saves = "x"

    def forward_cpu(self, x, training):
        y = np.empty_like(x)
        self._forward_cpu(x.reshape(-1), y.reshape(-1))
        self._saved = x if self.saves == "x" else y
        return y

    def backward_cpu(self, dy):
        dx = np.empty_like(dy)
        self._backward_cpu(self._saved.reshape(-1), dy.reshape(-1), dx.reshape(-1))
        return dx

    def forward_cuda(self, x, training):
        y = self.backend.empty(x.shape, self.dtype)
        self._forward_cuda(x.reshape(x.size), y.reshape(y.size))
        self._saved = x if self.saves == "x" else y
        return y

    def backward_cuda(self, dy):
        dx = self.backend.empty(dy.shape, self.dtype)
        self._backward_cuda(self._saved.reshape(dy.size), dy.reshape(dy.size), dx.reshape(dx.size))
        return dx

    def output_shape(self, input_shape):
        return tuple(input_shape)


# -- ReLU ---------------------------------------------------------------------------
@sized_kernel
def relu_forward_cpu(x, y):
    for i in prange(x.size):
        y[i] = x[i] if x[i] > 0 else 0.0


@sized_kernel
def relu_backward_cpu(x, dy, dx):
    for i in prange(x.size):
        dx[i] = dy[i] if x[i] > 0 else 0.0


@cuda_kernel
def relu_forward_cuda(x, y):
    for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        y[i] = x[i] if x[i] > 0 else 0.0


@cuda_kernel
def relu_backward_cuda(x, dy, dx):
    for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        dx[i] = dy[i] if x[i] > 0 else 0.0


class ReLU(Elementwise):
    """max(0, x); the gradient at exactly 0 is taken as 0."""

    def _forward_cpu(self, x, y):
        relu_forward_cpu(x.size, x, y)

    def _backward_cpu(self, x, dy, dx):
        relu_backward_cpu(x.size, x, dy, dx)

    def _forward_cuda(self, x, y):
        relu_forward_cuda.launch(x.size, x, y)

    def _backward_cuda(self, x, dy, dx):
        relu_backward_cuda.launch(x.size, x, dy, dx)


# -- Tanh ---------------------------------------------------------------------------
@kernel(parallel=False)
def tanh_approx(v):
    """float32 tanh as a rational function (Eigen's), so the loop vectorises.

    Numba has no vector libm here, so math.tanh forces a scalar call per element.
    The approximation is within a few float32 ulps on the clamped range; float64
    layers use math.tanh (gradient checks need full precision).
    """
    v = min(max(v, np.float32(-7.90531110763549805)), np.float32(7.90531110763549805))
    v2 = v * v
    p = np.float32(-2.76076847742355e-16)
    p = p * v2 + np.float32(2.00018790482477e-13)
    p = p * v2 + np.float32(-8.60467152213735e-11)
    p = p * v2 + np.float32(5.12229709037114e-08)
    p = p * v2 + np.float32(1.48572235717979e-05)
    p = p * v2 + np.float32(6.37261928875436e-04)
    p = p * v2 + np.float32(4.89352455891786e-03)
    p = p * v
    q = np.float32(1.19825839466702e-06)
    q = q * v2 + np.float32(1.18534705686654e-04)
    q = q * v2 + np.float32(2.26843463243900e-03)
    q = q * v2 + np.float32(4.89352518554385e-03)
    return p / q


@sized_kernel
def tanh_forward_approx_cpu(x, y):
    for i in prange(x.size):
        y[i] = tanh_approx(x[i])


@sized_kernel
def tanh_forward_exact_cpu(x, y):
    for i in prange(x.size):
        y[i] = math.tanh(x[i])


@sized_kernel
def tanh_backward_cpu(y, dy, dx):
    for i in prange(y.size):
        dx[i] = dy[i] * (1.0 - y[i] * y[i])


@cuda_kernel
def tanh_forward_cuda(x, y):
    for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        y[i] = math.tanh(x[i])


@cuda_kernel
def tanh_backward_cuda(y, dy, dx):
    for i in range(cuda.grid(1), y.size, cuda.gridsize(1)):
        dx[i] = dy[i] * (1.0 - y[i] * y[i])


class Tanh(Elementwise):
    saves = "y"

    def _forward_cpu(self, x, y):
        if self.dtype == np.float32:
            tanh_forward_approx_cpu(x.size, x, y)
        else:
            tanh_forward_exact_cpu(x.size, x, y)

    def _backward_cpu(self, y, dy, dx):
        tanh_backward_cpu(y.size, y, dy, dx)

    def _forward_cuda(self, x, y):
        tanh_forward_cuda.launch(x.size, x, y)

    def _backward_cuda(self, y, dy, dx):
        tanh_backward_cuda.launch(y.size, y, dy, dx)


@hookimpl
def rabbit_layers():
    return {"ReLU": ReLU, "Tanh": Tanh}
