"""Weight initializers (built-in plugins) and :func:`initialize` for a whole model.

Every initializer has the signature ``init(shape, rng, dtype, **options)`` and
returns a new numpy array; ``rng`` is a ``numpy.random.Generator``.  Fans follow
:func:`rabbitkit.layers.fans` (PyTorch/Caffe layout (out, in, *kernel)):

* ``xavier_uniform`` / ``xavier_normal`` (Glorot & Bengio 2010): variance
  gain^2 * 2 / (fan_in + fan_out);
* ``msr`` (He et al. 2015): normal with variance 2 / ((1 + a^2) * fan), ``a`` the
  negative slope of a leaky ReLU / PReLU, ``fan`` the fan-in (or fan-out);
* ``orthogonal_qr`` / ``orthogonal_svd`` (Saxe et al. 2014): the weight
  flattened to (shape[0], prod(rest)) has orthonormal rows (or columns, when
  it is tall), times ``gain``;
* ``zeros``, ``constant(value)``, ``normal(mean, std)``, ``uniform(low, high)``.
"""
import fnmatch
import inspect
import math

import numpy as np

from . import random as rk_random
from .errors import ConfigError, PluginError
from .hookspecs import hookimpl
from .layers.base import fans

__all__ = [
    "xavier_uniform", "xavier_normal", "msr", "orthogonal_qr", "orthogonal_svd",
    "zeros", "constant", "normal", "uniform", "initialize",
]


def xavier_uniform(shape, rng, dtype=np.float32, gain=1.0):
    """Glorot uniform: U(-b, b) with b = gain * sqrt(6 / (fan_in + fan_out))."""
    fan_in, fan_out = fans(shape)
    bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-bound, bound, size=shape).astype(dtype)


def xavier_normal(shape, rng, dtype=np.float32, gain=1.0):
    """Glorot normal: N(0, std^2) with std = gain * sqrt(2 / (fan_in + fan_out))."""
    fan_in, fan_out = fans(shape)
    std = gain * math.sqrt(2.0 / (fan_in + fan_out))
    return rng.normal(0.0, std, size=shape).astype(dtype)


def msr(shape, rng, dtype=np.float32, mode="fan_in", negative_slope=0.0):
    """He et al. (MSR): N(0, 2 / ((1 + a^2) fan)), a = ``negative_slope`` (0 for ReLU).

    ``mode="fan_in"`` preserves the forward signal's variance, ``"fan_out"`` the
    backward one's.
    """
    fan_in, fan_out = fans(shape)
    if mode not in ("fan_in", "fan_out"):
        raise ConfigError(f"msr mode must be 'fan_in' or 'fan_out', got '{mode}'")
    fan = fan_in if mode == "fan_in" else fan_out
    std = math.sqrt(2.0 / ((1.0 + negative_slope**2) * fan))
    return rng.normal(0.0, std, size=shape).astype(dtype)


def _flat_shape(shape, name):
    if len(shape) < 2:
        raise ConfigError(f"{name} needs a weight with at least 2 dimensions, got shape {tuple(shape)}")
    return shape[0], math.prod(shape[1:])


def orthogonal_qr(shape, rng, dtype=np.float32, gain=1.0):
    """Orthogonal via QR of a Gaussian matrix, signs fixed by diag(R) (uniform over O(n)).

    Without the sign correction numpy's QR is biased (Mezzadri 2007); PyTorch's
    ``orthogonal_`` applies the same correction.
    """
    rows, cols = _flat_shape(shape, "orthogonal_qr")
    a = rng.standard_normal((rows, cols))
    if rows < cols:
        a = a.T
    q, r = np.linalg.qr(a)
    q *= np.sign(np.diag(r))
    if rows < cols:
        q = q.T
    return (gain * q).reshape(shape).astype(dtype)


def orthogonal_svd(shape, rng, dtype=np.float32, gain=1.0):
    """Orthogonal via the SVD A = U S V^T of a Gaussian matrix (Saxe et al. 2014).

    Returns the polar factor U V^T, which has the flattened shape whether the
    weight is wide or tall.  Taking U or V^T alone (as Lasagne does) inherits
    LAPACK's sign convention and is biased; U V^T is uniformly distributed.
    """
    rows, cols = _flat_shape(shape, "orthogonal_svd")
    a = rng.standard_normal((rows, cols))
    u, _, vt = np.linalg.svd(a, full_matrices=False)
    return (gain * (u @ vt)).reshape(shape).astype(dtype)


