"""Helpers every built-in architecture module shares: activation by name and
input-shape checks.  (The leading underscore keeps this module from being
registered as a plugin.)

Every architecture factory has the signature
``factory(input_shape, num_outputs, dtype=np.float32, **options)`` with explicit,
annotated keyword options, takes ``input_shape`` as (C, H, W), and returns a
:class:`~rabbitkit.layers.sequential.Sequential` ending in logits: the softmax is
fused into the cross-entropy loss.
"""
import math

from ..errors import ConfigError
from ..layers.sequential import Sequential


def make_activation(name, dtype):
    """A new activation layer by its registered layer name ("ReLU", "Tanh", ...)."""
    from ..plugins import registry  # the registry imports this module: resolve at call time

    return registry("layers").get(name)(dtype=dtype)


def image_shape(architecture, input_shape):
    """``input_shape`` as a (C, H, W) tuple of positive ints, or a one-line ConfigError."""
    try:
        shape = tuple(int(v) for v in input_shape)
    except (TypeError, ValueError):
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(f"{architecture} needs an image input shape (channels, height, width), got {input_shape!r}")
    return shape


def feature_size(architecture, layers, input_shape, dtype):
    """Number of features the convolutional ``layers`` produce per sample.

    Raises a ConfigError naming the architecture when the input is too small for
    its convolutions and pools.
    """
    channels, height, width = input_shape
    try:
        shape = Sequential(layers, dtype=dtype).output_shape(tuple(input_shape))
    except ConfigError as err:
        raise ConfigError(f"{architecture} does not fit a {channels}x{height}x{width} input: {err}") from None
    return math.prod(shape)
