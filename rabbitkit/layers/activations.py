"""Activation layers from the talk, each with its own CPU and CUDA kernels.

ReLU, LeakyReLU, PReLU (Xu et al. 2015), Tanh, Softsign, Sigmoid (Fermi),
Linear (identity) and Softmax (over the last axis).

Kernels work on flat views (one signature per dtype).  Where the derivative is a
function of the output (tanh, sigmoid, softmax) backward reads the saved output,
not the input, so no transcendental function is evaluated twice.
"""
import math

import numpy as np
from numba import prange

from ..backend.cpu import TRANSCENDENTAL_WORK, kernel, sized_kernel
from ..backend.cuda import REDUCE_THREADS, block_reduce_sum, cuda_kernel, device_pair
from ..hookspecs import hookimpl
from ..errors import ConfigError
from .base import Layer

cuda = None  # numba.cuda, bound on the first CUDA launch


class Elementwise(Layer):
    """Shared plumbing of elementwise activations: flat views, saved tensors.

    A subclass names its four flat-array kernels in ``kernels`` = (forward CPU,
    backward CPU, forward CUDA, backward CUDA), called as ``forward(x, y, *args)``
    and ``backward(saved, dy, dx, *args)`` with ``args = self.kernel_args()``, or
    overrides ``_forward_cpu`` and friends.  ``saves`` says whether backward needs
    the input ("x") or the output ("y").
    """

    saves = "x"
    kernels = None

    def kernel_args(self):
        """Extra scalar arguments of every kernel (e.g. a slope)."""
        return ()

    def _forward_cpu(self, x, y):
        self.kernels[0](x.size, x, y, *self.kernel_args())

    def _backward_cpu(self, saved, dy, dx):
        self.kernels[1](dy.size, saved, dy, dx, *self.kernel_args())

    def _forward_cuda(self, x, y):
        self.kernels[2].launch(x.size, x, y, *self.kernel_args())

    def _backward_cuda(self, saved, dy, dx):
        self.kernels[3].launch(dy.size, saved, dy, dx, *self.kernel_args())

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
    """max(0, x); the gradient at exactly 0 is taken as 0.

    ``absorbed`` (set by :class:`Sequential`): the layer before this one
    already applied the ReLU in its output pass and masks the gradient itself, so
    forward and backward pass their argument through.
    """

    kernels = (relu_forward_cpu, relu_backward_cpu, relu_forward_cuda, relu_backward_cuda)
    absorbed = False

    def forward_cpu(self, x, training):
        if self.absorbed:
            return x
        return super().forward_cpu(x, training)

    def backward_cpu(self, dy):
        if self.absorbed:
            return dy
        return super().backward_cpu(dy)

    def forward_cuda(self, x, training):
        if self.absorbed:
            return x
        return super().forward_cuda(x, training)

    def backward_cuda(self, dy):
        if self.absorbed:
            return dy
        return super().backward_cuda(dy)


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
    """tanh(x); float32 on the CPU uses a vectorisable rational approximation."""

    saves = "y"
    kernels = (tanh_forward_exact_cpu, tanh_backward_cpu, tanh_forward_cuda, tanh_backward_cuda)

    def _forward_cpu(self, x, y):
        if self.dtype == np.float32:
            tanh_forward_approx_cpu(x.size, x, y)
        else:
            tanh_forward_exact_cpu(x.size, x, y)


# -- LeakyReLU --------------------------------------------------------------------
@sized_kernel
def leaky_relu_forward_cpu(x, y, slope):
    for i in prange(x.size):
        y[i] = x[i] if x[i] > 0 else slope * x[i]


@sized_kernel
def leaky_relu_backward_cpu(x, dy, dx, slope):
    for i in prange(x.size):
        dx[i] = dy[i] if x[i] > 0 else slope * dy[i]


@cuda_kernel
def leaky_relu_forward_cuda(x, y, slope):
    for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        y[i] = x[i] if x[i] > 0 else slope * x[i]


@cuda_kernel
def leaky_relu_backward_cuda(x, dy, dx, slope):
    for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        dx[i] = dy[i] if x[i] > 0 else slope * dy[i]


