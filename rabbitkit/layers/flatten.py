"""Flatten: (N, ...) -> (N, prod(...)), e.g. between the conv and dense parts of a net.

A reshape of a C-contiguous array is a view on the host and on CUDA device
arrays alike, so the layer needs no kernels and runs on any device.
"""
import math

from ..hookspecs import hookimpl
from .base import Layer


class Flatten(Layer):
    """Keep the batch axis, merge all others (a view, no copy)."""

    device_agnostic = True

    def forward_cpu(self, x, training):
        self._x_shape = tuple(x.shape)
        return x.reshape(x.shape[0], math.prod(x.shape[1:]))

    def backward_cpu(self, dy):
        return dy.reshape(self._x_shape)

    # Device arrays reshape the same way.
    forward_cuda = forward_cpu
    backward_cuda = backward_cpu

    def output_shape(self, input_shape):
        return (math.prod(input_shape),)


@hookimpl
def rabbit_layers():
    return {"Flatten": Flatten}
