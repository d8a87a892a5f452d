"""Sequential: a chain of layers that is itself a layer (so chains nest)."""
import numpy as np

from ..hookspecs import hookimpl
from .activations import ReLU
from .base import Layer


class Sequential(Layer):
    """Layers applied in order; backward runs them in reverse.

    Parameters are named by position, ``"0.weight"``, nested ``"3.1.bias"``,
    as in PyTorch, so state dicts exchange.  ``names`` names the layers instead
    (``Sequential([...], names=["conv1", "relu1"])`` gives ``"conv1.weight"``),
    as a PyTorch module's attributes name its parts; ``layers`` may also be a
    dict ``{name: layer}``.
    """

    device_agnostic = True

    def __init__(self, layers, dtype=None, fuse_relu=True, names=None):
        if isinstance(layers, dict):
            names, layers = list(layers), list(layers.values())
        layers = list(layers)
        super().__init__(dtype if dtype is not None else (layers[0].dtype if layers else np.float32))
        self.layers = layers
        if names is not None:
            self.set_child_names(names)
        #: Let a layer that can (``absorbs_relu``: Conv2D, BatchNorm) apply the ReLU
        #: after it in its own kernels (CPU and CUDA).  Results are identical; only the
        #: producing layer's own output is then already rectified.
        self.fuse_relu = bool(fuse_relu)

    def __iter__(self):
        return iter(self.layers)

    def __len__(self):
        return len(self.layers)

    def __getitem__(self, index):
        """A layer by position, or by name (``model["features"]``)."""
        if isinstance(index, str):
            return self.get_layer(index)
        return self.layers[index]

    def forward(self, x, training=True):
        plan_key = (self.fuse_relu, self.device, len(self.layers))
        if plan_key != self._fusion_planned_for:  # re-plan only when something changed (MLPs count microseconds)
            self._plan_relu_fusion()
            self._fusion_planned_for = plan_key
        for layer in self.layers:
            x = layer.forward(x, training)
        return x

    _fusion_planned_for = None

    def _plan_relu_fusion(self):
        """Mark (producer, ReLU) pairs for fusion, except where the producer's own output
        is observed (``Layer.output_observed``).  Re-run by the next forward after a
        change of device, of ``fuse_relu`` or of the number of layers (and when a
        probe opens or closes: it clears ``_fusion_planned_for``)."""
        for index, producer in enumerate(self.layers):
            consumer = self.layers[index + 1] if index + 1 < len(self.layers) else None
            relu_next = type(consumer) is ReLU
            # Both devices: Conv2D's and BatchNorm's CUDA kernels rectify and mask too.
            fuse = (self.fuse_relu and relu_next and producer.absorbs_relu and not producer.output_observed
                    and producer.device == consumer.device)
            if producer.absorbs_relu:
                producer.fused_relu = fuse
            if relu_next:
                consumer.absorbed = fuse

    def backward(self, dy):
        for layer in reversed(self.layers):
            dy = layer.backward(dy)
            if dy is None:  # the first layer skipped its input gradient
                break
        return dy

    def skip_input_grad(self):
        # Layers up to the first one with parameters see only data-side gradients.
        self.needs_input_grad = False
        for layer in self.layers:
            layer.skip_input_grad()
            if any(True for _ in layer.named_parameters()):
                break

    def children(self):
        return self.layers

    # -- shapes and summary -------------------------------------------------------
    def output_shape(self, input_shape):
        shape = tuple(input_shape)
        for layer in self.layers:
            shape = layer.output_shape(shape)
        return shape

    def flops(self, input_shape):
        total = 0
        shape = tuple(input_shape)
        for layer in self.layers:
            total += layer.flops(shape)
            shape = layer.output_shape(shape)
        return total

    def summary_rows(self, input_shape):
        """[(index, layer repr, output shape, parameter count, flops)] per layer."""
        rows = []
        shape = tuple(input_shape)
        for name, layer in self.named_children():
            flops = layer.flops(shape)
            shape = layer.output_shape(shape)
            rows.append((name, repr(layer), shape, layer.num_parameters(), flops))
        return rows

    #: Longest layer description a summary row shows: a container's repr spells out
    #: every layer inside it (an Inception module, multi-scale branches).
    SUMMARY_WIDTH = 100

    def summary(self, input_shape):
        """A text table: layer, output shape, parameters, forward FLOPs per sample."""
        rows = self.summary_rows(input_shape)
        header = ("#", "layer", "output shape", "params", "FLOPs")
        width = self.SUMMARY_WIDTH
        cut = [r if len(r) <= width else r[:width - 2] + " …" for _, r, _, _, _ in rows]
        table = [header] + [(i, c, "x".join(map(str, s)), f"{p:,}", f"{f:,}") for (i, _, s, p, f), c in zip(rows, cut)]
        widths = [max(len(row[c]) for row in table) for c in range(len(header))]
        lines = ["  ".join(cell.ljust(widths[c]) for c, cell in enumerate(row)) for row in table]
        lines.insert(1, "-" * len(lines[0]))
        total_p = sum(r[3] for r in rows)
        total_f = sum(r[4] for r in rows)
        lines.append(f"input {'x'.join(map(str, input_shape))}; total parameters {total_p:,}; forward FLOPs per sample {total_f:,}")
        if any(c != r for c, (_, r, _, _, _) in zip(cut, rows)):
            lines.append("(rows ending in … are cut short: `rabbit layers` lists every layer inside them)")
        return "\n".join(lines)

    def extra_repr(self):
        return ", ".join(repr(layer) for layer in self.layers)


@hookimpl
def rabbit_layers():
    return {"Sequential": Sequential}
