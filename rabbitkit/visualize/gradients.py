"""Objective value and input gradient of an image batch: whole or tile by tile."""
import numpy as np

from ..backend import to_host
from ..probe import FeatureProbe
from .tiling import geometry_of, tiled_gradient


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
        # Check geometry before opening the probe, so a refusal leaves the model untouched.
        self.geometries = geometry_of(model, objective.layers) if self.tile_size else None
        self.probe = FeatureProbe(model, objective.layers)

    def __call__(self, x, offset=(0, 0)):
        x = np.ascontiguousarray(x, dtype=self.model.dtype)
        if self.tile_size:
            return tiled_gradient(self.probe, x, self.objective, self.geometries, self.tile_size, offset)
        features = self.probe.forward(x)
        value, grads = self.objective({name: np.asarray(to_host(f)) for name, f in features.items()})
        return float(value), np.asarray(to_host(self.probe.backward(grads)))

    def close(self):
        self.probe.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
