"""Optimizers (SGD with momentum/Nesterov, RMSprop, Adam) and global-norm clipping.

Each follows PyTorch's update rule and defaults, so runs compare one to one,
with one deliberate difference: ``weight_decay`` (wd * w added to the gradient,
PyTorch's coupled L2 form) acts on parameters with role ``"weight"`` only.
Biases, normalisation scales and PReLU slopes are not decayed.

Usage::

    opt = registry("optimizers").get("adam")(model.parameters(), lr=1e-3)
    model.zero_grad(); model.backward(loss.backward()); opt.step()

``opt.lr`` is a plain attribute a schedule may change between steps.  Each step
runs one fused kernel per parameter (weight decay, state update and parameter
update in one pass) on the parameter's device.  Create the optimizer after
moving the model to its device: it keeps the parameter arrays it was given.
"""
import math

import numpy as np
from numba import prange

from .backend.cpu import sized_kernel
from .backend.cuda import cuda_kernel, device_pair
from .errors import CheckpointError, ConfigError
from .hookspecs import hookimpl
from .regularizers import squared_norm

cuda = None  # numba.cuda, bound on the first CUDA launch

__all__ = ["Optimizer", "SGD", "RMSprop", "Adam", "clip_grad_norm"]


# -- the update rules, written once for both devices ------------------------------
# Each updates element i of a flat parameter in place; hyperparameters are scalars.
def _sgd_update(i, w, g, buf, lr, decay, momentum, dampening, nesterov, first):
    d = g[i] + decay * w[i]
    if momentum != 0.0:
        b = d if first else momentum * buf[i] + (1.0 - dampening) * d
        buf[i] = b
        d = d + momentum * b if nesterov else b
    w[i] -= lr * d


def _rmsprop_update(i, w, g, square_avg, buf, lr, decay, alpha, eps, momentum):
    d = g[i] + decay * w[i]
    s = alpha * square_avg[i] + (1.0 - alpha) * d * d
    square_avg[i] = s
    d = d / (math.sqrt(s) + eps)
    if momentum > 0.0:
        d = momentum * buf[i] + d
        buf[i] = d
    w[i] -= lr * d


def _adam_update(i, w, g, exp_avg, exp_avg_sq, step_size, decay, beta1, beta2, eps, bias_correction2_sqrt):
    d = g[i] + decay * w[i]
    m = beta1 * exp_avg[i] + (1.0 - beta1) * d
    v = beta2 * exp_avg_sq[i] + (1.0 - beta2) * d * d
    exp_avg[i] = m
    exp_avg_sq[i] = v
    w[i] -= step_size * m / (math.sqrt(v) / bias_correction2_sqrt + eps)


sgd_update_cpu, sgd_update_cuda = device_pair(_sgd_update)
rmsprop_update_cpu, rmsprop_update_cuda = device_pair(_rmsprop_update)
adam_update_cpu, adam_update_cuda = device_pair(_adam_update)


# -- CPU kernels (prange over the flat parameter) -----------------------------------
@sized_kernel
def sgd_cpu(w, g, buf, lr, decay, momentum, dampening, nesterov, first):
    for i in prange(w.size):
        sgd_update_cpu(i, w, g, buf, lr, decay, momentum, dampening, nesterov, first)


@sized_kernel
def rmsprop_cpu(w, g, square_avg, buf, lr, decay, alpha, eps, momentum):
    for i in prange(w.size):
        rmsprop_update_cpu(i, w, g, square_avg, buf, lr, decay, alpha, eps, momentum)


@sized_kernel
def adam_cpu(w, g, exp_avg, exp_avg_sq, step_size, decay, beta1, beta2, eps, bias_correction2_sqrt):
    for i in prange(w.size):
        adam_update_cpu(i, w, g, exp_avg, exp_avg_sq, step_size, decay, beta1, beta2, eps, bias_correction2_sqrt)


# -- CUDA kernels (grid-stride over the flat parameter) --------------------------------
@cuda_kernel
def sgd_cuda(w, g, buf, lr, decay, momentum, dampening, nesterov, first):
    for i in range(cuda.grid(1), w.size, cuda.gridsize(1)):
        sgd_update_cuda(i, w, g, buf, lr, decay, momentum, dampening, nesterov, first)


