"""Dense (fully connected) layer: y = x W^T + b, with its CPU and CUDA kernels.

Inputs may carry leading axes beyond the batch, e.g. (N, T, F) for a
time-distributed dense layer; they are flattened into rows for one matrix product.
"""
import math

import numpy as np
from numba import prange

from ..backend.cpu import kernel, matmul, sized_kernel
from ..backend.cuda import cuda_kernel
from ..hookspecs import hookimpl
from .base import Layer

cuda = None  # numba.cuda, bound on the first CUDA launch


# -- CPU kernels ----------------------------------------------------------------
@sized_kernel
def add_row_vector_cpu(y, b):
    """y[i, :] += b for every row (bias add)."""
    rows, cols = y.shape
    for i in prange(rows):
        for j in range(cols):
            y[i, j] += b[j]


@kernel(parallel=False)
def add_column_sums_cpu(dy, db):
    """db += dy.sum(axis=0) (serial: a parallel split over rows would race on db)."""
    rows, cols = dy.shape
    for i in range(rows):
        for j in range(cols):
            db[j] += dy[i, j]


# -- CUDA kernels ---------------------------------------------------------------
@cuda_kernel
def add_row_vector_cuda(y, b):
    cols = y.shape[1]
    for k in range(cuda.grid(1), y.size, cuda.gridsize(1)):
        i = k // cols
        j = k - i * cols
        y[i, j] += b[j]


@cuda_kernel
def add_column_sums_cuda(dy, db):
    rows = dy.shape[0]
    for j in range(cuda.grid(1), dy.shape[1], cuda.gridsize(1)):
        acc = 0.0
        for i in range(rows):
            acc += dy[i, j]
        db[j] += acc


class Dense(Layer):
    """Fully connected layer; ``weight`` is (out_features, in_features) as in PyTorch."""

    skips_frozen_grads = True  # both backward paths skip the weight product of a frozen layer

    def __init__(self, in_features, out_features, bias=True, dtype=np.float32):
        super().__init__(dtype)
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.has_bias = bool(bias)
        bound = 1.0 / math.sqrt(self.in_features)  # PyTorch's default; runs re-initialise by name
        self.add_param("weight", self.rng.uniform(-bound, bound, (self.out_features, self.in_features)))
        if self.has_bias:
            self.add_param("bias", self.rng.uniform(-bound, bound, self.out_features), role="bias")

    def _rows(self, x):
        return x.reshape(-1, self.in_features)

    def forward_cpu(self, x, training):
        self._x = x
        x2 = self._rows(x)
        y = matmul(x2, self.params["weight"].T)
        if self.has_bias:
            add_row_vector_cpu(y.size, y, self.params["bias"])
        return y.reshape(*x.shape[:-1], self.out_features)

    def backward_cpu(self, dy):
        x2 = self._rows(self._x)
        dy2 = dy.reshape(-1, self.out_features)
        if self.weight_grads_wanted:
            matmul(dy2.T, x2, self.grads["weight"], accumulate=not self.grads_zeroed)
            self.grads_zeroed = False
            if self.has_bias:
                add_column_sums_cpu(dy2, self.grads["bias"])
        if not self.needs_input_grad:
            return None
        dx = matmul(dy2, self.params["weight"])
        return dx.reshape(self._x.shape)

    def forward_cuda(self, x, training):
        self._x = x
        x2 = self._rows(x)
        y = self.backend.empty((x2.shape[0], self.out_features), self.dtype)
        self.backend.gemm(x2, self.params["weight"], y, trans_b=True)
        if self.has_bias:
            add_row_vector_cuda.launch(y.size, y, self.params["bias"])
        return y.reshape(*x.shape[:-1], self.out_features)

    def backward_cuda(self, dy):
        x2 = self._rows(self._x)
        dy2 = dy.reshape(-1, self.out_features)
        if self.weight_grads_wanted:
            self.backend.gemm(dy2, x2, self.grads["weight"], trans_a=True, beta=1.0)
            if self.has_bias:
                add_column_sums_cuda.launch(self.out_features, dy2, self.grads["bias"])
        if not self.needs_input_grad:
            return None
        dx = self.backend.empty((dy2.shape[0], self.in_features), self.dtype)
        self.backend.gemm(dy2, self.params["weight"], dx)
        return dx.reshape(self._x.shape)

    def output_shape(self, input_shape):
        return (*input_shape[:-1], self.out_features)

    def flops(self, input_shape):
        rows = math.prod(input_shape[:-1])
        return 2 * rows * self.in_features * self.out_features

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, bias={self.has_bias}"


@hookimpl
def rabbit_layers():
    return {"Dense": Dense}
