"""GoogLeNet (Inception v1) as torchvision's ``googlenet`` (batch-norm variant,
ported from TensorFlow), so ``googlenet-1378be20.pth`` loads without renaming.

``BasicConv2d`` is conv (no bias) -> batch norm (eps 0.001) -> ReLU, named
``conv``/``bn``; an Inception module's branches are ``branch1`` (1x1),
``branch2`` (1x1 -> 3x3), ``branch3`` (1x1 -> 3x3: torchvision keeps a 3x3
where the paper has 5x5, pytorch/vision#906) and ``branch4`` (3x3 max-pool
-> 1x1).  Pools between stages are ceil-mode.  ``transform_input`` maps
ImageNet-normalised input to the [-1, 1] scaling the TensorFlow weights expect
(torchvision sets it for the pretrained net).

``aux_logits`` holds the auxiliary heads ``aux1``/``aux2`` (loaded from the
file, listed after ``fc``); they are not part of the inference path.  Without
them the file's aux tensors are skipped.  6,624,904 parameters without the
heads, 13,004,888 with them (1000 classes).
"""
import numpy as np

from ..hookspecs import hookimpl
from ..layers.activations import ReLU
from ..layers.adaptive_pool import AdaptiveAvgPool2D
from ..layers.batchnorm import BatchNorm
from ..layers.branches import Concat
from ..layers.conv2d import Conv2D
from ..layers.dense import Dense
from ..layers.dropout import Dropout
from ..layers.flatten import Flatten
from ..layers.pooling import GlobalAvgPool2D, MaxPool2D
from ..layers.sequential import Sequential
from ._blocks import feature_size, image_shape
from ._zoo import TORCHVISION_INPUT, pretrained_layout
from ._zoo_layers import ChannelAffine, Regrouped

# (name, in, ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj) or a ceil-mode max-pool (name, kernel)
GOOGLENET_STAGES = (
    ("inception3a", 192, 64, 96, 128, 16, 32, 32),
    ("inception3b", 256, 128, 128, 192, 32, 96, 64),
    ("maxpool3", 3),
    ("inception4a", 480, 192, 96, 208, 16, 48, 64),
    ("inception4b", 512, 160, 112, 224, 24, 64, 64),
    ("inception4c", 512, 128, 128, 256, 24, 64, 64),
    ("inception4d", 512, 112, 144, 288, 32, 64, 64),
    ("inception4e", 528, 256, 160, 320, 32, 128, 128),
    ("maxpool4", 2),
    ("inception5a", 832, 256, 160, 320, 32, 128, 128),
    ("inception5b", 832, 384, 192, 384, 48, 128, 128),
)
AUX_INPUTS = {"aux1": 512, "aux2": 528}  # after inception4a and inception4d


def basic_conv(in_channels, out_channels, kernel_size, stride=1, padding=0, dtype=np.float32):
    return Sequential({"conv": Conv2D(in_channels, out_channels, kernel_size, stride, padding, bias=False, dtype=dtype),
                       "bn": BatchNorm(out_channels, eps=0.001, dtype=dtype), "relu": ReLU(dtype=dtype)}, dtype=dtype)


def inception(in_channels, ch1x1, ch3x3red, ch3x3, ch5x5red, ch5x5, pool_proj, dtype=np.float32):
    conv = lambda cin, cout, k: basic_conv(cin, cout, k, padding=k // 2, dtype=dtype)  # noqa: E731
    return Concat({
        "branch1": conv(in_channels, ch1x1, 1),
        "branch2": Sequential([conv(in_channels, ch3x3red, 1), conv(ch3x3red, ch3x3, 3)], dtype=dtype),
        "branch3": Sequential([conv(in_channels, ch5x5red, 1), conv(ch5x5red, ch5x5, 3)], dtype=dtype),
        "branch4": Sequential([MaxPool2D(3, stride=1, padding=1, ceil_mode=True, dtype=dtype),
                               conv(in_channels, pool_proj, 1)], dtype=dtype),
    }, dtype=dtype)


def inception_aux(in_channels, num_outputs, dtype=np.float32):
    return Sequential({
        "pool": AdaptiveAvgPool2D(4, dtype=dtype), "conv": basic_conv(in_channels, 128, 1, dtype=dtype),
        "flatten": Flatten(dtype=dtype), "fc1": Dense(2048, 1024, dtype=dtype), "relu": ReLU(dtype=dtype),
        "dropout": Dropout(0.7, dtype=dtype), "fc2": Dense(1024, num_outputs, dtype=dtype),
    }, dtype=dtype)


def transform_input_layer(dtype):
    """torchvision's ``_transform_input``: x * std / 0.5 + (mean - 0.5) / 0.5 per channel."""
    mean, std = TORCHVISION_INPUT["mean"], TORCHVISION_INPUT["std"]
    return ChannelAffine([s / 0.5 for s in std], [(m - 0.5) / 0.5 for m in mean], dtype=dtype)


@pretrained_layout(preprocessing=TORCHVISION_INPUT, head="fc", variants=({"aux_logits": True}, {}))
def googlenet(input_shape, num_outputs, dtype=np.float32, aux_logits: bool = False, transform_input: bool = True,
              dropout: float = 0.2):
    """GoogLeNet logits in torchvision's layout (see the module docstring)."""
    shape = image_shape("googlenet", input_shape)
    parts = {}
    if transform_input:
        parts["transform_input"] = transform_input_layer(dtype)
    parts.update({
        "conv1": basic_conv(shape[0], 64, 7, stride=2, padding=3, dtype=dtype),
        "maxpool1": MaxPool2D(3, stride=2, ceil_mode=True, dtype=dtype),
        "conv2": basic_conv(64, 64, 1, dtype=dtype),
        "conv3": basic_conv(64, 192, 3, padding=1, dtype=dtype),
        "maxpool2": MaxPool2D(3, stride=2, ceil_mode=True, dtype=dtype),
    })
    for name, *widths in GOOGLENET_STAGES:
        if len(widths) == 1:
            parts[name] = MaxPool2D(widths[0], stride=2, ceil_mode=True, dtype=dtype)
        else:
            parts[name] = inception(*widths, dtype=dtype)
    feature_size("googlenet", list(parts.values()), shape, dtype)  # a one-line error if the input is too small
    parts.update({"avgpool": GlobalAvgPool2D(dtype=dtype), "dropout": Dropout(dropout, dtype=dtype),
                  "fc": Dense(1024, int(num_outputs), dtype=dtype)})
    trunk = list(parts.values())
    if aux_logits:
        parts.update({name: inception_aux(width, int(num_outputs), dtype) for name, width in AUX_INPUTS.items()})
    model = Regrouped(trunk, parts, dtype=dtype)
    if not aux_logits:
        model.ignored_weights = ("aux1.*", "aux2.*")
    return model


@hookimpl
def rabbit_architectures():
    return {"googlenet": googlenet}
