"""Two small layers the zoo nets need to match torchvision's module trees.

* :class:`Regrouped` computes with one chain of layers but names its parts as
  the PyTorch module does: SqueezeNet's ``Fire`` holds ``squeeze``,
  ``expand1x1`` and ``expand3x3`` side by side although the expands run in
  parallel; GoogLeNet holds its auxiliary heads ``aux1``/``aux2`` although its
  inference path does not run them.
* :class:`ChannelAffine` is ``y = x * scale[c] + shift[c]`` with fixed
  constants (GoogLeNet's ``transform_input``).
"""
import numpy as np

from ..errors import ConfigError
from ..layers.base import Layer
from ..layers.sequential import Sequential


class Regrouped(Sequential):
    """A Sequential over ``layers`` whose children (names, parameters, state dict,
    freezing, devices) are ``parts`` (``{name: layer}``).

    Every layer of ``layers`` that holds parameters must be one of ``parts`` or
    inside one; ``parts`` may hold layers the computation does not use.
    """

    def __init__(self, layers, parts, dtype=None):
        super().__init__(layers, dtype=dtype)
        self.parts = dict(parts)
        self.set_child_names(list(self.parts))

    def children(self):
        return list(self.parts.values())

    def _glue(self):
        """Containers of the computation that are not parts (they hold no parameters of their own)."""
        held = {id(part) for part in self.parts.values()}
        return [layer for layer in self.layers if id(layer) not in held]

    def to(self, device):
        super().to(device)
        for layer in self._glue():
            layer.to(device)
        return self

    def summary_rows(self, input_shape):
        names = {id(layer): name for name, layer in self.parts.items()}
        rows, shape = [], tuple(input_shape)
        for index, layer in enumerate(self.layers):
            flops = layer.flops(shape)
            shape = layer.output_shape(shape)
            rows.append((names.get(id(layer), f"({index})"), repr(layer), shape, layer.num_parameters(), flops))
        return rows


class ChannelAffine(Layer):
    """``y[:, c] = x[:, c] * scale[c] + shift[c]`` with constant (not trainable) coefficients."""

    device_agnostic = False

    def __init__(self, scale, shift, dtype=np.float32):
        super().__init__(dtype)
        self.scale = np.asarray(scale, dtype=self.dtype)
        self.shift = np.asarray(shift, dtype=self.dtype)
        if self.scale.shape != self.shift.shape or self.scale.ndim != 1:
            raise ConfigError(f"ChannelAffine needs equal-length scale and shift, got {scale} and {shift}")

    def _column(self, values, ndim):
        return values.reshape(1, -1, *([1] * (ndim - 2)))

    def forward_cpu(self, x, training):
        if x.ndim < 2 or x.shape[1] != self.scale.size:
            raise ConfigError(f"ChannelAffine expects {self.scale.size} channels, got input {tuple(x.shape)}")
        return x * self._column(self.scale, x.ndim) + self._column(self.shift, x.ndim)

    def backward_cpu(self, dy):
        return dy * self._column(self.scale, dy.ndim)

    def output_shape(self, input_shape):
        return tuple(input_shape)

    def extra_repr(self):
        return f"scale={self.scale.tolist()}, shift={self.shift.tolist()}"
