"""Regularizers: L2 weight decay, L1 and max-norm, acting on role-"weight" parameters.

A regularizer has three hooks the trainer calls around each step:

* ``penalty(params) -> float``: the term added to the reported loss;
* ``add_gradients(params)``: adds the penalty's gradient into the parameters'
  gradients in place (after backward, before the optimizer step);
* ``after_step(params)``: a constraint applied after the optimizer step
  (only max-norm has one).

``params`` is ``model.parameters()``; biases, normalisation scales and other
roles are never touched.  Kernels run on the parameters' device.
"""
import math

from numba import prange

from .backend.cpu import sized_kernel
from .backend.cuda import cuda_kernel, device_pair
from .errors import ConfigError
from .hookspecs import hookimpl

cuda = None  # numba.cuda, bound on the first CUDA launch

__all__ = ["Regularizer", "L2", "L1", "MaxNorm", "squared_norm"]


# -- CPU kernels (flat arrays) --------------------------------------------------
@sized_kernel
def penalty_sum_cpu(w, absolute):
    """sum |w| (absolute) or sum w^2, accumulated in float64."""
    total = 0.0
    for i in prange(w.size):
        total += abs(w[i]) if absolute else w[i] * w[i]
    return total


# -- the per-element and per-row rules, written once for both devices ----------------
def _penalty_gradient(i, grad, w, strength, absolute):
    """grad += strength * sign(w) (L1; sign(0) = 0) or grad += strength * w (L2)."""
    if absolute:
        grad[i] += strength * (1.0 if w[i] > 0 else (-1.0 if w[i] < 0 else 0.0))
    else:
        grad[i] += strength * w[i]


def _max_norm_row(r, w, max_value):
    """Rescale row r of (units, fan_in) onto the ball of radius max_value if it is outside."""
    total = 0.0
    for j in range(w.shape[1]):
        total += w[r, j] * w[r, j]
    norm = math.sqrt(total)
    if norm > max_value:
        factor = max_value / norm
        for j in range(w.shape[1]):
            w[r, j] *= factor


penalty_gradient_cpu, penalty_gradient_cuda = device_pair(_penalty_gradient)
max_norm_row_cpu, max_norm_row_cuda = device_pair(_max_norm_row)


@sized_kernel
def add_penalty_gradient_cpu(grad, w, strength, absolute):
    for i in prange(w.size):
        penalty_gradient_cpu(i, grad, w, strength, absolute)


@sized_kernel
def max_norm_rows_cpu(w, max_value):
    for r in prange(w.shape[0]):
        max_norm_row_cpu(r, w, max_value)


# -- CUDA kernels ---------------------------------------------------------------
@cuda_kernel
def add_penalty_gradient_cuda(grad, w, strength, absolute):
    for i in range(cuda.grid(1), w.size, cuda.gridsize(1)):
        penalty_gradient_cuda(i, grad, w, strength, absolute)


@cuda_kernel
def max_norm_rows_cuda(w, max_value):
    for r in range(cuda.grid(1), w.shape[0], cuda.gridsize(1)):
        max_norm_row_cuda(r, w, max_value)


_sum_abs_cuda = None


def _flat(array):
    return array.reshape(array.size)


def squared_norm(array, backend):
    """sum(array**2) as a Python float, on the array's device (float64 accumulation)."""
    if backend.name == "cuda":
        from .backend.cuda import global_sum_squares

        return float(global_sum_squares([array]).copy_to_host()[0])  # ordered, no atomics
    return float(penalty_sum_cpu(array.size, _flat(array), False))


def absolute_sum(array, backend):
    """sum(|array|) as a Python float, on the array's device."""
    global _sum_abs_cuda
    if backend.name == "cuda":
        if _sum_abs_cuda is None:
            # |a| + |b| is associative, and partial sums are already >= 0.
            _sum_abs_cuda = backend.cuda.reduce(lambda a, b: abs(a) + abs(b))
        return float(_sum_abs_cuda(_flat(array)))
    return float(penalty_sum_cpu(array.size, _flat(array), True))


def _weights(params):
    return [p for p in params if p.role == "weight"]


class Regularizer:
    """Base class: no penalty, no gradient, no constraint (subclasses override)."""

    def penalty(self, params):
        """The regularisation term for the reported loss (0 for constraints)."""
        return 0.0

    def add_gradients(self, params):
        """Add the penalty's gradient into each weight's gradient, in place."""

    def after_step(self, params):
        """Apply a constraint to the weights after an optimizer step."""


class _NormPenalty(Regularizer):
    """Shared by L2 and L1: ``strength`` times a norm of every weight."""

    absolute = False

    def __init__(self, strength=1e-4):
        if strength < 0:
            raise ConfigError(f"{type(self).__name__} strength must be >= 0, got {strength}")
        self.strength = float(strength)

    def add_gradients(self, params):
        for p in _weights(params):
            if p.backend.name == "cuda":
                add_penalty_gradient_cuda.launch(p.value.size, _flat(p.grad), _flat(p.value), self.strength,
                                                 self.absolute)
            else:
                add_penalty_gradient_cpu(p.value.size, _flat(p.grad), _flat(p.value), self.strength, self.absolute)

    def __repr__(self):
        return f"{type(self).__name__}(strength={self.strength})"


class L2(_NormPenalty):
    """L2 weight decay: penalty lambda/2 * ||w||^2, gradient lambda * w."""

    def penalty(self, params):
        return 0.5 * self.strength * sum(squared_norm(p.value, p.backend) for p in _weights(params))


class L1(_NormPenalty):
    """L1 (sparsity): penalty lambda * sum |w|, subgradient lambda * sign(w) (0 at 0)."""

    absolute = True

    def penalty(self, params):
        return self.strength * sum(absolute_sum(p.value, p.backend) for p in _weights(params))


class MaxNorm(Regularizer):
    """Max-norm constraint (Srebro et al.; used with dropout by Hinton et al.).

    After each optimizer step, every output unit's incoming weight vector (a row
    of the weight flattened to (shape[0], -1)) with L2 norm above ``max_value``
    is rescaled onto the ball of radius ``max_value``.
    """

    def __init__(self, max_value=3.0):
        if max_value <= 0:
            raise ConfigError(f"MaxNorm max_value must be > 0, got {max_value}")
        self.max_value = float(max_value)

    def after_step(self, params):
        for p in _weights(params):
            rows = p.value.shape[0]
            cols = p.value.size // rows if rows else 0
            if p.backend.name == "cuda":
                max_norm_rows_cuda.launch(rows, p.value.reshape(rows, cols), self.max_value)
            else:
                max_norm_rows_cpu(p.value.size, p.value.reshape(rows, cols), self.max_value)

    def __repr__(self):
        return f"MaxNorm(max_value={self.max_value})"


@hookimpl
def rabbit_regularizers():
    return {"l2": L2, "l1": L1, "max_norm": MaxNorm}