@cuda_kernel
def rmsprop_cuda(w, g, square_avg, buf, lr, decay, alpha, eps, momentum):
    for i in range(cuda.grid(1), w.size, cuda.gridsize(1)):
        rmsprop_update_cuda(i, w, g, square_avg, buf, lr, decay, alpha, eps, momentum)


@cuda_kernel
def adam_cuda(w, g, exp_avg, exp_avg_sq, step_size, decay, beta1, beta2, eps, bias_correction2_sqrt):
    for i in range(cuda.grid(1), w.size, cuda.gridsize(1)):
        adam_update_cuda(i, w, g, exp_avg, exp_avg_sq, step_size, decay, beta1, beta2, eps, bias_correction2_sqrt)


def _flat(array):
    return array.reshape(array.size)


class Optimizer:
    """Base class: per-parameter state buffers, a step counter, state dicts.

    Subclasses list their state buffers in ``buffer_names()`` (zero-initialised,
    shaped like the parameter, on its device), pick their kernels in
    ``kernels`` = (CPU, CUDA), and give the scalar arguments of one step in
    ``hyper()``; every kernel is called as ``(w, g, *buffers, lr, decay, *hyper)``.
    """

    kernels = None

    def __init__(self, params, lr, weight_decay=0.0):
        self.params = list(params)
        for param in self.params:
            if not hasattr(param, "grad") or not hasattr(param, "role"):
                raise ConfigError(
                    f"{type(self).__name__} needs model.parameters() (Param tuples), got {type(param).__name__}"
                )
        if lr < 0 or weight_decay < 0:
            raise ConfigError(f"{type(self).__name__}: lr and weight_decay must be >= 0, got {lr} and {weight_decay}")
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.steps = 0
        self.state = []  # per parameter: {buffer name: array}
        self._work = []  # per parameter: (size, is_cuda, flat value, flat grad, flat buffers, decays)
        for param in self.params:
            buffers = {name: param.backend.zeros(param.value.shape, param.value.dtype) for name in self.buffer_names()}
            self.state.append(buffers)
            flat_buffers = tuple(_flat(b) for b in buffers.values())
            if len(flat_buffers) < self.buffer_count:  # unused slots (momentum 0) get an empty array
                flat_buffers += (param.backend.zeros((0,), param.value.dtype),) * (self.buffer_count - len(flat_buffers))
            decays = param.role == "weight"
            self._work.append((param.value.size, param.backend.name == "cuda", _flat(param.value), _flat(param.grad),
                               flat_buffers, decays))

    buffer_count = 0  # buffer arguments every kernel call takes

    def buffer_names(self):
        return ()

    def hyper(self):
        """Scalar arguments after (lr, decay) for this step."""
        return ()

    def step(self):
        """Update every parameter in place from its gradient (one fused kernel each)."""
        self.steps += 1
        cpu_kernel, cuda_kernel_ = self.kernels
        lr, hyper = self._step_scalars()
        weight_decay = self.weight_decay
        for size, is_cuda, value, grad, buffers, decays in self._work:
            decay = weight_decay if decays else 0.0
            if is_cuda:
                cuda_kernel_.launch(size, value, grad, *buffers, lr, decay, *hyper)
            else:
                cpu_kernel(size, value, grad, *buffers, lr, decay, *hyper)

    def _step_scalars(self):
        return self.lr, self.hyper()

    def zero_grad(self):
        """Set every parameter's gradient to zero."""
        for param in self.params:
            param.backend.fill(param.grad, 0)

    # -- checkpoints ------------------------------------------------------------
    def state_dict(self):
        """Host numpy arrays by name: ``"step"`` (shape (1,)) and ``"<param>.<buffer>"``."""
        state = {"step": np.array([self.steps], dtype=np.int64)}
        for param, buffers in zip(self.params, self.state):
            for name, array in buffers.items():
                state[f"{param.name}.{name}"] = np.array(param.backend.to_host(array))
        return state

    def load_state_dict(self, state):
        """Restore buffers and the step count saved by :meth:`state_dict`."""
        expected = {"step"} | {f"{p.name}.{n}" for p, buffers in zip(self.params, self.state) for n in buffers}
        missing = sorted(expected - set(state))
        unexpected = sorted(set(state) - expected)
        if missing or unexpected:
            raise CheckpointError(
                f"optimizer state does not match {type(self).__name__}: missing {missing or 'none'}, "
                f"unexpected {unexpected or 'none'}"
            )
        for param, buffers in zip(self.params, self.state):
            for name, array in buffers.items():
                value = np.asarray(state[f"{param.name}.{name}"])
                if value.shape != tuple(array.shape):
                    raise CheckpointError(
                        f"optimizer state '{param.name}.{name}' has shape {value.shape}, expected {tuple(array.shape)}"
                    )
                param.backend.copy_into(array, value.astype(array.dtype, copy=False))
        self.steps = int(np.asarray(state["step"]).reshape(-1)[0])

    def __repr__(self):
        return f"{type(self).__name__}(lr={self.lr}, weight_decay={self.weight_decay})"


