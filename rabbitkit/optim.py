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

Per-parameter multipliers (Caffe's ``lr_mult``/``decay_mult``, PyTorch's
parameter groups): ``lr_mult={"0.0": 0.1}`` trains the parameters of layer
``0.0`` (and of every layer inside it) at a tenth of ``opt.lr``, whatever the
schedule sets ``opt.lr`` to; ``decay_mult`` likewise scales ``weight_decay``.
Patterns are shell-style over dotted layer names and parameter names
(``"features.*"``, ``"*.bias"``), as :func:`rabbitkit.layers.freeze`; the first
pattern that matches a parameter gives its factor (as ``[init] overrides``),
1 where none does, and a pattern that matches no parameter is refused::

    opt = SGD(model.parameters(), lr=0.05, momentum=0.9, lr_mult={"0.0": 0.1})
"""
import math
import numbers

import numpy as np
from numba import prange

from .backend.cpu import sized_kernel
from .backend.cuda import cuda_kernel, device_pair
from .errors import CheckpointError, ConfigError
from .hookspecs import hookimpl
from .layers.base import names_matching
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


def _scopes(param_name):
    """The names a multiplier pattern may match for one parameter: every layer holding
    it, outermost first, then the parameter itself (``"0.0.9.bias"``: ``"0"``,
    ``"0.0"``, ``"0.0.9"``, ``"0.0.9.bias"``)."""
    parts = param_name.split(".")
    return [".".join(parts[:end]) for end in range(1, len(parts) + 1)]


def _decayed(param):
    """Whether weight decay acts on a parameter (weights only: see the module docstring)."""
    return param.role == "weight"


def parameter_multipliers(params, patterns, what, acts_on=None):
    """One factor per parameter from ``patterns`` (``{pattern: factor}``).

    A pattern matches a parameter when it matches the parameter's name or the
    dotted name of a layer holding it (so a container's pattern covers everything
    inside it, as with :func:`rabbitkit.layers.freeze`); the first pattern that
    matches gives the factor, 1.0 where none does.  A pattern that matches no
    parameter in ``params`` is a :class:`ConfigError` listing the nearest names.
    ``acts_on`` = (predicate on a parameter, what the others are): a pattern that
    matches only parameters the factor has no effect on is refused too.
    """
    factors = [None] * len(params)
    scopes = [_scopes(param.name) for param in params]
    names = list(dict.fromkeys(name for scope in scopes for name in scope))
    for pattern, factor in (patterns or {}).items():
        if isinstance(factor, bool) or not isinstance(factor, numbers.Real) or not 0 <= factor < math.inf:
            raise ConfigError(f"{what} '{pattern}': expected a number >= 0, got {factor!r}")
        matched = set(names_matching(str(pattern), names, what, kind="trained layer or parameter"))
        hits = [index for index, scope in enumerate(scopes) if matched.intersection(scope)]
        if acts_on is not None and not any(acts_on[0](params[index]) for index in hits):
            raise ConfigError(f"{what} pattern '{pattern}' matches only parameters {acts_on[1]}: "
                              f"{', '.join(params[index].name for index in hits[:5])}")
        for index in hits:
            if factors[index] is None:  # the first matching pattern wins
                factors[index] = float(factor)
    return [1.0 if factor is None else factor for factor in factors]


def resolve_multipliers(params, lr_mult=None, decay_mult=None):
    """(lr factors, weight-decay factors), one each per parameter, from the two pattern tables.

    A parameter weight decay does not act on (anything but a weight) gets decay factor 0,
    and a ``decay_mult`` pattern that matches only such parameters is refused.
    """
    lr_factors = parameter_multipliers(params, lr_mult, "lr_mult")
    decay_mults = parameter_multipliers(params, decay_mult, "decay_mult",
                                        acts_on=(_decayed, "weight decay leaves alone (it decays weights only)"))
    return lr_factors, [mult if _decayed(param) else 0.0 for param, mult in zip(params, decay_mults)]


class Optimizer:
    """Base class: per-parameter state buffers, a step counter, state dicts.

    Subclasses list their state buffers in ``buffer_names()`` (zero-initialised,
    shaped like the parameter, on its device), pick their kernels in
    ``kernels`` = (CPU, CUDA), and give the scalar arguments of one step in
    ``hyper()``; every kernel is called as ``(w, g, *buffers, lr, decay, *hyper)``,
    where ``lr`` and ``decay`` are this parameter's: ``opt.lr`` times its
    ``lr_mult`` factor, ``weight_decay`` times its ``decay_mult`` factor (0 for
    parameters other than weights).  See the module docstring for the multipliers.
    """

    kernels = None

    def __init__(self, params, lr, weight_decay=0.0, lr_mult=None, decay_mult=None):
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
        self.lr_mult = dict(lr_mult or {})
        self.decay_mult = dict(decay_mult or {})
        #: per parameter (as ``params``): the factor on ``lr`` and on ``weight_decay`` (0 where it does not decay)
        self.lr_factors, self.decay_factors = resolve_multipliers(self.params, self.lr_mult, self.decay_mult)
        self.steps = 0
        self.state = []  # per parameter: {buffer name: array}
        self._work = []  # per parameter: (size, is_cuda, flat value, flat grad, flat buffers, lr factor, decay factor)
        for param, lr_factor, decay_factor in zip(self.params, self.lr_factors, self.decay_factors):
            buffers = {name: param.backend.zeros(param.value.shape, param.value.dtype) for name in self.buffer_names()}
            self.state.append(buffers)
            flat_buffers = tuple(_flat(b) for b in buffers.values())
            if len(flat_buffers) < self.buffer_count:  # unused slots (momentum 0) get an empty array
                flat_buffers += (param.backend.zeros((0,), param.value.dtype),) * (self.buffer_count - len(flat_buffers))
            self._work.append((param.value.size, param.backend.name == "cuda", _flat(param.value), _flat(param.grad),
                               flat_buffers, lr_factor, decay_factor))

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
        # Factors of 1 leave lr and decay bit for bit as they were (x * 1.0 == x).
        for size, is_cuda, value, grad, buffers, lr_factor, decay_factor in self._work:
            if is_cuda:
                cuda_kernel_.launch(size, value, grad, *buffers, lr * lr_factor, weight_decay * decay_factor, *hyper)
            else:
                cpu_kernel(size, value, grad, *buffers, lr * lr_factor, weight_decay * decay_factor, *hyper)

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
        multipliers = "".join(f", {name}={table}" for name, table in
                              (("lr_mult", self.lr_mult), ("decay_mult", self.decay_mult)) if table)
        return f"{type(self).__name__}(lr={self.lr}, weight_decay={self.weight_decay}{multipliers})"


class SGD(Optimizer):
    """Stochastic gradient descent with optional momentum and Nesterov momentum.

    PyTorch's rule: d = g + wd*w; with momentum, b = d on the first step and
    b = momentum*b + (1 - dampening)*d after; d = d + momentum*b (Nesterov) or b;
    w -= lr*d.  State buffer ``momentum`` when momentum != 0.
    """

    kernels = (sgd_cpu, sgd_cuda)
    buffer_count = 1

    def __init__(self, params, lr=0.01, weight_decay=0.0, momentum=0.0, dampening=0.0, nesterov=False,
                 lr_mult=None, decay_mult=None):
        self.momentum = float(momentum)
        self.dampening = float(dampening)
        self.nesterov = bool(nesterov)
        if nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ConfigError("SGD: nesterov needs momentum > 0 and dampening = 0")
        super().__init__(params, lr, weight_decay, lr_mult, decay_mult)

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

    def __init__(self, params, lr=0.01, weight_decay=0.0, alpha=0.99, eps=1e-8, momentum=0.0,
                 lr_mult=None, decay_mult=None):
        self.alpha = float(alpha)
        self.eps = float(eps)
        self.momentum = float(momentum)
        super().__init__(params, lr, weight_decay, lr_mult, decay_mult)

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

    def __init__(self, params, lr=1e-3, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8, lr_mult=None, decay_mult=None):
        self.betas = (float(betas[0]), float(betas[1]))
        self.eps = float(eps)
        super().__init__(params, lr, weight_decay, lr_mult, decay_mult)

    def buffer_names(self):
        return ("exp_avg", "exp_avg_sq")

    def _step_scalars(self):
        beta1, beta2 = self.betas
        step_size = self.lr / (1.0 - beta1**self.steps)
        bias_correction2_sqrt = math.sqrt(1.0 - beta2**self.steps)
        # the kernel's "lr" slot carries the bias-corrected step size (which the lr_mult factor scales as it
        # would scale lr: step_size is linear in lr)
        return step_size, (beta1, beta2, self.eps, bias_correction2_sqrt)


def clip_grad_norm(params, max_norm, return_norm=True):
    """Scale all gradients so their global L2 norm is at most ``max_norm`` (PyTorch's rule).

    Returns the total norm before clipping; gradients are multiplied by
    max_norm / (norm + 1e-6) when that factor is below 1.

    When every gradient is on the CUDA device, the norm, the factor and the scaling
    stay there (:func:`rabbitkit.backend.cuda.global_sum_squares`: block partial
    sums added in a fixed order, so the same gradients give the same bits); the norm
    then costs one scalar copy to the host, which ``return_norm=False`` skips (the
    call returns None), as the trainer does.
    """
    params = list(params)
    if params and all(p.backend.name == "cuda" for p in params):
        from .backend.cuda import global_sum_squares

        result = global_sum_squares([p.grad for p in params], float(max_norm))
        return float(result.copy_to_host()[1]) if return_norm else None
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
