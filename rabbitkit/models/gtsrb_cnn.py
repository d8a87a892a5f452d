"""ConvNets for traffic-sign recognition (GTSRB, 43 classes).

* ``variant="ciresan"``: one committee member of Ciresan, Meier, Masci &
  Schmidhuber (IDSIA, IJCNN 2011 / Neural Networks 2012) on 48x48 inputs:
  conv 7x7 100 -> max-pool 2 -> conv 4x4 150 -> max-pool 2 -> conv 4x4 250 ->
  max-pool 2 -> fc 300 -> fc out, tanh units.  At (3, 48, 48) with 43 classes it
  has 1,543,443 parameters.  Works for inputs of 32x32 and up.
* ``variant="modern"`` (default): blocks of 3x3 convolutions (padding 1, no bias)
  each followed by batch norm and ReLU, a 2x2 max-pool after every block, then
  fc -> batch norm -> ReLU -> dropout -> fc out.  The default blocks
  32-32 | 64-64 | 128 with fc 256 and dropout 0.5 train well on 32 or 48 px
  GTSRB on two CPU cores.

``spatial_transformer=True`` puts a :class:`SpatialTransformer` with the default
localization net (identity at start) in front of either variant.

``multiscale=True`` (modern only) feeds the classifier every block's output, not
only the last one's: each earlier block's output is average-pooled to the last
block's size and concatenated with it (the multi-scale features of Sermanet &
LeCun, IJCNN 2011: coarse shapes from the early stage beside the late stage's
detail).
"""
import numpy as np

from ..errors import ConfigError
from ..hookspecs import hookimpl
from ..layers.adaptive_pool import AdaptiveAvgPool2D
from ..layers.batchnorm import BatchNorm
from ..layers.branches import Concat
from ..layers.conv2d import Conv2D
from ..layers.dense import Dense
from ..layers.dropout import Dropout
from ..layers.flatten import Flatten
from ..layers.pooling import MaxPool2D
from ..layers.sequential import Sequential
from ..layers.spatial_transformer import SpatialTransformer, default_localization
from ._blocks import feature_size, image_shape, make_activation

VARIANTS = ("modern", "ciresan")
MODERN_CHANNELS = ((32, 32), (64, 64), (128,))


def ciresan_features(channels, activation, dtype):
    """The IDSIA committee member's convolutional part (before flattening)."""
    layers = []
    for out_channels, size in ((100, 7), (150, 4), (250, 4)):
        layers += [
            Conv2D(channels, out_channels, size, dtype=dtype),
            make_activation(activation, dtype),
            MaxPool2D(2, dtype=dtype),
        ]
        channels = out_channels
    return layers


def modern_blocks(channels, blocks, activation, dtype, block_dropout=()):
    """One list of layers per block: 3x3 conv -> batch norm -> activation per width,
    a 2x2 max-pool, then dropout with the block's probability from ``block_dropout``
    (none where it is 0 or the list ends)."""
    out = []
    for index, block in enumerate(blocks):
        layers = []
        for out_channels in block:
            out_channels = int(out_channels)
            layers += [
                Conv2D(channels, out_channels, 3, padding=1, bias=False, dtype=dtype),  # BN's shift is the bias
                BatchNorm(out_channels, dtype=dtype),
                make_activation(activation, dtype),
            ]
            channels = out_channels
        layers.append(MaxPool2D(2, dtype=dtype))
        if index < len(block_dropout) and block_dropout[index] > 0:
            layers.append(Dropout(block_dropout[index], dtype=dtype))
        out.append(layers)
    return out


def multiscale_features(blocks, input_shape, dtype):
    """The blocks' layers with every block's output also average-pooled to the last
    block's spatial size, flattened and concatenated (first block's first).

    Built from the last block back: after block b, a Concat of (pool + flatten of
    block b's output) and (the blocks after b, with their own joins)."""
    final = Sequential([layer for block in blocks for layer in block], dtype=dtype).output_shape(tuple(input_shape))
    tail = Sequential(blocks[-1] + [Flatten(dtype=dtype)], dtype=dtype)
    for block in reversed(blocks[:-1]):
        pooled = Sequential([AdaptiveAvgPool2D(final[1:], dtype=dtype), Flatten(dtype=dtype)], dtype=dtype)
        tail = Sequential(block + [Concat([pooled, tail], axis=1, dtype=dtype)], dtype=dtype)
    return list(tail.layers)  # the first block's layers stay at the top level


