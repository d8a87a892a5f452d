"""Input gradients of large images, tile by tile, with memory bounded by the tile size.

A tile owns the output positions of each probed layer whose receptive-field
centre falls inside it; the tile is run through the net with a halo of the
layer's receptive field around it, and the gradient is injected at the owned
positions only.  Because every owned position sees exactly the pixels it sees
in the whole image (the halo holds them; at the image border the crop's
padding *is* the image's padding), the summed tile gradients equal the
whole-image gradient up to float rounding: no seams, unlike google/deepdream's
``calc_grad_tiled``, whose tiles have no halo and which hides the seams with a
random shift.  The tile grid here is shifted at random too (``offset``), which
changes only the rounding.

Tiling needs the geometry (receptive field, stride, padding offset) of the path
from the input to each probed layer: convolutions, pooling, element-wise
layers (activations, batch norm, dropout, LRN) and branches whose strides agree.
A layer whose output mixes all positions (dense, flatten, global pooling, local
contrast normalisation with its image-wide statistic) raises
:class:`TilingError`: tile only up to a convolutional layer.
"""
import dataclasses
import math

import numpy as np

from ..backend import to_host
from ..errors import RabbitError
from ..layers.activations import Elementwise, PReLU
from ..layers.batchnorm import BatchNorm
from ..layers.branches import Branches, Identity
from ..layers.conv2d import Conv2D
from ..layers.dropout import Dropout
from ..layers.lrn import LocalResponseNorm
from ..layers.pooling import Pool2D
from ..layers.sequential import Sequential
from ..probe import MODEL_OUTPUT

# Layers that keep each position to itself (LRN normalises across channels only).
POINTWISE = (Elementwise, PReLU, BatchNorm, Dropout, Identity, LocalResponseNorm)