class LeakyReLU(Elementwise):
    """x for x > 0, ``negative_slope * x`` otherwise (the gradient at 0 is the slope)."""

    def __init__(self, negative_slope=0.01, dtype=np.float32):
        super().__init__(dtype)
        self.negative_slope = float(negative_slope)

    kernels = (leaky_relu_forward_cpu, leaky_relu_backward_cpu, leaky_relu_forward_cuda, leaky_relu_backward_cuda)

    def kernel_args(self):
        return (self.negative_slope,)

    def extra_repr(self):
        return f"negative_slope={self.negative_slope}"


# -- PReLU --------------------------------------------------------------------------
# Kernels see the input as (batch, channels, rest); one shared slope is channels = 1.
def _prelu_grad(x, w, dy, dx, n, c, k):
    """Write dx[n, c, k]; return this entry's share of the slope gradient dw[c]."""
    v = x[n, c, k]
    if v > 0:
        dx[n, c, k] = dy[n, c, k]
        return 0.0
    dx[n, c, k] = w[c] * dy[n, c, k]
    return v * dy[n, c, k]


prelu_grad_cpu, prelu_grad_cuda = device_pair(_prelu_grad)


@sized_kernel
def prelu_forward_cpu(x, w, y):
    outer, channels, inner = x.shape
    for n in prange(outer):
        for c in range(channels):
            for k in range(inner):
                v = x[n, c, k]
                y[n, c, k] = v if v > 0 else w[c] * v


@sized_kernel
def prelu_backward_cpu(x, w, dy, dx, dw):
    """dx, and dw[c] += sum of x * dy where x <= 0 (a parallel reduction per channel)."""
    outer, channels, inner = x.shape
    for c in range(channels):
        acc = 0.0
        for n in prange(outer):
            for k in range(inner):
                acc += prelu_grad_cpu(x, w, dy, dx, n, c, k)
        dw[c] += acc


