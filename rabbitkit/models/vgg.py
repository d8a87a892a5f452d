"""VGG-16 and VGG-19 (Simonyan & Zisserman, ICLR 2015, configurations D and E) in
torchvision's layout, so its ``vgg16-397923af.pth`` / ``vgg19-dcbb9e9d.pth`` load
without renaming.

=========  ====================================================
block 1    conv3-64 x 2, max-pool 2
block 2    conv3-128 x 2, max-pool 2
block 3    conv3-256 x 3 (x 4 for VGG-19), max-pool 2
block 4    conv3-512 x 3 (x 4), max-pool 2
block 5    conv3-512 x 3 (x 4), max-pool 2
avgpool    adaptive average pool to 7x7 (the identity at 224 px)
classifier fc 4096, dropout 0.5, fc 4096, dropout 0.5, fc num_outputs
=========  ====================================================

Every convolution is 3x3 with padding 1, followed by ReLU, as are both hidden
fully connected layers; the net returns logits (the softmax is fused into the
loss).  Parameters are named as torchvision's: ``features.0.weight`` ...
``features.28.bias`` (VGG-16), ``classifier.0``, ``classifier.3``,
``classifier.6``.  At (3, 224, 224) with 1000 classes VGG-16 has 138,357,544
parameters and VGG-19 143,667,240.

``pool_size`` is the adaptive pool's output (7 as torchvision: any input of at
least 32x32 then feeds the 25,088-wide classifier); ``pool_size = 0`` leaves the
pool out and the first fully connected layer takes the final feature map as
it is (the talk's table on small images: 512 features at 32x32).
"""
import numpy as np

from ..errors import ConfigError
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

VGG16_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
VGG19_BLOCKS = ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4)


def vgg_features(blocks, channels, dtype):
    """torchvision's ``features``: conv3 + ReLU per width, a 2x2 max-pool after each block."""
    layers = []
    for block in blocks:
        for out_channels in block:
            layers += [Conv2D(channels, out_channels, 3, padding=1, dtype=dtype), ReLU(dtype=dtype)]
            channels = out_channels
        layers.append(MaxPool2D(2, dtype=dtype))
    return Sequential(layers, dtype=dtype)


def vgg(name, blocks, input_shape, num_outputs, dtype, fc_width, dropout, pool_size):
    shape = image_shape(name, input_shape)
    features = vgg_features(blocks, shape[0], dtype)
    parts = {"features": features}
    if pool_size < 0:
        raise ConfigError(f"{name} pool_size must be >= 0, got {pool_size}")
    if pool_size:
        parts["avgpool"] = AdaptiveAvgPool2D(pool_size, dtype=dtype)
    parts["flatten"] = Flatten(dtype=dtype)
    flat = feature_size(name, list(parts.values()), shape, dtype)
    fc_width = int(fc_width)
    parts["classifier"] = Sequential([
        Dense(flat, fc_width, dtype=dtype), ReLU(dtype=dtype), Dropout(dropout, dtype=dtype),
        Dense(fc_width, fc_width, dtype=dtype), ReLU(dtype=dtype), Dropout(dropout, dtype=dtype),
        Dense(fc_width, int(num_outputs), dtype=dtype),
    ], dtype=dtype)
    return Sequential(parts, dtype=dtype)


@pretrained_layout(preprocessing=TORCHVISION_INPUT, head="classifier.6")
def vgg16(input_shape, num_outputs, dtype=np.float32, fc_width: int = 4096, dropout: float = 0.5, pool_size: int = 7):
    """VGG-16 logits in torchvision's layout (see the module docstring)."""
    return vgg("vgg16", VGG16_BLOCKS, input_shape, num_outputs, dtype, fc_width, dropout, pool_size)


@pretrained_layout(preprocessing=TORCHVISION_INPUT, head="classifier.6")
def vgg19(input_shape, num_outputs, dtype=np.float32, fc_width: int = 4096, dropout: float = 0.5, pool_size: int = 7):
    """VGG-19 logits in torchvision's layout (see the module docstring)."""
    return vgg("vgg19", VGG19_BLOCKS, input_shape, num_outputs, dtype, fc_width, dropout, pool_size)


@hookimpl
def rabbit_architectures():
    return {"vgg16": vgg16, "vgg19": vgg19}
