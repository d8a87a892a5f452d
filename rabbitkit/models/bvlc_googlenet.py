"""BVLC GoogLeNet, the Caffe Model Zoo net that google/deepdream dreams with
(``bvlc_googlenet.caffemodel``; layers as in its ``deploy.prototxt``).

Caffe's original: convolutions with biases, local response normalisation after
``pool1`` and ``conv2``, ceil-mode pools, no batch norm, BGR 0-255 input with
the mean pixel [104, 117, 123] subtracted.  Children are named after the Caffe
layers with ``/`` as ``_`` (``conv1_7x7_s2``, ``pool1_norm1``) and Inception
modules ``inception_4c`` with branches ``branch1`` (``1x1``), ``branch2``
(``3x3_reduce``, ``3x3``), ``branch3`` (``5x5_reduce``, ``5x5``) and
``branch4`` (``pool``, ``pool_proj``).  Every Caffe layer name is an alias
(``model.get_layer("inception_4c/output")``, ``"conv2/norm2"``), and Caffe's
blobs ``<layer>/0`` (weights) and ``<layer>/1`` (biases) map to the
parameters.  The caffemodel's training-only auxiliary classifiers
(``loss1/*``, ``loss2/*``) are not part of the net and are skipped.

The classifier needs 224x224 input (``pool5/7x7_s1`` is a 7x7 window); the
convolutional part runs on any size (Deep Dream stops at an Inception layer).
"""
import numpy as np

from ..errors import ConfigError
from ..hookspecs import hookimpl
from ..layers.activations import ReLU
from ..layers.branches import Concat
from ..layers.conv2d import Conv2D
from ..layers.dense import Dense
from ..layers.dropout import Dropout
from ..layers.flatten import Flatten
from ..layers.lrn import LocalResponseNorm
from ..layers.pooling import AvgPool2D, MaxPool2D
from ..layers.sequential import Sequential
from ._blocks import image_shape
from ._zoo import CAFFE_INPUT, pretrained_layout

# (module, in, 1x1, 3x3_reduce, 3x3, 5x5_reduce, 5x5, pool_proj) or a pool between stages
STAGES = (
    ("inception_3a", 192, 64, 96, 128, 16, 32, 32),
    ("inception_3b", 256, 128, 128, 192, 32, 96, 64),
    ("pool3/3x3_s2",),
    ("inception_4a", 480, 192, 96, 208, 16, 48, 64),
    ("inception_4b", 512, 160, 112, 224, 24, 64, 64),
    ("inception_4c", 512, 128, 128, 256, 24, 64, 64),
    ("inception_4d", 512, 112, 144, 288, 32, 64, 64),
    ("inception_4e", 528, 256, 160, 320, 32, 128, 128),
    ("pool4/3x3_s2",),
    ("inception_5a", 832, 256, 160, 320, 32, 128, 128),
    ("inception_5b", 832, 384, 192, 384, 48, 128, 128),
)


class CaffeNames:
    """Collects ``{Caffe layer name: dotted name}`` while the net is built."""

    def __init__(self):
        self.aliases = {}

    def top(self, caffe_name):
        """The child name of a top-level Caffe layer (``conv1/7x7_s2`` -> ``conv1_7x7_s2``)."""
        name = caffe_name.replace("/", "_")
        self.aliases[caffe_name] = name
        return name

    def blobs(self, model):
        """Caffe blob names (``<layer>/0``, ``<layer>/1``) -> parameter names."""
        params = {name for name, _, _ in model.named_parameters()}
        table = {}
        for caffe_name, dotted in self.aliases.items():
            for index, key in enumerate(("weight", "bias")):
                if f"{dotted}.{key}" in params:
                    table[f"{caffe_name}/{index}"] = f"{dotted}.{key}"
        return table


