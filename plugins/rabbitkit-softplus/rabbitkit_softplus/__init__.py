"""rabbitkit-softplus: a Softplus activation layer and a LeCun-normal initializer.

Registered through the ``rabbitkit`` entry-point group (see setup.cfg), with the
same hooks rabbitkit's built-ins use.
"""
import math

import numpy as np
from numba import prange

from rabbitkit import hookimpl
from rabbitkit.backend.cpu import sized_kernel
from rabbitkit.backend.cuda import cuda_kernel, device_pair
from rabbitkit.layers import Layer, fans

cuda = None  # numba.cuda, bound by rabbitkit on the first CUDA launch


# The math once; rabbitkit builds it for the CPU kernels and the CUDA kernels alike.
def _softplus(i, x, y, beta):
    z = beta * x[i]
    # log(1 + e^z) without overflow: max(z, 0) + log1p(e^-|z|)
    y[i] = (max(z, 0.0) + math.log1p(math.exp(-abs(z)))) / beta


def _softplus_grad(i, x, dy, dx, beta):
    z = beta * x[i]  # dy/dx = sigmoid(beta x), computed without overflow on either side
    if z >= 0:
        s = 1.0 / (1.0 + math.exp(-z))
    else:
        e = math.exp(z)
        s = e / (1.0 + e)
    dx[i] = dy[i] * s


softplus_cpu, softplus_cuda = device_pair(_softplus)
softplus_grad_cpu, softplus_grad_cuda = device_pair(_softplus_grad)


@sized_kernel
def softplus_forward_cpu(x, y, beta):
    for i in prange(x.size):
        softplus_cpu(i, x, y, beta)


@sized_kernel
def softplus_backward_cpu(x, dy, dx, beta):
    for i in prange(x.size):
        softplus_grad_cpu(i, x, dy, dx, beta)


@cuda_kernel
def softplus_forward_cuda(x, y, beta):
    for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        softplus_cuda(i, x, y, beta)


@cuda_kernel
def softplus_backward_cuda(x, dy, dx, beta):
    for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        softplus_grad_cuda(i, x, dy, dx, beta)


class Softplus(Layer):
    """Smooth ReLU: y = log(1 + exp(beta * x)) / beta; dy/dx = sigmoid(beta * x)."""

    def __init__(self, beta: float = 1.0, dtype=np.float32):
        super().__init__(dtype)
        if beta <= 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        self.beta = float(beta)

    def forward_cpu(self, x, training):
        self._x = x
        y = np.empty_like(x)
        softplus_forward_cpu(x.size, x.reshape(-1), y.reshape(-1), self.dtype.type(self.beta))
        return y

    def backward_cpu(self, dy):
        dx = np.empty_like(dy)
        softplus_backward_cpu(dy.size, self._x.reshape(-1), dy.reshape(-1), dx.reshape(-1), self.dtype.type(self.beta))
        return dx

    def forward_cuda(self, x, training):
        self._x = x
        y = self.backend.empty(x.shape, self.dtype)
        softplus_forward_cuda.launch(x.size, x.reshape(x.size), y.reshape(y.size), self.dtype.type(self.beta))
        return y

    def backward_cuda(self, dy):
        dx = self.backend.empty(dy.shape, self.dtype)
        softplus_backward_cuda.launch(dy.size, self._x.reshape(dy.size), dy.reshape(dy.size), dx.reshape(dx.size),
                                      self.dtype.type(self.beta))
        return dx

    def output_shape(self, input_shape):
        return tuple(input_shape)

    def extra_repr(self):
        return f"beta={self.beta}"


def lecun_normal(shape, rng, dtype=np.float32, gain: float = 1.0):
    """Normal with standard deviation gain / sqrt(fan_in) (LeCun et al. 1998)."""
    fan_in, _ = fans(shape)
    return (rng.standard_normal(shape) * (gain / math.sqrt(fan_in))).astype(dtype)


@hookimpl
def rabbit_layers():
    return {"Softplus": Softplus}


@hookimpl
def rabbit_initializers():
    return {"lecun_normal": lecun_normal}