@cuda_kernel
def prelu_forward_cuda(x, w, y):
    channels = x.shape[1]
    inner = x.shape[2]
    for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        n = i // (channels * inner)
        c = (i // inner) % channels
        k = i % inner
        v = x[n, c, k]
        y[n, c, k] = v if v > 0 else w[c] * v


@cuda_kernel
def prelu_backward_cuda(x, w, dy, dx, dw):
    """One block per channel c (``launch_blocks``): its threads stride over channel c's
    entries, a fixed-order tree sums their shares of dw[c] (deterministic, no atomics)."""
    partial = cuda.shared.array(shape=REDUCE_THREADS, dtype=np.float64)
    c = cuda.blockIdx.x
    inner = x.shape[2]
    acc = np.float64(0.0)
    for j in range(cuda.threadIdx.x, x.shape[0] * inner, cuda.blockDim.x):
        n = j // inner
        acc += prelu_grad_cuda(x, w, dy, dx, n, c, j - n * inner)
    total = block_reduce_sum(partial, acc)
    if cuda.threadIdx.x == 0:
        dw[c] += total


class PReLU(Layer):
    """Parametric ReLU (Xu et al. 2015): x for x > 0, ``a * x`` otherwise, ``a`` learnt.

    ``num_parameters=1`` shares one slope; otherwise one slope per channel (axis 1,
    which must have ``num_parameters`` entries), as PyTorch's ``nn.PReLU``.  The
    slope ``weight`` has role "other": initializers and regularizers leave it alone.
    """

    def __init__(self, num_parameters=1, init=0.25, dtype=np.float32):
        super().__init__(dtype)
        self.num_parameters = int(num_parameters)
        if self.num_parameters < 1:
            raise ConfigError(f"PReLU num_parameters must be >= 1, got {num_parameters}")
        self.init = float(init)
        self.add_param("weight", np.full(self.num_parameters, self.init), role="other")

    def _view_shape(self, shape):
        """(batch, channels, rest) for the kernels."""
        if self.num_parameters == 1:
            batch = shape[0] if len(shape) else 1
            return (batch, 1, math.prod(shape) // batch if batch else 0)
        if len(shape) < 2 or shape[1] != self.num_parameters:
            raise ConfigError(
                f"PReLU(num_parameters={self.num_parameters}) needs {self.num_parameters} channels "
                f"on axis 1 of its input, got shape {tuple(shape)}"
            )
        return (shape[0], shape[1], math.prod(shape[2:]))

    def forward_cpu(self, x, training):
        self._x = x
        y = np.empty_like(x)
        view = self._view_shape(x.shape)
        prelu_forward_cpu(x.size, x.reshape(view), self.params["weight"], y.reshape(view))
        return y

    def backward_cpu(self, dy):
        x = self._x
        view = self._view_shape(x.shape)
        dx = np.empty_like(dy)
        prelu_backward_cpu(x.size, x.reshape(view), self.params["weight"], dy.reshape(view), dx.reshape(view),
                           self.grads["weight"])
        return dx

    def forward_cuda(self, x, training):
        self._x = x
        y = self.backend.empty(x.shape, self.dtype)
        view = self._view_shape(x.shape)
        prelu_forward_cuda.launch(x.size, x.reshape(*view), self.params["weight"], y.reshape(*view))
        return y

    def backward_cuda(self, dy):
        x = self._x
        view = self._view_shape(x.shape)
        dx = self.backend.empty(dy.shape, self.dtype)
        prelu_backward_cuda.launch_blocks(
            view[1], x.reshape(*view), self.params["weight"], dy.reshape(*view), dx.reshape(*view), self.grads["weight"]
        )
        return dx

    def output_shape(self, input_shape):
        return tuple(input_shape)

    def extra_repr(self):
        return f"num_parameters={self.num_parameters}"


# -- Softsign -----------------------------------------------------------------------
@sized_kernel
def softsign_forward_cpu(x, y):
    for i in prange(x.size):
        y[i] = x[i] / (1.0 + abs(x[i]))


@sized_kernel
def softsign_backward_cpu(x, dy, dx):
    for i in prange(x.size):
        d = 1.0 + abs(x[i])
        dx[i] = dy[i] / (d * d)


@cuda_kernel
def softsign_forward_cuda(x, y):
    for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        y[i] = x[i] / (1.0 + abs(x[i]))


@cuda_kernel
def softsign_backward_cuda(x, dy, dx):
    for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        d = 1.0 + abs(x[i])
        dx[i] = dy[i] / (d * d)


class Softsign(Elementwise):
    """x / (1 + |x|): a tanh-like squashing with polynomial tails."""

    kernels = (softsign_forward_cpu, softsign_backward_cpu, softsign_forward_cuda, softsign_backward_cuda)


# -- Sigmoid ------------------------------------------------------------------------
# With z = exp(-|x|) <= 1 both branches are free of overflow: 1/(1+z) for x >= 0 and
# z/(1+z) = 1/(1+exp(-x)) for x < 0, so large |x| gives exactly 0 or 1, never NaN.
@sized_kernel
def sigmoid_forward_cpu(x, y):
    for i in prange(x.size):
        z = math.exp(-abs(x[i]))
        y[i] = (1.0 if x[i] >= 0 else z) / (1.0 + z)


@sized_kernel
def sigmoid_backward_cpu(y, dy, dx):
    for i in prange(y.size):
        dx[i] = dy[i] * y[i] * (1.0 - y[i])


@cuda_kernel
def sigmoid_forward_cuda(x, y):
    for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        z = math.exp(-abs(x[i]))
        y[i] = (1.0 if x[i] >= 0 else z) / (1.0 + z)


@cuda_kernel
def sigmoid_backward_cuda(y, dy, dx):
    for i in range(cuda.grid(1), y.size, cuda.gridsize(1)):
        dx[i] = dy[i] * y[i] * (1.0 - y[i])


class Sigmoid(Elementwise):
    """The logistic (Fermi) function 1 / (1 + exp(-x)), stable for large |x|."""

    saves = "y"
    kernels = (sigmoid_forward_cpu, sigmoid_backward_cpu, sigmoid_forward_cuda, sigmoid_backward_cuda)


# -- Linear -------------------------------------------------------------------------
class Linear(Layer):
    """The identity (a linear output unit): no kernels, no copies.

    ``forward`` returns its input array itself and ``backward`` the incoming
    gradient, as PyTorch's ``nn.Identity`` does; it runs unchanged on both devices.
    """

    def forward_cpu(self, x, training):
        return x

    def backward_cpu(self, dy):
        return dy

    def forward_cuda(self, x, training):
        return x

    def backward_cuda(self, dy):
        return dy

    def output_shape(self, input_shape):
        return tuple(input_shape)


# -- Softmax ------------------------------------------------------------------------
@kernel(parallel=False)
def softmax_row(x, p):
    """p = exp(x - max(x)) for one row; returns (max(x), sum(p)) so callers get both
    the normalised softmax and log-sum-exp = max + log(sum) without overflow."""
    top = x[0]
    for j in range(1, x.size):
        top = max(top, x[j])
    total = 0.0
    for j in range(x.size):
        p[j] = math.exp(x[j] - top)
        total += p[j]
    return top, total


@sized_kernel
def softmax_forward_cpu(x, y):
    for r in prange(x.shape[0]):
        _, total = softmax_row(x[r], y[r])
        inv = 1.0 / total
        for j in range(x.shape[1]):
            y[r, j] *= inv


@sized_kernel
def softmax_backward_cpu(y, dy, dx):
    """dx = y * (dy - <dy, y>) per row: the softmax Jacobian applied without forming it."""
    for r in prange(y.shape[0]):
        dot = 0.0
        for j in range(y.shape[1]):
            dot += dy[r, j] * y[r, j]
        for j in range(y.shape[1]):
            dx[r, j] = y[r, j] * (dy[r, j] - dot)


@cuda_kernel
def softmax_rows_cuda(x, p, log_sum_exp):
    """One thread per row: p = softmax(x) and log_sum_exp[r] (used by the loss too)."""
    for r in range(cuda.grid(1), x.shape[0], cuda.gridsize(1)):
        top = x[r, 0]
        for j in range(1, x.shape[1]):
            top = max(top, x[r, j])
        total = 0.0
        for j in range(x.shape[1]):
            e = math.exp(x[r, j] - top)
            p[r, j] = e
            total += e
        inv = 1.0 / total
        for j in range(x.shape[1]):
            p[r, j] *= inv
        log_sum_exp[r] = top + math.log(total)


@cuda_kernel
def softmax_backward_cuda(y, dy, dx):
    for r in range(cuda.grid(1), y.shape[0], cuda.gridsize(1)):
        dot = 0.0
        for j in range(y.shape[1]):
            dot += dy[r, j] * y[r, j]
        for j in range(y.shape[1]):
            dx[r, j] = y[r, j] * (dy[r, j] - dot)


class Softmax(Layer):
    """Softmax over the last axis, computed stably (the row maximum is subtracted).

    For classification prefer a linear output with
    :class:`rabbitkit.losses.SoftmaxCrossEntropy`, which fuses both and is cheaper.
    """

    def _rows(self, shape):
        shape = tuple(shape)  # the simulator's shapes reject negative indices
        return (math.prod(shape[:-1]), shape[-1])

    def forward_cpu(self, x, training):
        y = np.empty_like(x)
        rows = self._rows(x.shape)
        softmax_forward_cpu(x.size * TRANSCENDENTAL_WORK, x.reshape(rows), y.reshape(rows))
        self._y = y
        return y

    def backward_cpu(self, dy):
        dx = np.empty_like(dy)
        rows = self._rows(dy.shape)
        softmax_backward_cpu(dy.size, self._y.reshape(rows), dy.reshape(rows), dx.reshape(rows))
        return dx

    def forward_cuda(self, x, training):
        rows = self._rows(x.shape)
        y = self.backend.empty(x.shape, self.dtype)
        log_sum_exp = self.backend.empty(rows[0], self.dtype)
        softmax_rows_cuda.launch(rows[0], x.reshape(*rows), y.reshape(*rows), log_sum_exp)
        self._y = y
        return y

    def backward_cuda(self, dy):
        rows = self._rows(dy.shape)
        dx = self.backend.empty(dy.shape, self.dtype)
        softmax_backward_cuda.launch(rows[0], self._y.reshape(*rows), dy.reshape(*rows), dx.reshape(*rows))
        return dx

    def output_shape(self, input_shape):
        return tuple(input_shape)


@hookimpl
def rabbit_layers():
    return {
        "ReLU": ReLU,
        "LeakyReLU": LeakyReLU,
        "PReLU": PReLU,
        "Tanh": Tanh,
        "Softsign": Softsign,
        "Sigmoid": Sigmoid,
        "Linear": Linear,
        "Softmax": Softmax,
    }