class SGD(Optimizer):
    """Stochastic gradient descent with optional momentum and Nesterov momentum.

    PyTorch's rule: d = g + wd*w; with momentum, b = d on the first step and
    b = momentum*b + (1 - dampening)*d after; d = d + momentum*b (Nesterov) or b;
    w -= lr*d.  State buffer ``momentum`` when momentum != 0.
    """

    kernels = (sgd_cpu, sgd_cuda)
    buffer_count = 1

    def __init__(self, params, lr=0.01, weight_decay=0.0, momentum=0.0, dampening=0.0, nesterov=False):
        self.momentum = float(momentum)
        self.dampening = float(dampening)
        self.nesterov = bool(nesterov)
        if nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ConfigError("SGD: nesterov needs momentum > 0 and dampening = 0")
        super().__init__(params, lr, weight_decay)

    def buffer_names(self):
        return ("momentum",) if self.momentum != 0 else ()

    def hyper(self):
        return (self.momentum, self.dampening, self.nesterov, self.steps == 1)


class RMSprop(Optimizer):
    """RMSprop (Hinton), PyTorch's non-centred rule and defaults.

    s = alpha*s + (1 - alpha)*d^2 with d = g + wd*w; u = d / (sqrt(s) + eps);
    with momentum b = momentum*b + u and w -= lr*b, else w -= lr*u.  State
    buffers ``square_avg`` and (momentum > 0) ``momentum``.
    """

    kernels = (rmsprop_cpu, rmsprop_cuda)
    buffer_count = 2

    def __init__(self, params, lr=0.01, weight_decay=0.0, alpha=0.99, eps=1e-8, momentum=0.0):
        self.alpha = float(alpha)
        self.eps = float(eps)
        self.momentum = float(momentum)
        super().__init__(params, lr, weight_decay)

    def buffer_names(self):
        return ("square_avg", "momentum") if self.momentum > 0 else ("square_avg",)

    def hyper(self):
        return (self.alpha, self.eps, self.momentum)


class Adam(Optimizer):
    """Adam (Kingma & Ba) with bias correction, PyTorch's rule and defaults.

    m = b1*m + (1 - b1)*d, v = b2*v + (1 - b2)*d^2 with d = g + wd*w;
    w -= lr/(1 - b1^t) * m / (sqrt(v)/sqrt(1 - b2^t) + eps).  State buffers
    ``exp_avg`` and ``exp_avg_sq``; t is the step count.
    """

    kernels = (adam_cpu, adam_cuda)
    buffer_count = 2

    def __init__(self, params, lr=1e-3, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8):
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = float(eps)
        super().__init__(params, lr, weight_decay)

    def buffer_names(self):
        return ("exp_avg", "exp_avg_sq")

    def _step_scalars(self):
        beta1, beta2 = self.betas
        step_size = self.lr / (1.0 - beta1**self.steps)
        bias_correction2_sqrt = math.sqrt(1.0 - beta2**self.steps)
        # the kernel's "lr" slot carries the bias-corrected step size
        return step_size, (beta1, beta2, self.eps, bias_correction2_sqrt)


def clip_grad_norm(params, max_norm):
    """Scale all gradients so their global L2 norm is at most ``max_norm`` (PyTorch's rule).

    Returns the total norm before clipping; gradients are multiplied by
    max_norm / (norm + 1e-6) when that factor is below 1.
    """
    params = list(params)
    total = math.sqrt(sum(squared_norm(p.grad, p.backend) for p in params))
    factor = float(max_norm) / (total + 1e-6)
    if factor < 1.0:
        for param in params:
            if param.backend.name == "cuda":
                param.backend.scale(param.grad, factor)
            else:
                np.multiply(param.grad, param.grad.dtype.type(factor), out=param.grad)
    return total


@hookimpl
def rabbit_optimizers():
    return {"sgd": SGD, "rmsprop": RMSprop, "adam": Adam}