def zeros(shape, rng, dtype=np.float32):
    """All zeros."""
    return np.zeros(shape, dtype=dtype)


def constant(shape, rng, dtype=np.float32, value=0.0):
    """Every entry ``value``."""
    return np.full(shape, value, dtype=dtype)


def normal(shape, rng, dtype=np.float32, mean=0.0, std=0.01):
    """N(mean, std^2)."""
    return rng.normal(mean, std, size=shape).astype(dtype)


def uniform(shape, rng, dtype=np.float32, low=-0.05, high=0.05):
    """U(low, high)."""
    return rng.uniform(low, high, size=shape).astype(dtype)


def resolve(spec):
    """(name, init function, options) from ``"name"`` or ``{"name": ..., **options}``.

    Unknown names raise :class:`PluginError` with a did-you-mean (from the
    registry); options the initializer does not take raise :class:`ConfigError`.
    """
    from .plugins import registry

    if isinstance(spec, str):
        name, options = spec, {}
    elif isinstance(spec, dict) and isinstance(spec.get("name"), str):
        options = dict(spec)
        name = options.pop("name")
    else:
        raise ConfigError(f"an initializer is a name or a table with a 'name' key, got {spec!r}")
    init = registry("initializers").get(name)
    try:
        inspect.signature(init).bind((1, 1), None, np.float32, **options)
    except TypeError as err:
        raise ConfigError(f"initializer '{name}': {err}") from None
    return name, init, options


def initialize(model, default="msr", overrides=None, rng=None, bias=0.0):
    """Re-initialise a model's parameters in place.

    * every parameter with role ``"weight"`` gets ``default`` (a name or a
      ``{"name": ..., **options}`` table);
    * ``overrides`` maps fnmatch patterns over parameter names (``"0.weight"``,
      ``"*.weight_hh*"``) to initializer specs; for a parameter with role
      "weight" or "bias" the first matching pattern (in the order given) wins
      over the default; a pattern that matches no such parameter is an error
      (it is likely a typo);
    * parameters with role ``"bias"`` are set to the constant ``bias``;
    * ``default=None`` leaves every parameter no override matches as the layer
      initialised it (weights and biases alike);
    * other roles (normalisation scales, PReLU slopes) are left untouched.

    ``rng`` is a ``numpy.random.Generator``, an integer seed, or None for the
    stream seeded by :func:`rabbitkit.manual_seed`.  Returns the model.
    """
    if rng is None:
        rng = rk_random.layer_rng()
    elif not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    default_spec = None if default is None else resolve(default)
    resolved = [(pattern, resolve(spec)) for pattern, spec in (overrides or {}).items()]
    plan = []  # (name, layer, key, init, options), checked in full before anything changes
    used = set()
    for name, layer, key in model.named_parameters():
        role = layer.param_roles[key]
        if role not in ("weight", "bias"):
            continue
        match = next(((pattern, r) for pattern, r in resolved if fnmatch.fnmatchcase(name, pattern)), None)
        if match is not None:
            used.add(match[0])
            _, init, options = match[1]
        elif default_spec is None:  # no default: the layer's own initialisation stays
            continue
        elif role == "weight":
            _, init, options = default_spec
        else:
            init, options = constant, {"value": bias}
        plan.append((name, layer, key, init, options))
    unused = [pattern for pattern, _ in resolved if pattern not in used]
    if unused:
        names = [name for name, _, _ in model.named_parameters()]
        raise ConfigError(f"initializer override(s) {unused} match no weight or bias; parameters: {names}")
    for name, layer, key, init, options in plan:
        target = layer.params[key]
        shape = tuple(target.shape)
        value = np.asarray(init(shape, rng, layer.dtype, **options), dtype=layer.dtype)
        if value.shape != shape:
            raise PluginError(f"initializer for '{name}' returned shape {value.shape}, expected {shape}")
        layer.backend.copy_into(target, value)
    return model


@hookimpl
def rabbit_initializers():
    return {
        "xavier_uniform": xavier_uniform,
        "xavier_normal": xavier_normal,
        "orthogonal_qr": orthogonal_qr,
        "orthogonal_svd": orthogonal_svd,
        "msr": msr,
        "zeros": zeros,
        "constant": constant,
        "normal": normal,
        "uniform": uniform,
    }