def block_dropout_list(block_dropout, blocks):
    """``block_dropout`` as a tuple of probabilities in [0, 1), at most one per block."""
    if block_dropout is None:
        return ()
    values = block_dropout if isinstance(block_dropout, (list, tuple)) else [block_dropout] * blocks
    try:
        values = tuple(float(p) for p in values)
    except (TypeError, ValueError):
        values = None
    if values is None or len(values) > blocks or not all(0.0 <= p < 1.0 for p in values):
        raise ConfigError(f"gtsrb_cnn block_dropout must be a probability in [0, 1) or a list of at most {blocks} "
                          f"of them (one per block), got {block_dropout!r}")
    return values


def gtsrb_cnn(
    input_shape,
    num_outputs,
    dtype=np.float32,
    variant: str = "modern",
    activation: str | None = None,
    channels: list | None = None,
    fc_width: int | None = None,
    dropout: float | None = None,
    block_dropout: list | None = None,
    spatial_transformer: bool = False,
    multiscale: bool = False,
):
    """A GTSRB ConvNet (see the module docstring for both variants).

    ``activation``: registered layer name, ``"Tanh"`` for ciresan and ``"ReLU"``
    for modern by default.  ``channels`` (modern only): list of blocks, each a
    list of conv widths, default ``[[32, 32], [64, 64], [128]]``.  ``fc_width``:
    hidden fully connected width (300 for ciresan, 256 for modern).  ``dropout``:
    before the output layer (0 for ciresan, 0.5 for modern).  ``block_dropout``
    (modern only): dropout probability after each block's pooling, e.g.
    ``[0.1, 0.2, 0.3]`` (default: none).
    ``spatial_transformer``: prepend a spatial transformer.  ``multiscale`` (modern
    only): the classifier sees every block's output (see the module docstring).
    """
    shape = image_shape("gtsrb_cnn", input_shape)
    if variant not in VARIANTS:
        raise ConfigError(f"gtsrb_cnn variant must be one of {', '.join(VARIANTS)}; got {variant!r}")
    if variant == "ciresan":
        for option, value in (("channels", channels), ("block_dropout", block_dropout),
                              ("multiscale", multiscale or None)):
            if value is not None:
                raise ConfigError(f"gtsrb_cnn option '{option}' applies to variant 'modern' only")
        activation = activation or "Tanh"
        fc_width = 300 if fc_width is None else int(fc_width)
        dropout = 0.0 if dropout is None else float(dropout)
        features = ciresan_features(shape[0], activation, dtype) + [Flatten(dtype=dtype)]
    else:
        activation = activation or "ReLU"
        fc_width = 256 if fc_width is None else int(fc_width)
        dropout = 0.5 if dropout is None else float(dropout)
        blocks = MODERN_CHANNELS if channels is None else channels
        if not blocks or any(len(block) == 0 for block in blocks):
            raise ConfigError(f"gtsrb_cnn channels must be a list of non-empty lists of widths, got {channels!r}")
        block_dropout = block_dropout_list(block_dropout, len(blocks))
        layer_blocks = modern_blocks(shape[0], blocks, activation, dtype, block_dropout)
        if multiscale and len(layer_blocks) > 1:
            feature_size("gtsrb_cnn (modern)", [layer for block in layer_blocks for layer in block], shape, dtype)
            features = multiscale_features(layer_blocks, shape, dtype)
        else:
            features = [layer for block in layer_blocks for layer in block] + [Flatten(dtype=dtype)]
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"gtsrb_cnn dropout must be in [0, 1), got {dropout}")
    flat = feature_size(f"gtsrb_cnn ({variant})", features, shape, dtype)

    layers = []
    if spatial_transformer:
        layers.append(SpatialTransformer(default_localization(shape, dtype=dtype), dtype=dtype))
    layers += features
    layers.append(Dense(flat, fc_width, bias=variant == "ciresan", dtype=dtype))
    if variant == "modern":
        layers.append(BatchNorm(fc_width, dtype=dtype))
    layers.append(make_activation(activation, dtype))
    if dropout > 0:
        layers.append(Dropout(dropout, dtype=dtype))
    layers.append(Dense(fc_width, int(num_outputs), dtype=dtype))
    return Sequential(layers, dtype=dtype)


@hookimpl
def rabbit_architectures():
    return {"gtsrb_cnn": gtsrb_cnn}
