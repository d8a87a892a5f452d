"""Inception modules (Szegedy et al., "Going deeper with convolutions", CVPR 2015)
and a small GoogLeNet for 32-48 px inputs.

An Inception module runs four branches on its input and concatenates their
outputs along the channels:

* 1x1 conv ``c1``;
* 1x1 conv ``c3_reduce`` -> 3x3 conv ``c3`` (padding 1);
* 1x1 conv ``c5_reduce`` -> 5x5 conv ``c5`` (padding 2);
* 3x3 max-pool (stride 1, padding 1) -> 1x1 conv ``pool_proj``;

each convolution followed by ReLU (and, optionally, batch norm before it).  The
1x1 reductions keep the 3x3 and 5x5 convolutions cheap.  Output channels:
``c1 + c3 + c5 + pool_proj``, spatial size unchanged.
"""
import numpy as np

from ..errors import ConfigError
from ..hookspecs import hookimpl
from ..layers.activations import ReLU
from ..layers.batchnorm import BatchNorm
from ..layers.branches import Concat
from ..layers.conv2d import Conv2D
from ..layers.dense import Dense
from ..layers.dropout import Dropout
from ..layers.pooling import GlobalAvgPool2D, MaxPool2D
from ..layers.sequential import Sequential
from ._blocks import feature_size, image_shape


def conv_unit(in_channels, out_channels, kernel_size, batch_norm=False, dtype=np.float32):
    """conv (padding keeps the size) -> [batch norm] -> ReLU, as a list of layers."""
    conv = Conv2D(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=not batch_norm, dtype=dtype)
    norm = [BatchNorm(out_channels, dtype=dtype)] if batch_norm else []
    return [conv, *norm, ReLU(dtype=dtype)]


def inception_module(in_channels, c1, c3_reduce, c3, c5_reduce, c5, pool_proj, batch_norm=False, dtype=np.float32):
    """One Inception module (see the module docstring) as a :class:`Concat` layer.

    Branch order and parameter names follow torchvision's ``Inception``
    (``0`` 1x1, ``1`` 3x3, ``2`` 5x5, ``3`` pool projection).
    """
    unit = lambda cin, cout, k: conv_unit(cin, cout, k, batch_norm, dtype)  # noqa: E731
    return Concat(
        [
            Sequential(unit(in_channels, c1, 1), dtype=dtype),
            Sequential(unit(in_channels, c3_reduce, 1) + unit(c3_reduce, c3, 3), dtype=dtype),
            Sequential(unit(in_channels, c5_reduce, 1) + unit(c5_reduce, c5, 5), dtype=dtype),
            Sequential([MaxPool2D(3, stride=1, padding=1, dtype=dtype), *unit(in_channels, pool_proj, 1)], dtype=dtype),
        ],
        axis=1,
        dtype=dtype,
    )


# GoogLeNet's module widths (c1, c3_reduce, c3, c5_reduce, c5, pool_proj), table 1
# of the paper; "pool" is a 3x3 stride-2 max-pool between stages.
GOOGLENET_SMALL_STAGES = (
    ("3a", (64, 96, 128, 16, 32, 32)),
    ("3b", (128, 128, 192, 32, 96, 64)),
    "pool",
    ("4a", (192, 96, 208, 16, 48, 64)),
    ("4b", (160, 112, 224, 24, 64, 64)),
    "pool",
    ("5a", (256, 160, 320, 32, 128, 128)),
)
GOOGLENET_STEM = 192  # channels entering module 3a


def googlenet_small(
    input_shape,
    num_outputs,
    dtype=np.float32,
    width: float = 0.5,
    batch_norm: bool = True,
    dropout: float = 0.4,
):
    """A GoogLeNet for 32-48 px images.

    The ImageNet stem (7x7/2 conv, pools, 3x3 convs) that shrinks 224 px to 28 px
    is replaced by one 3x3 convolution, as in GoogLeNet's small-image ports; then
    modules 3a, 3b, pool, 4a, 4b, pool, 5a with the paper's widths times
    ``width``, global average pooling, dropout (0.4, as in the paper) and the
    output layer.  ``batch_norm`` inserts batch norm after every convolution
    (BN-Inception style), which makes the net train from scratch without the
    paper's auxiliary classifiers.  32x32 inputs end at 8x8 before pooling.
    """
    channels, height, width_px = image_shape("googlenet_small", input_shape)
    if width <= 0:
        raise ConfigError(f"googlenet_small width must be positive, got {width}")
    scaled = lambda c: max(1, int(round(c * width)))  # noqa: E731
    stem = scaled(GOOGLENET_STEM)
    layers = conv_unit(channels, stem, 3, batch_norm, dtype)
    current = stem
    for stage in GOOGLENET_SMALL_STAGES:
        if stage == "pool":
            layers.append(MaxPool2D(3, stride=2, padding=1, dtype=dtype))
            continue
        _, widths = stage
        c1, c3_reduce, c3, c5_reduce, c5, pool_proj = (scaled(c) for c in widths)
        layers.append(inception_module(current, c1, c3_reduce, c3, c5_reduce, c5, pool_proj, batch_norm, dtype))
        current = c1 + c3 + c5 + pool_proj
    layers.append(GlobalAvgPool2D(dtype=dtype))
    features = feature_size("googlenet_small", layers, (channels, height, width_px), dtype)
    if dropout > 0:
        layers.append(Dropout(dropout, dtype=dtype))
    layers.append(Dense(features, int(num_outputs), dtype=dtype))
    return Sequential(layers, dtype=dtype)


@hookimpl
def rabbit_architectures():
    return {"googlenet_small": googlenet_small}
