"""The layer contract every built-in and plugin layer follows.

A layer holds its parameters in ``params`` and their gradients in ``grads`` (same
keys, same shapes, on the layer's device).  ``forward(x, training)`` returns the
output and keeps what ``backward`` needs; ``backward(dy)`` returns the input
gradient and *adds* the parameter gradients into ``grads`` (``zero_grad`` resets
them), as in llm.c.

A concrete layer implements ``forward_cpu``/``backward_cpu`` and, where it has
CUDA kernels, ``forward_cuda``/``backward_cuda``, all in its one file.  A layer
without CUDA kernels is refused on ``device="cuda"`` with a message naming it.
"""
import difflib
import fnmatch
import math
from typing import NamedTuple

import numpy as np

from .. import random as rk_random
from ..backend import get_backend
from ..errors import BackendError, CheckpointError, ConfigError

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

# Parameter roles: initializers and regularizers act on "weight" parameters only.
ROLES = ("weight", "bias", "scale", "other")


class Param(NamedTuple):
    """One trainable tensor as optimizers and regularizers see it (arrays on the layer's device)."""

    name: str
    value: object
    grad: object
    role: str
    backend: object


def resolve_dtype(dtype):
    dtype = np.dtype(dtype)
    if dtype not in FLOAT_DTYPES:
        raise ConfigError(f"dtype must be float32 or float64, got {dtype}")
    return dtype


def fans(shape):
    """(fan_in, fan_out) of a weight with PyTorch/Caffe layout (out, in, *kernel)."""
    if len(shape) < 2:
        return shape[0], shape[0]
    receptive = math.prod(shape[2:]) if len(shape) > 2 else 1
    return shape[1] * receptive, shape[0] * receptive


