"""Layers.  ``rabbitkit.layers.NAME`` resolves any registered layer by name, built-in
or from a plugin, e.g. ``from rabbitkit.layers import Dense, Conv2D``."""
from .base import Layer, Param, fans, freeze, resolve_dtype

__all__ = ["Layer", "Param", "fans", "freeze", "resolve_dtype"]


def __getattr__(name):
    if name.startswith("_"):  # private submodules (``from . import _conv_winograd``), never layers
        raise AttributeError(f"module 'rabbitkit.layers' has no attribute '{name}'")
    from ..plugins import registry

    layers = registry("layers")
    if name in layers:
        return layers.get(name)
    raise AttributeError(f"module 'rabbitkit.layers' has no layer '{name}'")
