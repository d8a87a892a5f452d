"""The multilayer perceptron of the talk's first half, as a built-in architecture."""
import math

import numpy as np

from ..hookspecs import hookimpl
from ..layers.dense import Dense
from ..layers.sequential import Sequential
from ..plugins import registry


def build_mlp(
    input_shape,
    num_outputs,
    dtype=np.float32,
    hidden: list = (64, 64),
    activation: str = "Tanh",
    output_activation: str | None = None,
    dropout: float = 0.0,
):
    """Dense layers of sizes ``hidden`` with ``activation`` between them.

    ``activation`` and ``output_activation`` name any registered layer taking no
    required arguments (``ReLU``, ``Tanh``, ``Sigmoid``, a plugin's ...).  Inputs
    of any shape are flattened.  ``dropout`` > 0 inserts Dropout after each hidden
    activation.  Without ``output_activation`` the net returns raw outputs
    (logits for a fused softmax cross-entropy).
    """
    layers_registry = registry("layers")
    activation_cls = layers_registry.get(activation)
    layers = []
    if len(input_shape) > 1:
        layers.append(layers_registry.get("Flatten")(dtype=dtype))
    width = math.prod(input_shape)
    for size in hidden:
        layers += [Dense(width, int(size), dtype=dtype), activation_cls(dtype=dtype)]
        if dropout > 0:
            layers.append(layers_registry.get("Dropout")(dropout, dtype=dtype))
        width = int(size)
    layers.append(Dense(width, num_outputs, dtype=dtype))
    if output_activation:
        layers.append(layers_registry.get(output_activation)(dtype=dtype))
    return Sequential(layers, dtype=dtype)


@hookimpl
def rabbit_architectures():
    return {"mlp": build_mlp}