def conv_relu(conv_name, relu_name, cin, cout, kernel, dtype):
    """{conv_name: conv (padding keeps the size), relu_name: ReLU} inside a branch."""
    return {conv_name: Conv2D(cin, cout, kernel, padding=kernel // 2, dtype=dtype), relu_name: ReLU(dtype=dtype)}


def inception(names, module, cin, c1, c3r, c3, c5r, c5, pool_proj, dtype):
    branches = {
        "branch1": conv_relu("1x1", "relu_1x1", cin, c1, 1, dtype),
        "branch2": {**conv_relu("3x3_reduce", "relu_3x3_reduce", cin, c3r, 1, dtype),
                    **conv_relu("3x3", "relu_3x3", c3r, c3, 3, dtype)},
        "branch3": {**conv_relu("5x5_reduce", "relu_5x5_reduce", cin, c5r, 1, dtype),
                    **conv_relu("5x5", "relu_5x5", c5r, c5, 5, dtype)},
        "branch4": {"pool": MaxPool2D(3, stride=1, padding=1, ceil_mode=True, dtype=dtype),
                    **conv_relu("pool_proj", "relu_pool_proj", cin, pool_proj, 1, dtype)},
    }
    for branch, layers in branches.items():
        for local in layers:
            names.aliases[f"{module}/{local}"] = f"{module}.{branch}.{local}"
    names.aliases[f"{module}/output"] = module
    return Concat({branch: Sequential(layers, dtype=dtype) for branch, layers in branches.items()}, dtype=dtype)


def lrn(dtype):
    return LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=1.0, dtype=dtype)


@pretrained_layout(preprocessing=CAFFE_INPUT, head="loss3_classifier", caffe=True)
def bvlc_googlenet(input_shape, num_outputs, dtype=np.float32, dropout: float = 0.4):
    """BVLC GoogLeNet logits (Caffe layout, see the module docstring)."""
    shape = image_shape("bvlc_googlenet", input_shape)
    if shape[1:] != (224, 224):
        raise ConfigError(f"bvlc_googlenet classifies 224x224 input (pool5/7x7_s1 is a 7x7 window), got "
                          f"{shape[1]}x{shape[2]}; build it at 224 and run other sizes up to an inception layer")
    names = CaffeNames()
    layers = {
        names.top("conv1/7x7_s2"): Conv2D(shape[0], 64, 7, stride=2, padding=3, dtype=dtype),
        names.top("conv1/relu_7x7"): ReLU(dtype=dtype),
        names.top("pool1/3x3_s2"): MaxPool2D(3, stride=2, ceil_mode=True, dtype=dtype),
        names.top("pool1/norm1"): lrn(dtype),
        names.top("conv2/3x3_reduce"): Conv2D(64, 64, 1, dtype=dtype),
        names.top("conv2/relu_3x3_reduce"): ReLU(dtype=dtype),
        names.top("conv2/3x3"): Conv2D(64, 192, 3, padding=1, dtype=dtype),
        names.top("conv2/relu_3x3"): ReLU(dtype=dtype),
        names.top("conv2/norm2"): lrn(dtype),
        names.top("pool2/3x3_s2"): MaxPool2D(3, stride=2, ceil_mode=True, dtype=dtype),
    }
    for stage in STAGES:
        if len(stage) == 1:
            layers[names.top(stage[0])] = MaxPool2D(3, stride=2, ceil_mode=True, dtype=dtype)
        else:
            layers[stage[0]] = inception(names, *stage, dtype=dtype)
    layers.update({
        names.top("pool5/7x7_s1"): AvgPool2D(7, stride=1, dtype=dtype),
        names.top("pool5/drop_7x7_s1"): Dropout(dropout, dtype=dtype),
        "flatten": Flatten(dtype=dtype),
        names.top("loss3/classifier"): Dense(1024, int(num_outputs), dtype=dtype),
    })
    model = Sequential(layers, dtype=dtype)
    model.layer_aliases = dict(names.aliases)
    model.external_names = {"caffe": names.blobs(model)}
    model.ignored_weights = ("loss1/*", "loss2/*")
    return model


@hookimpl
def rabbit_architectures():
    return {"bvlc_googlenet": bvlc_googlenet}