class Layer:
    """Base class of all layers (see the module docstring for the contract)."""

    #: set by subclasses that run on any device through other layers (containers,
    #: pure reshapes); otherwise CUDA support means "overrides forward_cuda".
    device_agnostic = False

    #: False when nobody uses this layer's input gradient (the first layer of a
    #: trained model): layers that honour it skip that product and return None.
    needs_input_grad = True

    #: True between zero_grad() and the next backward (see zero_grad).
    grads_zeroed = False

    #: True where the kernels (CPU and CUDA) can apply a ReLU that follows the layer in their
    #: own output pass (and mask the gradient in their first pass over dy), which
    #: saves the ReLU's two passes over memory.  :class:`Sequential` sets
    #: ``fused_relu`` on such a layer and ``absorbed`` on the ReLU after it.
    absorbs_relu = False
    fused_relu = False

    #: Someone reads this layer's own output (a :class:`rabbitkit.probe.FeatureProbe`
    #: target): a ReLU after it must not be fused into it, or the output would come
    #: out rectified.  A probed ReLU itself may still be absorbed: its output is then
    #: the fused layer's, the same values.
    output_observed = False

    #: A frozen layer keeps its parameters: its backward still returns the input
    #: gradient but leaves ``grads`` untouched, and ``parameters()`` (what
    #: optimizers and regularizers see) skips it.  Set through :func:`freeze`.
    frozen = False

    #: True where ``backward_cpu``/``backward_cuda`` themselves skip the weight
    #: gradients of a frozen layer (saving that work); for other layers
    #: :meth:`backward` points ``grads`` at scratch arrays while they run.
    skips_frozen_grads = False

    #: Names of the children in parameter names and layer paths; ``None`` means
    #: their positions ("0", "1", ...), as PyTorch's ``nn.Sequential`` names them.
    child_names = None

    #: Other names a model answers to in :meth:`get_layer` (``{alias: dotted name}``),
    #: such as the layer names of the framework the model's weights come from.
    layer_aliases = {}

    def __init__(self, dtype=np.float32):
        self.dtype = resolve_dtype(dtype)
        self.params = {}
        self.grads = {}
        self.param_roles = {}
        self.buffers = {}  # non-trainable state saved with the model (running means)
        self.device = "cpu"
        self.backend = get_backend("cpu")
        self.rng = rk_random.layer_rng()

    # -- parameters -----------------------------------------------------------
    def add_param(self, name, value, role="weight"):
        """Register a parameter (a host array) with a zeroed gradient of its shape."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}")
        value = np.ascontiguousarray(value, dtype=self.dtype)
        self.params[name] = self.backend.asarray(value, self.dtype)
        self.grads[name] = self.backend.zeros(value.shape, self.dtype)
        self.param_roles[name] = role
        return self.params[name]

    def add_buffer(self, name, value):
        """Register non-trainable state (saved in state dicts, moved with the layer)."""
        self.buffers[name] = self.backend.asarray(np.ascontiguousarray(value, dtype=self.dtype), self.dtype)
        return self.buffers[name]

    def children(self):
        """Sub-layers of a container (named by :attr:`child_names` or their position); none for a plain layer."""
        return []

    def named_children(self):
        """``[(name, child)]``: the children under their own names (see :attr:`child_names`)."""
        children = self.children()
        names = self.child_names if self.child_names is not None else [str(i) for i in range(len(children))]
        return list(zip(names, children))

    def set_child_names(self, names):
        """Name the children (``"features"``, ``"inception_4c"``) instead of numbering them."""
        names = [str(name) for name in names]
        if len(names) != len(self.children()):
            raise ConfigError(f"{type(self).__name__} has {len(self.children())} children, got {len(names)} names")
        for name in names:
            if not name or "." in name:
                raise ConfigError(f"layer name {name!r} must be non-empty and hold no '.'")
        if len(set(names)) != len(names):
            raise ConfigError(f"{type(self).__name__} child names repeat: {names}")
        self.child_names = names
        return self

    def named_layers(self, prefix=""):
        """Yield ``(dotted name, layer)`` for every layer below this one, parents before children.

        Names are the paths of parameter names without the parameter
        (``"features.10"``, ``"inception3a.branch2.0"``), so a layer and its
        weights are found under one name.
        """
        for name, child in self.named_children():
            path = f"{prefix}{name}"
            yield path, child
            yield from child.named_layers(path + ".")

    def get_layer(self, name):
        """The layer at dotted ``name``; an unknown name lists the nearest names in one line."""
        layers = dict(self.named_layers())
        if name in layers:
            return layers[name]
        if name in self.layer_aliases:  # e.g. Caffe's "inception_4c/output" for the module's concat
            return layers[self.layer_aliases[name]]
        close = difflib.get_close_matches(str(name), list(layers), n=5, cutoff=0.5)
        hint = f"nearest: {', '.join(close)}" if close else f"names look like: {', '.join(list(layers)[:5])}"
        raise ConfigError(f"no layer named '{name}' in {type(self).__name__}; {hint}")

    def zero_grad(self):
        for grad in self.grads.values():
            self.backend.fill(grad, 0)
        # Until the next backward, gradients hold zeros: a layer may then write its
        # weight gradient instead of adding it (one pass over the array saved).
        self.grads_zeroed = True
        for child in self.children():
            child.zero_grad()

    def named_parameters(self, prefix=""):
        """Yield ``(name, layer, key)`` for every parameter, recursively."""
        for key in self.params:
            yield prefix + key, self, key
        for name, child in self.named_children():
            yield from child.named_parameters(f"{prefix}{name}.")

    def parameters(self):
        """Every trainable tensor as a :class:`Param` (name, value, grad, role, backend); frozen layers' are left out."""
        return [
            Param(name, layer.params[key], layer.grads[key], layer.param_roles[key], layer.backend)
            for name, layer, key in self.named_parameters()
            if not layer.frozen
        ]

    def named_buffers(self, prefix=""):
        for key in self.buffers:
            yield prefix + key, self, key
        for name, child in self.named_children():
            yield from child.named_buffers(f"{prefix}{name}.")

    def state_dict(self):
        """Parameters and buffers as host numpy arrays by name (``"0.weight"``)."""
        state = {}
        for name, layer, key in self.named_parameters():
            state[name] = np.array(layer.backend.to_host(layer.params[key]))
        for name, layer, key in self.named_buffers():
            state[name] = np.array(layer.backend.to_host(layer.buffers[key]))
        return state

    def load_state_dict(self, state, strict=True):
        """Copy arrays into parameters and buffers; names and shapes must match."""
        expected = {name: (layer.params, key, layer) for name, layer, key in self.named_parameters()}
        expected.update({name: (layer.buffers, key, layer) for name, layer, key in self.named_buffers()})
        if strict:
            missing = sorted(set(expected) - set(state))
            unexpected = sorted(set(state) - set(expected))
            if missing or unexpected:
                raise CheckpointError(
                    f"state does not match the model: missing {missing or 'none'}, unexpected {unexpected or 'none'}"
                )
        for name, value in state.items():
            if name not in expected:
                continue
            store, key, layer = expected[name]
            if tuple(np.shape(value)) != tuple(store[key].shape):
                raise CheckpointError(
                    f"parameter '{name}' has shape {tuple(np.shape(value))}, the model expects {tuple(store[key].shape)}"
                )
            layer.backend.copy_into(store[key], np.asarray(value, dtype=layer.dtype))

    def num_parameters(self):
        return sum(int(np.prod(layer.params[key].shape)) for _, layer, key in self.named_parameters())

    # -- devices --------------------------------------------------------------
    def supports_cuda(self):
        """Whether this layer (and every sub-layer) has CUDA kernels."""
        return not self._layers_without_cuda()

    def _layers_without_cuda(self):
        """Names of this layer and sub-layers that have no CUDA kernels."""
        own = self.device_agnostic or type(self).forward_cuda is not Layer.forward_cuda
        missing = [] if own else [type(self).__name__]
        for child in self.children():
            missing += child._layers_without_cuda()
        return missing

    def to(self, device):
        """Move parameters and gradients to ``device`` ("cpu" or "cuda")."""
        if device == "cuda":
            missing = self._layers_without_cuda()
            if missing:
                names = ", ".join(sorted(set(missing)))
                raise BackendError(f"layer {names} has no CUDA kernels; use device = \"cpu\" or layers that have them")
        backend = get_backend(device)
        for store in (self.params, self.grads, self.buffers):
            for key in list(store):
                store[key] = backend.asarray(self.backend.to_host(store[key]), self.dtype)
        self.device = device
        self.backend = backend
        for child in self.children():
            child.to(device)
        return self

    # -- randomness -----------------------------------------------------------
    def seed(self, seed):
        """Reset this layer's random stream (dropout masks and the like)."""
        self.rng = np.random.default_rng(seed)
        for index, child in enumerate(self.children()):
            child.seed(np.random.SeedSequence([int(seed), index]).generate_state(1)[0])

    def skip_input_grad(self):
        """Declare that the gradient w.r.t. this layer's input is not needed.

        The trainer calls it on the model: the first layer's input gradient (often
        the most expensive product of a ConvNet's backward pass) is then not computed.
        Containers pass it to the layer that sees their input.
        """
        self.needs_input_grad = False

    def reset_state(self):
        """Forget carried state (a stateful recurrent layer's hidden state); containers recurse."""
        for child in self.children():
            child.reset_state()

    # -- computation ----------------------------------------------------------
    def forward(self, x, training=True):
        if self.device == "cuda":
            return self.forward_cuda(self.backend.asarray(x, self.dtype), training)
        return self.forward_cpu(np.ascontiguousarray(x, dtype=self.dtype), training)

    def backward(self, dy):
        if self.frozen and self.grads and not self.skips_frozen_grads:
            return self._backward_into_scratch(dy)
        if self.device == "cuda":
            return self.backward_cuda(self.backend.asarray(dy, self.dtype))
        return self.backward_cpu(np.ascontiguousarray(dy, dtype=self.dtype))

    def _backward_into_scratch(self, dy):
        """Backward of a frozen layer that cannot skip its weight gradients: they go to
        scratch arrays, so the real ``grads`` stay untouched."""
        real = self.grads
        self.grads = {key: self.backend.zeros(grad.shape, self.dtype) for key, grad in real.items()}
        try:
            if self.device == "cuda":
                return self.backward_cuda(self.backend.asarray(dy, self.dtype))
            return self.backward_cpu(np.ascontiguousarray(dy, dtype=self.dtype))
        finally:
            self.grads = real

    @property
    def weight_grads_wanted(self):
        """Whether backward should form parameter gradients (False for a frozen layer)."""
        return not self.frozen

    def forward_cpu(self, x, training):
        raise NotImplementedError(f"{type(self).__name__}.forward_cpu")

    def backward_cpu(self, dy):
        raise NotImplementedError(f"{type(self).__name__}.backward_cpu")

    def forward_cuda(self, x, training):
        raise BackendError(f"layer {type(self).__name__} has no CUDA kernels")

    def backward_cuda(self, dy):
        raise BackendError(f"layer {type(self).__name__} has no CUDA kernels")

    # -- shapes and costs -----------------------------------------------------
    def output_shape(self, input_shape):
        """Per-sample output shape for a per-sample ``input_shape`` (no batch axis).

        The default runs a batch-1 forward pass on zeros in evaluation mode; layers
        with a cheap closed form override it.
        """
        probe = np.zeros((1, *input_shape), dtype=self.dtype)
        out = self.backend.to_host(self.forward(probe, training=False))
        return tuple(out.shape[1:])

    def flops(self, input_shape):
        """Forward multiply-adds x 2 per sample (0 for layers whose cost is negligible)."""
        return 0

    def extra_repr(self):
        return ""

    def __repr__(self):
        return f"{type(self).__name__}({self.extra_repr()})"


