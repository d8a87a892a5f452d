"""LeNet-5 (LeCun, Bottou, Bengio & Haffner, 1998)."""

import numpy as np

from ..errors import ConfigError
from ..hookspecs import hookimpl
from ..layers.conv2d import Conv2D
from ..layers.dense import Dense
from ..layers.flatten import Flatten
from ..layers.pooling import AvgPool2D, MaxPool2D
from ..layers.sequential import Sequential
from ._blocks import feature_size, image_shape, make_activation


# -- LeNet-5 ----------------------------------------------------------------------
def lenet5(
    input_shape,
    num_outputs,
    dtype=np.float32,
    activation: str = "Tanh",
    pooling: str = "avg",
    padding: int = 0,
):
    """LeNet-5: conv 5x5 6 -> pool 2 -> conv 5x5 16 -> pool 2 -> fc 120 -> fc 84 -> fc out.

    As in the 1998 paper, C5 is a 5x5 convolution over the 5x5 maps of a 32x32
    input, i.e. a fully connected layer of 120 units (here a Dense layer, so any
    input size works).  Differences from the paper, all standard: full C3
    connectivity, plain average pooling instead of trainable subsampling,
    ``activation`` (``"Tanh"``) instead of the scaled tanh, and logits
    instead of RBF output units.  ``pooling``: ``"avg"`` or ``"max"``;
    ``padding``: zero padding of the first convolution (2 puts 28x28 MNIST on
    the paper's 32x32 footing).  At (1, 32, 32) with 10 outputs it has 61,706
    parameters.
    """
    channels, height, width = image_shape("lenet5", input_shape)
    if pooling not in ("avg", "max"):
        raise ConfigError(f"lenet5 pooling must be 'avg' or 'max', got {pooling!r}")
    pool = AvgPool2D if pooling == "avg" else MaxPool2D
    features = [
        Conv2D(channels, 6, 5, padding=int(padding), dtype=dtype),
        make_activation(activation, dtype),
        pool(2, dtype=dtype),
        Conv2D(6, 16, 5, dtype=dtype),
        make_activation(activation, dtype),
        pool(2, dtype=dtype),
        Flatten(dtype=dtype),
    ]
    flat = feature_size("lenet5", features, (channels, height, width), dtype)
    classifier = [
        Dense(flat, 120, dtype=dtype), make_activation(activation, dtype),
        Dense(120, 84, dtype=dtype), make_activation(activation, dtype),
        Dense(84, int(num_outputs), dtype=dtype),
    ]
    return Sequential(features + classifier, dtype=dtype)


@hookimpl
def rabbit_architectures():
    return {"lenet5": lenet5}
