"""SqueezeNet 1.1 (Iandola et al. 2016) as torchvision's ``squeezenet1_1``, so
``squeezenet1_1-b8a52dc0.pth`` loads without renaming.

A Fire module squeezes with a 1x1 convolution, then expands with a 1x1 and a
3x3 convolution side by side whose outputs are concatenated (ReLU after
each); its parameters are ``features.N.squeeze``, ``.expand1x1`` and
``.expand3x3``.  ``features``: conv 3x3/2 64, ReLU, max-pool 3/2 (ceil mode),
Fire 16/64 x 2, pool, Fire 32/128 x 2, pool, Fire 48/192 x 2, Fire 64/256 x 2;
``classifier``: dropout 0.5, conv 1x1 num_outputs (``classifier.1``), ReLU,
global average pool.  1,235,496 parameters with 1000 classes.
"""
import numpy as np

from ..hookspecs import hookimpl
from ..layers.activations import ReLU
from ..layers.branches import Concat
from ..layers.conv2d import Conv2D
from ..layers.dropout import Dropout
from ..layers.pooling import GlobalAvgPool2D, MaxPool2D
from ..layers.sequential import Sequential
from ._blocks import feature_size, image_shape
from ._zoo import TORCHVISION_INPUT, pretrained_layout
from ._zoo_layers import Regrouped

# (squeeze, expand) per Fire module; "pool" is a 3x3 stride-2 ceil-mode max-pool.
SQUEEZENET1_1 = ("pool", (16, 64), (16, 64), "pool", (32, 128), (32, 128), "pool",
                 (48, 192), (48, 192), (64, 256), (64, 256))


def fire(in_channels, squeeze, expand, dtype=np.float32):
    """torchvision's ``Fire(in_channels, squeeze, expand, expand)``."""
    parts = {
        "squeeze": Conv2D(in_channels, squeeze, 1, dtype=dtype), "squeeze_activation": ReLU(dtype=dtype),
        "expand1x1": Conv2D(squeeze, expand, 1, dtype=dtype), "expand1x1_activation": ReLU(dtype=dtype),
        "expand3x3": Conv2D(squeeze, expand, 3, padding=1, dtype=dtype), "expand3x3_activation": ReLU(dtype=dtype),
    }
    expand_both = Concat([Sequential([parts["expand1x1"], parts["expand1x1_activation"]], dtype=dtype),
                          Sequential([parts["expand3x3"], parts["expand3x3_activation"]], dtype=dtype)], dtype=dtype)
    return Regrouped([parts["squeeze"], parts["squeeze_activation"], expand_both], parts, dtype=dtype)


@pretrained_layout(preprocessing=TORCHVISION_INPUT, head="classifier.1")
def squeezenet1_1(input_shape, num_outputs, dtype=np.float32, dropout: float = 0.5):
    """SqueezeNet 1.1 logits in torchvision's layout (see the module docstring)."""
    shape = image_shape("squeezenet1_1", input_shape)
    layers = [Conv2D(shape[0], 64, 3, stride=2, dtype=dtype), ReLU(dtype=dtype)]
    channels = 64
    for stage in SQUEEZENET1_1:
        if stage == "pool":
            layers.append(MaxPool2D(3, stride=2, ceil_mode=True, dtype=dtype))
            continue
        squeeze, expand = stage
        layers.append(fire(channels, squeeze, expand, dtype))
        channels = 2 * expand
    features = Sequential(layers, dtype=dtype)
    feature_size("squeezenet1_1", [features], shape, dtype)  # a one-line error if the input is too small
    classifier = Sequential([Dropout(dropout, dtype=dtype), Conv2D(channels, int(num_outputs), 1, dtype=dtype),
                             ReLU(dtype=dtype), GlobalAvgPool2D(dtype=dtype)], dtype=dtype)
    return Sequential({"features": features, "classifier": classifier}, dtype=dtype)


@hookimpl
def rabbit_architectures():
    return {"squeezenet1_1": squeezenet1_1}
