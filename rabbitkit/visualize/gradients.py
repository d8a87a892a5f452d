"""Objective value and input gradient of an image batch: whole or tile by tile."""
import numpy as np

from ..backend import to_host
from ..errors import ConfigError
from ..probe import FeatureProbe
from .tiling import geometry_of, host_features, tiled_gradient


class ImageGradient:
    """``gradient(x) -> (value, dvalue/dx)`` of ``objective`` for float (N, C, H, W) ``x``.

    The model runs forward only to the objective's deepest layer, with frozen
    weights (see :class:`~rabbitkit.probe.FeatureProbe`).  ``tile_size`` (pixels)
    computes the gradient tile by tile with halos (:mod:`~rabbitkit.visualize.tiling`);
    ``offset`` shifts the tile grid.  Use as a context manager (it gives the model back).
    """

    def __init__(self, model, objective, tile_size=None):
        self.model = model
        self.objective = objective
        self.tile_size = None if tile_size is None else int(tile_size)
        check_layers(model, objective.layers)
        # Check geometry before opening the probe, so a refusal leaves the model untouched.
        self.geometries = geometry_of(model, objective.layers) if self.tile_size else None
        self.probe = FeatureProbe(model, objective.layers)

    def __call__(self, x, offset=(0, 0)):
        x = np.ascontiguousarray(x, dtype=self.model.dtype)
        if self.tile_size:
            return tiled_gradient(self.probe, x, self.objective, self.geometries, self.tile_size, offset)
        _, features = host_features(self.probe, x)
        value, grads = self.objective(features)
        return float(value), np.asarray(to_host(self.probe.backward(grads)))

    def close(self):
        self.probe.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def check_layers(model, names):
    """Every name must be a layer of ``model``; an index past a container's last
    layer, or one inside a plain layer, is reported as deeper than the model."""
    for name in names:
        if name == "":
            continue
        try:
            model.get_layer(name)
        except ConfigError as err:
            deeper = _deeper_than_model(model, name)
            raise (ConfigError(deeper) if deeper else err) from None


def _deeper_than_model(model, name):
    parent_name, _, last = name.rpartition(".")
    try:
        parent = model.get_layer(parent_name) if parent_name else model
    except ConfigError:
        return None
    children = parent.named_children()
    where = f"'{parent_name}' ({type(parent).__name__})" if parent_name else type(parent).__name__
    if not children:
        return f"layer '{name}' is deeper than the model: {where} has no layers inside"
    if last.isdigit() and all(child.isdigit() for child, _ in children) and int(last) >= len(children):
        return f"layer '{name}' is deeper than the model: {where} has layers 0..{len(children) - 1}"
    return None