def names_matching(pattern, names, what, kind="layer"):
    """The names (a list) that the shell-style ``pattern`` matches, in their order.

    None is a :class:`ConfigError` in one line that names the pattern and the
    nearest names (or, when none is near, the first few): a typo in a pattern
    would otherwise silently leave the layers the user meant alone.  ``what``
    says whose pattern it is (``"freeze"``), ``kind`` what the names are.
    """
    hits = [name for name in names if fnmatch.fnmatchcase(name, pattern)]
    if not hits:
        close = difflib.get_close_matches(pattern, names, n=3, cutoff=0.5)
        if close:
            hint = f"; nearest names: {', '.join(close)}"
        else:
            hint = f"; names look like: {', '.join(names[:5])}" if names else f"; there is no {kind}"
        raise ConfigError(f"{what} pattern '{pattern}' matches no {kind}{hint}")
    return hits


def freeze(model, patterns, frozen=True):
    """Freeze (or, with ``frozen=False``, thaw) the layers whose dotted names match a pattern.

    Patterns are shell-style (``"features.*"``, ``"conv1"``); a matching
    container freezes everything inside it; ``"*"`` freezes the whole model.
    Returns the names of the layers that matched.  A pattern that matches no
    layer is a :class:`ConfigError` naming it (see :func:`names_matching`).
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    layers = dict(model.named_layers())
    matched = []
    for pattern in patterns:
        if pattern == "*":  # the model itself too (a lone layer has no named layers below it)
            hits = [("", model), *layers.items()]
        else:
            hits = [(name, layers[name]) for name in names_matching(pattern, list(layers), "freeze")]
        for name, layer in hits:
            _set_frozen(layer, frozen)
            matched.append(name)
    return matched


def _set_frozen(layer, frozen):
    layer.frozen = frozen
    for child in layer.children():
        _set_frozen(child, frozen)
