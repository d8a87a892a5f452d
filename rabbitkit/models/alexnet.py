"""AlexNet as torchvision's ``alexnet`` (the one-GPU variant of Krizhevsky et al.
2012, "One weird trick", without LRN), so ``alexnet-owt-7be5be79.pth`` loads as it is.

``features``: conv 11x11/4 64, max-pool 3/2, conv 5x5 192, max-pool 3/2, conv
3x3 384, 256, 256, max-pool 3/2 (ReLU after every conv); ``avgpool``: adaptive
to 6x6; ``classifier``: dropout, fc 4096, ReLU, dropout, fc 4096, ReLU, fc
num_outputs (``classifier.1``, ``classifier.4``, ``classifier.6``).
61,100,840 parameters with 1000 classes.
"""
import numpy as np

from ..hookspecs import hookimpl
from ..layers.activations import ReLU
from ..layers.adaptive_pool import AdaptiveAvgPool2D
from ..layers.conv2d import Conv2D
from ..layers.dense import Dense
from ..layers.dropout import Dropout
from ..layers.flatten import Flatten
from ..layers.pooling import MaxPool2D
from ..layers.sequential import Sequential
from ._blocks import feature_size, image_shape
from ._zoo import TORCHVISION_INPUT, pretrained_layout

# (out channels, kernel, stride, padding, max-pool after)
ALEXNET_CONVS = ((64, 11, 4, 2, True), (192, 5, 1, 2, True), (384, 3, 1, 1, False), (256, 3, 1, 1, False),
                 (256, 3, 1, 1, True))


@pretrained_layout(preprocessing=TORCHVISION_INPUT, head="classifier.6")
def alexnet(input_shape, num_outputs, dtype=np.float32, dropout: float = 0.5):
    """AlexNet logits in torchvision's layout (see the module docstring)."""
    shape = image_shape("alexnet", input_shape)
    layers, channels = [], shape[0]
    for out_channels, kernel, stride, padding, pool in ALEXNET_CONVS:
        layers += [Conv2D(channels, out_channels, kernel, stride=stride, padding=padding, dtype=dtype), ReLU(dtype=dtype)]
        if pool:
            layers.append(MaxPool2D(3, stride=2, dtype=dtype))
        channels = out_channels
    parts = {"features": Sequential(layers, dtype=dtype), "avgpool": AdaptiveAvgPool2D(6, dtype=dtype),
             "flatten": Flatten(dtype=dtype)}
    flat = feature_size("alexnet", list(parts.values()), shape, dtype)
    parts["classifier"] = Sequential([
        Dropout(dropout, dtype=dtype), Dense(flat, 4096, dtype=dtype), ReLU(dtype=dtype),
        Dropout(dropout, dtype=dtype), Dense(4096, 4096, dtype=dtype), ReLU(dtype=dtype),
        Dense(4096, int(num_outputs), dtype=dtype),
    ], dtype=dtype)
    return Sequential(parts, dtype=dtype)


@hookimpl
def rabbit_architectures():
    return {"alexnet": alexnet}
