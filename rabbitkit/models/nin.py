"""Network in Network (Lin, Chen & Yan, ICLR 2014), the CIFAR-10 model.

Three "mlpconv" layers, each a spatial convolution followed by two 1x1
convolutions (a small MLP slid over the image), all with ReLU:

=========  ===============================================================
mlpconv 1  conv 5x5 192 (pad 2), 1x1 160, 1x1 96, max-pool 3/2, dropout 0.5
mlpconv 2  conv 5x5 192 (pad 2), 1x1 192, 1x1 192, avg-pool 3/2, dropout 0.5
mlpconv 3  conv 3x3 192 (pad 1), 1x1 192, 1x1 num_outputs
head       global average pooling (the logits; no fully connected layer)
=========  ===============================================================

The authors' Caffe model also puts a ReLU after the last 1x1 convolution; that
clamps every logit at >= 0, and a class whose map starts negative everywhere
gets no gradient at all, so here it is off by default (``final_relu=True``
restores it).  Pools use padding 1 (PyTorch floor mode), reproducing
Caffe's ceil-mode sizes 32 -> 16 -> 8.  At (3, 32, 32) with 10 classes and
``width=1`` it has 966,986 parameters.
"""
import numpy as np

from ..errors import ConfigError
from ..hookspecs import hookimpl
from ..layers.activations import ReLU
from ..layers.conv2d import Conv2D
from ..layers.dropout import Dropout
from ..layers.pooling import AvgPool2D, GlobalAvgPool2D, MaxPool2D
from ..layers.sequential import Sequential
from ._blocks import feature_size, image_shape


def mlpconv(in_channels, widths, kernel_size, dtype, final_relu=True):
    """A k x k convolution then 1x1 convolutions, ReLU after each (except maybe the last)."""
    layers = []
    for index, out_channels in enumerate(widths):
        size = kernel_size if index == 0 else 1
        layers.append(Conv2D(in_channels, out_channels, size, padding=size // 2, dtype=dtype))
        if final_relu or index < len(widths) - 1:
            layers.append(ReLU(dtype=dtype))
        in_channels = out_channels
    return layers


def nin(
    input_shape,
    num_outputs,
    dtype=np.float32,
    width: float = 1.0,
    dropout: float = 0.5,
    final_relu: bool = False,
):
    """Network in Network logits (see the module docstring).

    ``width`` scales the 192/160/96 hidden channel counts; ``dropout`` follows
    the first two mlpconv layers; ``final_relu`` adds the authors' ReLU before
    the global average pooling.
    """
    channels, height, width_px = image_shape("nin", input_shape)
    if width <= 0:
        raise ConfigError(f"nin width must be positive, got {width}")
    scaled = lambda c: max(1, int(round(c * width)))  # noqa: E731
    drop = [Dropout(dropout, dtype=dtype)] if dropout > 0 else []
    layers = mlpconv(channels, (scaled(192), scaled(160), scaled(96)), 5, dtype)
    layers += [MaxPool2D(3, stride=2, padding=1, dtype=dtype), *drop]
    layers += mlpconv(scaled(96), (scaled(192), scaled(192), scaled(192)), 5, dtype)
    layers += [AvgPool2D(3, stride=2, padding=1, dtype=dtype), *([Dropout(dropout, dtype=dtype)] if drop else [])]
    layers += mlpconv(scaled(192), (scaled(192), scaled(192), int(num_outputs)), 3, dtype, final_relu)
    layers.append(GlobalAvgPool2D(dtype=dtype))
    feature_size("nin", layers, (channels, height, width_px), dtype)  # checks the input fits
    return Sequential(layers, dtype=dtype)


@hookimpl
def rabbit_architectures():
    return {"nin": nin}
