"""Putting a weight file's tensors into a model: names, shapes, one-line errors.

:func:`external_state` renames a :class:`~rabbitkit.weights.WeightFile`'s
tensors to the model's (Caffe blobs, skipped auxiliary heads, PyTorch's batch
counters); :func:`load_into` checks names and shapes and copies (or adopts)
the arrays; :func:`uninitialised` builds a net without drawing initial weights
when every tensor will come from a file.
"""
import contextlib
import dataclasses
import difflib
import fnmatch

import numpy as np

from .errors import CheckpointError


@dataclasses.dataclass
class LoadReport:
    """What a load did: tensors loaded, names left out, and a re-initialised head."""

    loaded: list
    missing: list
    unexpected: list
    new_head: list

    def summary(self):
        parts = [f"loaded {len(self.loaded)} tensors"]
        if self.new_head:
            parts.append(f"new head {', '.join(self.new_head)} (re-initialised)")
        if self.missing:
            parts.append(f"{len(self.missing)} left at their initial values (first: {self.missing[0]})")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} in the file unused (first: {self.unexpected[0]})")
        return "; ".join(parts)


def expected_shapes(model):
    """``{name: shape}`` of every parameter and buffer, in the model's order (nothing copied)."""
    shapes = {name: tuple(layer.params[key].shape) for name, layer, key in model.named_parameters()}
    shapes.update({name: tuple(layer.buffers[key].shape) for name, layer, key in model.named_buffers()})
    return shapes


def _nearest(name, names):
    close = difflib.get_close_matches(name, list(names), n=3, cutoff=0.5)
    return f" (nearest: {', '.join(close)})" if close else ""


def external_state(model, weights):
    """A :class:`~rabbitkit.weights.WeightFile`'s tensors under the model's names.

    A model may declare ``external_names`` (``{format: {file name: model name}}``,
    e.g. Caffe's ``"conv1/7x7_s2/0"`` -> ``"conv1.weight"``) and
    ``ignored_weights`` (patterns of file tensors it does not hold, such as
    GoogLeNet's auxiliary heads when built without them).  PyTorch's
    ``num_batches_tracked`` counters are dropped: rabbitkit's batch norm has no
    such buffer.  Caffe's legacy 4-D blob shapes (1, 1, out, in) are reshaped to
    the model's when only leading 1s differ.
    """
    names = getattr(model, "external_names", {}).get(weights.format, {})
    ignored = tuple(getattr(model, "ignored_weights", ()))
    shapes = expected_shapes(model) if weights.format == "caffe" else {}
    state = {}
    for file_name, array in weights.tensors.items():
        name = names.get(file_name, file_name)
        if name.endswith("num_batches_tracked") or any(fnmatch.fnmatchcase(name, p) for p in ignored):
            continue
        want = shapes.get(name)
        if want is not None and array.shape != want and _squeezed(array.shape) == _squeezed(want):
            array = array.reshape(want)
        state[name] = array
    return state


def _squeezed(shape):
    shape = list(shape)
    while len(shape) > 1 and shape[0] == 1:
        shape.pop(0)
    return tuple(shape)


def _stores(model):
    """``{name: (store dict, key, layer)}`` of every parameter and buffer."""
    stores = {name: (layer.params, key, layer) for name, layer, key in model.named_parameters()}
    stores.update({name: (layer.buffers, key, layer) for name, layer, key in model.named_buffers()})
    return stores


def _put(store, key, layer, value, adopt):
    """Copy ``value`` into the tensor, or (``adopt``) hold the file's own array when it already
    is what the layer keeps (C-contiguous, writeable, its dtype, on the CPU): no second copy."""
    if (adopt and layer.device == "cpu" and isinstance(value, np.ndarray) and value.dtype == layer.dtype
            and value.flags.c_contiguous and value.flags.writeable):
        store[key] = value
    else:
        layer.backend.copy_into(store[key], np.asarray(value, dtype=layer.dtype))


def load_into(model, state, source, arch, strict=True, head=None, adopt=False):
    """Copy ``state`` into ``model`` with one-line errors naming the first tensor that does not fit.

    ``strict``: every model tensor must come from ``state`` and every tensor of
    ``state`` must be used.  ``head``: the output layer's name; when its tensors
    differ in shape (another number of classes) they keep their fresh
    initialisation and are reported as a new head instead of an error.
    ``adopt``: the model may take over ``state``'s arrays instead of copying them
    (only for a model no optimizer holds yet).
    """
    shapes = expected_shapes(model)
    new_head, mismatched = [], []
    for name, want in shapes.items():
        if name in state and tuple(np.shape(state[name])) != want:
            if head is not None and name.rsplit(".", 1)[0] == head:
                new_head.append(name)
            else:
                mismatched.append(name)
    if mismatched:
        name = mismatched[0]
        raise CheckpointError(f"{source}: '{name}' has shape {tuple(np.shape(state[name]))}, {arch} expects {shapes[name]}")
    missing = [name for name in shapes if name not in state]
    unexpected = [name for name in state if name not in shapes]
    if strict and missing:
        name = missing[0]
        raise CheckpointError(f"{source}: no tensor '{name}' in the file ({arch} expects shape {shapes[name]})"
                              f"{_nearest(name, unexpected or state)}")
    if strict and unexpected:
        name = unexpected[0]
        raise CheckpointError(f"{source}: tensor '{name}' of shape {tuple(np.shape(state[name]))} is not a "
                              f"parameter of {arch}{_nearest(name, missing or shapes)}")
    stores = _stores(model)
    loaded = [name for name in shapes if name in state and name not in new_head]
    for name in loaded:
        _put(*stores[name], state[name], adopt)
    return LoadReport(loaded, missing, unexpected, sorted({n.rsplit(".", 1)[0] for n in new_head}))


class _Unset:
    """Stands in for a layer's random generator while a net is built only to receive
    weights: parameters start as zero pages nobody touches instead of drawn values."""

    def __init__(self, real):
        self.real = real

    def uniform(self, low=0.0, high=1.0, size=None):
        return np.zeros(size, np.float32)

    def standard_normal(self, size=None, *args, **kwargs):
        return np.zeros(size, np.float32)

    def normal(self, loc=0.0, scale=1.0, size=None):
        return np.zeros(size, np.float32)

    def __getattr__(self, name):
        return getattr(self.real, name)


@contextlib.contextmanager
def uninitialised():
    """Build layers without drawing their initial weights (every one is loaded afterwards)."""
    from . import random as rk_random

    original = rk_random.layer_rng
    rk_random.layer_rng = lambda: _Unset(original())
    try:
        yield
    finally:
        rk_random.layer_rng = original


def real_generators(model):
    """Give every layer its real generator back after :func:`uninitialised`."""
    for layer in [model] + [layer for _, layer in model.named_layers()]:
        if isinstance(layer.rng, _Unset):
            layer.rng = layer.rng.real
