"""VGG-16 (Simonyan & Zisserman, ICLR 2015, configuration D), exactly the talk's table.

=========  =============================================
block 1    conv3-64, conv3-64, max-pool 2
block 2    conv3-128, conv3-128, max-pool 2
block 3    conv3-256 x 3, max-pool 2
block 4    conv3-512 x 3, max-pool 2
block 5    conv3-512 x 3, max-pool 2
classifier fc 4096, dropout 0.5, fc 4096, dropout 0.5, fc num_outputs
=========  =============================================

Every convolution is 3x3 with padding 1 and stride 1, followed by ReLU, as are
both hidden fully connected layers.  The table's final softmax is fused into the
cross-entropy loss, so the net returns logits.  At (3, 224, 224) with 1000
classes it has 138,357,544 parameters; any input of at least 32x32 works (the
first fully connected layer adapts to the final feature map).
"""
import numpy as np

from ..hookspecs import hookimpl
from ..layers.activations import ReLU
from ..layers.conv2d import Conv2D
from ..layers.dense import Dense
from ..layers.dropout import Dropout
from ..layers.flatten import Flatten
from ..layers.pooling import MaxPool2D
from ..layers.sequential import Sequential
from ._blocks import feature_size, image_shape

VGG16_BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


def vgg16(input_shape, num_outputs, dtype=np.float32, fc_width: int = 4096, dropout: float = 0.5):
    """VGG-16 logits (see the module docstring); ``fc_width`` and ``dropout`` default to the paper's."""
    shape = image_shape("vgg16", input_shape)
    channels = shape[0]
    features = []
    for block in VGG16_BLOCKS:
        for out_channels in block:
            features += [Conv2D(channels, out_channels, 3, padding=1, dtype=dtype), ReLU(dtype=dtype)]
            channels = out_channels
        features.append(MaxPool2D(2, dtype=dtype))
    features.append(Flatten(dtype=dtype))
    flat = feature_size("vgg16", features, shape, dtype)
    fc_width = int(fc_width)
    classifier = [
        Dense(flat, fc_width, dtype=dtype), ReLU(dtype=dtype), Dropout(dropout, dtype=dtype),
        Dense(fc_width, fc_width, dtype=dtype), ReLU(dtype=dtype), Dropout(dropout, dtype=dtype),
        Dense(fc_width, int(num_outputs), dtype=dtype),
    ]
    return Sequential(features + classifier, dtype=dtype)


@hookimpl
def rabbit_architectures():
    return {"vgg16": vgg16}