class TilingError(RabbitError):
    """The path to a layer mixes image positions, so its gradient cannot be tiled."""


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Per spatial axis (rows, columns): receptive field, stride (jump) and start offset.

    Output position ``p`` of the layer sees input pixels
    ``[start + p * jump, start + p * jump + field)`` (start is minus the padding
    accumulated on the way).
    """

    field: tuple = (1, 1)
    jump: tuple = (1, 1)
    start: tuple = (0, 0)

    def through(self, kernel, stride, padding):
        return Geometry(
            tuple(f + (k - 1) * j for f, k, j in zip(self.field, kernel, self.jump)),
            tuple(j * s for j, s in zip(self.jump, stride)),
            tuple(s - p * j for s, p, j in zip(self.start, padding, self.jump)),
        )


def _join(geometries, where):
    jumps = {g.jump for g in geometries}
    if len(jumps) != 1:
        raise TilingError(f"branches of {where} have different strides {sorted(jumps)}; cannot tile through them")
    start = tuple(min(g.start[a] for g in geometries) for a in range(2))
    end = tuple(max(g.start[a] + g.field[a] for g in geometries) for a in range(2))
    return Geometry(tuple(e - s for s, e in zip(start, end)), geometries[0].jump, start)


def layer_geometries(model):
    """``{dotted name: Geometry or TilingError}`` for every layer, and ``""`` for the model output."""
    table = {}

    def walk(layer, name, geometry):
        if isinstance(geometry, TilingError):
            out = geometry
            for child_name, child in layer.named_children():
                walk(child, f"{name}.{child_name}" if name else child_name, geometry)
        elif isinstance(layer, Sequential):
            out = geometry
            for child_name, child in layer.named_children():
                out = walk(child, f"{name}.{child_name}" if name else child_name, out)
        elif isinstance(layer, Branches):
            outs = [walk(child, f"{name}.{child_name}" if name else child_name, geometry)
                    for child_name, child in layer.named_children()]
            failed = [o for o in outs if isinstance(o, TilingError)]
            out = failed[0] if failed else _join(outs, name or type(layer).__name__)
        elif isinstance(layer, (Conv2D, Pool2D)):
            out = geometry.through(layer.kernel_size, layer.stride, layer.padding)
        elif isinstance(layer, POINTWISE):
            out = geometry
        else:
            out = TilingError(f"layer '{name}' ({type(layer).__name__}) mixes image positions; "
                              "tile only up to a convolutional layer before it")
            for child_name, child in layer.named_children():
                walk(child, f"{name}.{child_name}" if name else child_name, out)
        table[name] = out
        return out

    walk(model, "", Geometry())
    table[MODEL_OUTPUT] = table.pop("")
    return table


def geometry_of(model, names):
    """The :class:`Geometry` of each of ``names``; a :class:`TilingError` when one has none."""
    table = layer_geometries(model)
    out = {}
    for name in names:
        canonical = name
        if name not in table:
            layer = model.get_layer(name)  # an unknown name: the one-line ConfigError listing the nearest
            canonical = next(n for n, l in model.named_layers() if l is layer)
        geometry = table[canonical]
        if isinstance(geometry, TilingError):
            raise geometry
        out[name] = geometry
    return out


def _owned(geometry, axis, low, high, size_hint):
    """Output positions p (of one axis) whose receptive-field centre lies in [low, high)."""
    jump, start, field = geometry.jump[axis], geometry.start[axis], geometry.field[axis]
    centre = start + field / 2.0
    first = max(0, math.ceil((low - centre) / jump)) if low != -math.inf else 0
    last = math.ceil((high - centre) / jump) if high != math.inf else size_hint
    return first, min(last, size_hint)


def _boundaries(size, tile, offset):
    """Tile edges along one axis: the first and last tiles reach to the image ends."""
    inner = list(range(offset % tile or tile, size, tile))
    return [-math.inf] + [edge for edge in inner if 0 < edge < size] + [math.inf]


def tiled_gradient(probe, x, objective, geometries, tile_size, offset=(0, 0)):
    """Objective value and input gradient of ``x`` (N, C, H, W), computed tile by tile.

    ``probe``: an open :class:`~rabbitkit.probe.FeatureProbe` on the objective's
    layers; ``objective(features) -> (value, {name: grad})`` must be a sum over
    positions (its ``tileable`` attribute); ``geometries`` from :func:`geometry_of`.
    ``tile_size``: input pixels per tile edge; each run also holds a halo of
    one receptive field.  ``offset`` shifts the tile grid (rows, columns).
    """
    if not getattr(objective, "tileable", False):
        raise TilingError(f"objective {objective!r} is not a sum over positions; it cannot be tiled")
    height, width = x.shape[-2:]
    align = [math.lcm(*(g.jump[a] for g in geometries.values())) for a in range(2)]
    dx = np.zeros(x.shape, x.dtype)
    total = 0.0
    edges = [_boundaries(height, tile_size, offset[0]), _boundaries(width, tile_size, offset[1])]
    for r in range(len(edges[0]) - 1):
        for c in range(len(edges[1]) - 1):
            bounds = ((edges[0][r], edges[0][r + 1]), (edges[1][c], edges[1][c + 1]))
            value = _one_tile(probe, x, objective, geometries, bounds, align, dx)
            total += value
    return total, dx


def _one_tile(probe, x, objective, geometries, bounds, align, dx):
    size = x.shape[-2:]
    big = 1 << 30
    owned, crop = {}, [[size[0], 0], [size[1], 0]]
    for name, g in geometries.items():
        ranges = [_owned(g, a, *bounds[a], big) for a in range(2)]
        if any(first >= last for first, last in ranges):
            continue
        owned[name] = ranges
        for a, (first, last) in enumerate(ranges):
            crop[a][0] = min(crop[a][0], g.start[a] + first * g.jump[a])
            crop[a][1] = max(crop[a][1], g.start[a] + (last - 1) * g.jump[a] + g.field[a])
    if not owned:
        return 0.0
    # The crop starts on a multiple of every stride, so crop positions map onto image positions.
    crop = [(max(0, lo) // align[a] * align[a], min(size[a], hi)) for a, (lo, hi) in enumerate(crop)]
    if any(lo >= hi for lo, hi in crop):
        return 0.0
    (r0, r1), (c0, c1) = crop
    features = probe.forward(np.ascontiguousarray(x[..., r0:r1, c0:c1]))
    local = {}
    for name, ((p0, p1), (q0, q1)) in owned.items():
        g = geometries[name]
        shift = (r0 // g.jump[0], c0 // g.jump[1])
        rows = slice(max(0, p0 - shift[0]), max(0, p1 - shift[0]))
        cols = slice(max(0, q0 - shift[1]), max(0, q1 - shift[1]))
        local[name] = (rows, cols)
    cropped = {name: np.asarray(to_host(features[name]))[..., rows, cols] for name, (rows, cols) in local.items()}
    if any(array.size == 0 for array in cropped.values()):
        cropped = {n: a for n, a in cropped.items() if a.size}
        local = {n: local[n] for n in cropped}
    if not cropped:
        return 0.0
    value, grads = objective(cropped)
    injected = {}
    for name, grad in grads.items():
        full = np.zeros(tuple(features[name].shape), dtype=np.asarray(grad).dtype)
        rows, cols = local[name]
        full[..., rows, cols] = grad
        injected[name] = full
    dx[..., r0:r1, c0:c1] += np.asarray(to_host(probe.backward(injected)))
    return float(value)
