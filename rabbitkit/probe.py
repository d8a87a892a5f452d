"""Input gradients of named layers' outputs: the machinery under Deep Dream,
activation maximisation, style transfer and saliency.

A :class:`FeatureProbe` runs a model forward only as far as the deepest layer
any objective needs, keeps the outputs of the named layers, and runs backward
with a gradient injected at each of them (summed where the paths meet), all
with frozen weights: no ``grads`` buffer is touched, and layers that can
(Conv2D, Dense) skip their weight products.  Dropout and batch norm run in
inference mode.  ::

    with FeatureProbe(model, ["features.10", "features.20"]) as probe:
        features = probe.forward(x)                       # {name: array}
        dx = probe.backward({"features.10": g10, "features.20": g20})

The name ``""`` stands for the model's own output (a class logit objective).
Layers are found by their dotted names (:meth:`Layer.named_layers`); the probe
wraps the named layers' own ``forward``/``backward`` for as long as it is open,
so it reaches into branches and other containers without copying them.
"""
import numpy as np

from .layers.branches import add_into_cpu, add_into_cuda
from .layers.sequential import Sequential

MODEL_OUTPUT = ""


class FeatureProbe:
    """Forward to the deepest named layer; backward from gradients at named layers.

    ``names`` are dotted layer names (aliases allowed, see ``Layer.layer_aliases``)
    or ``""`` for the model output.  Use as a context manager, or call
    :meth:`close` to give the model back as it was.
    """

    def __init__(self, model, names):
        self.model = model
        self.names = list(dict.fromkeys(names))
        if not self.names:
            raise ValueError("FeatureProbe needs at least one layer name")
        # The model and every layer in it, walked once here; each layer's first dotted
        # path by identity, so an alias resolves to the path it stands for.
        self._all = [("", model)] + list(model.named_layers())
        path_of = {}
        for name, layer in self._all[1:]:
            path_of.setdefault(id(layer), name)
        self.layers = {}
        self._paths = {}
        for name in self.names:
            if name == MODEL_OUTPUT:
                continue
            layer = model.get_layer(name)
            canonical = path_of[id(layer)]
            self.layers[name] = layer
            self._paths[name] = canonical.split(".")
        self.outputs = {}
        self._injected = {}
        self._saved = []
        self._open = False
        self._open_model()
        self.view = self._truncated_view()  # after _open_model: the cut Sequentials copy its fusion settings

    # -- context ------------------------------------------------------------------
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _open_model(self):
        for _, layer in self._all:
            self._saved.append((layer, layer.frozen, layer.needs_input_grad))
            layer.frozen = True
            layer.needs_input_grad = True
        # A ReLU fused into a probed layer would hide that layer's own (signed) output:
        # such pairs are not fused while the probe is open.  Every other pair stays
        # fused, a probed ReLU included (it then passes on the fused layer's output,
        # the same values), which saves a stored activation and two passes per pair.
        self._observed = [(layer, layer.output_observed) for layer in self.layers.values()]
        for layer in self.layers.values():
            layer.output_observed = True
        self._plan_fusion_again()
        for name, layer in self.layers.items():
            self._wrap(name, layer)
        self._open = True

    def _plan_fusion_again(self):
        for _, layer in self._all:
            if isinstance(layer, Sequential):
                layer._fusion_planned_for = None

    def close(self):
        """Unwrap the layers and restore freezing, input-gradient and fusion settings."""
        if not self._open:
            return
        for layer in self.layers.values():
            layer.__dict__.pop("forward", None)
            layer.__dict__.pop("backward", None)
        for layer, frozen, needs_input_grad in self._saved:
            layer.frozen = frozen
            layer.needs_input_grad = needs_input_grad
        for layer, observed in self._observed:
            layer.output_observed = observed
        # The views planned fusion on shared layers: every Sequential plans again.
        self._plan_fusion_again()
        self._open = False

    def _wrap(self, name, layer):
        forward, backward = layer.forward, layer.backward  # the class's bound methods
        probe = self

        def probed_forward(x, training=True):
            y = forward(x, training)
            probe.outputs[name] = y
            return y

        def probed_backward(dy):
            injected = probe._injected.pop(name, None)
            if callable(injected):  # made now, and the probe's to overwrite: dy is added into it
                made = probe._made_gradient(name, injected)
                dy = made if dy is None else probe._add_into(made, dy, layer)
            elif injected is not None:
                dy = injected if dy is None else probe._sum(dy, injected, layer)
            return backward(dy)

        layer.forward = probed_forward
        layer.backward = probed_backward

    # -- truncation ---------------------------------------------------------------
    def _truncated_view(self):
        """The model cut after the deepest probed layer (Sequentials on the way are cut too)."""
        if MODEL_OUTPUT in self.names:
            return self.model
        return _truncate(self.model, list(self._paths.values()))

    # -- computation --------------------------------------------------------------
    def forward(self, x):
        """Run the (cut) model in inference mode; return ``{name: output}`` of the probed layers."""
        self.outputs = {}
        self._injected = {}
        out = self.view.forward(x, training=False)
        if MODEL_OUTPUT in self.names:
            self.outputs[MODEL_OUTPUT] = out
        self._top = out
        return {name: self.outputs[name] for name in self.names}

    def backward(self, gradients):
        """Input gradient of sum_k <gradients[k], output_k> for the last :meth:`forward`.

        ``gradients`` maps probed names to arrays of their outputs' shapes, or to
        callables that make such an array when the backward pass reaches that layer (a
        new array each call, which the probe may overwrite: a loss's gradient then
        lives only from there on, as in an autograd engine); a name left out
        contributes nothing.
        """
        unknown = set(gradients) - set(self.names)
        if unknown:
            raise KeyError(f"not probed: {sorted(unknown)}; probed: {self.names}")
        backend = self.model.backend
        self._injected = {}
        top = None
        for name, grad in gradients.items():
            if callable(grad):
                if name != MODEL_OUTPUT:
                    self._injected[name] = grad
                    continue
                grad = self._made_gradient(name, grad)
            self._check_shape(name, grad)
            if name == MODEL_OUTPUT:
                top = grad
            else:
                self._injected[name] = backend.asarray(grad, self.model.dtype)
        if top is not None:
            dy = backend.asarray(np.array(top, dtype=self.model.dtype), self.model.dtype)
        else:
            dy = backend.zeros(tuple(self._top.shape), self.model.dtype)
        dx = self.view.backward(dy)
        leftover = sorted(self._injected)
        self._injected = {}
        if leftover:  # a probed layer the backward pass never reached
            raise RuntimeError(f"gradients injected at {leftover} never reached the input")
        return dx

    def _check_shape(self, name, grad):
        expected = tuple(self.outputs[name].shape)
        if tuple(np.shape(grad)) != expected:
            raise ValueError(f"gradient for '{name}' has shape {tuple(np.shape(grad))}, its output {expected}")

    def _made_gradient(self, name, make):
        grad = make()
        self._check_shape(name, grad)
        return self.model.backend.asarray(grad, self.model.dtype)

    @staticmethod
    def _add_into(out, dy, layer):
        """out += dy, in place (out: a gradient the probe made and owns)."""
        flat, add = out.reshape(out.size), dy.reshape(dy.size)
        if layer.device == "cuda":
            add_into_cuda.launch(out.size, flat, add)
        else:
            add_into_cpu(out.size, flat, add)
        return out

    @staticmethod
    def _sum(dy, injected, layer):
        out = layer.backend.empty(tuple(dy.shape), layer.dtype)
        layer.backend.copy_into(out, dy)  # dy may be another layer's saved array
        return FeatureProbe._add_into(out, injected, layer)


def _truncate(layer, paths):
    """A view of ``layer`` that stops after the deepest of ``paths`` (name lists).

    Only Sequentials are cut; any other container on the way runs whole, and
    its probed layers inside still see their gradients.  The view shares the
    layers (and so the weights) with the model.
    """
    if not isinstance(layer, Sequential) or not paths:
        return layer
    names = [name for name, _ in layer.named_children()]
    positions = [names.index(path[0]) for path in paths]
    last = max(positions)
    ends_here = [path[1:] for path, position in zip(paths, positions) if position == last]
    children = list(layer.named_children())[: last + 1]
    tail_name, tail = children[-1]
    if all(ends_here):  # every deepest path goes on inside the last child
        tail = _truncate(tail, ends_here)
    if last == len(names) - 1 and tail is children[-1][1]:
        return layer
    view = Sequential([child for _, child in children[:-1]] + [tail], dtype=layer.dtype,
                      fuse_relu=layer.fuse_relu, names=[name for name, _ in children])
    view.device, view.backend = layer.device, layer.backend
    return view
