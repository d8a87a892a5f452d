"""The learned first-layer filters as an image grid (``filters.png``), as on the talk's
"learned weights" slide.  Conv filters show as small RGB (or grey) patches; the
first dense layer of an MLP on images shows each unit's weights as an image; any
other first layer (e.g. an MLP on 1-D data) shows its weight matrix as a heat map."""
import math

import numpy as np

from ..errors import RabbitError
from ..hookspecs import hookimpl
from .plotting import pyplot, save_figure


def first_weight(model):
    """The first parameter named like a weight with a kernel or matrix shape."""
    for name, layer, key in model.named_parameters():
        if layer.param_roles.get(key) == "weight" and len(layer.params[key].shape) >= 2:
            return name, np.asarray(layer.backend.to_host(layer.params[key]))
    return None, None


def filter_tiles(weight, input_shape):
    """Turn a weight tensor into tiles (count, h, w, channels) scaled to [0, 1] each."""
    if weight.ndim == 4:  # conv (out, in, kh, kw)
        tiles = weight.transpose(0, 2, 3, 1)
    elif weight.ndim == 2 and len(input_shape) == 3 and weight.shape[1] == int(np.prod(input_shape)):
        tiles = weight.reshape(weight.shape[0], *input_shape).transpose(0, 2, 3, 1)
    else:
        raise RabbitError(f"first-layer weight of shape {weight.shape} is not an image filter")
    if tiles.shape[-1] not in (1, 3):
        tiles = tiles[..., :1]  # show the first input channel
    low = tiles.min(axis=(1, 2, 3), keepdims=True)
    high = tiles.max(axis=(1, 2, 3), keepdims=True)
    return (tiles - low) / np.maximum(high - low, 1e-12)


def plot_weight_matrix(name, weight, path):
    plt = pyplot()
    matrix = weight.reshape(weight.shape[0], -1)
    figure, axis = plt.subplots(figsize=(min(10, 2 + 0.15 * matrix.shape[1]), min(10, 2 + 0.15 * matrix.shape[0])))
    limit = float(np.abs(matrix).max()) or 1.0
    image = axis.imshow(matrix, cmap="coolwarm", vmin=-limit, vmax=limit, aspect="auto", interpolation="nearest")
    axis.set_xlabel("input")
    axis.set_ylabel("unit")
    figure.colorbar(image, ax=axis)
    figure.suptitle(f"learned first-layer weights: {name} {tuple(weight.shape)}")
    return [save_figure(figure, path)]


def plot_filters(run, max_filters=100):
    name, weight = first_weight(run.model)
    if weight is None:
        return []
    try:
        tiles = filter_tiles(weight, run.input_shape)[:max_filters]
    except RabbitError:
        return plot_weight_matrix(name, weight, run.run_dir / "filters.png")
    count = len(tiles)
    cols = math.ceil(math.sqrt(count))
    rows = math.ceil(count / cols)
    plt = pyplot()
    figure, axes = plt.subplots(rows, cols, figsize=(cols * 0.8 + 1, rows * 0.8 + 1), squeeze=False)
    for index, axis in enumerate(axes.flat):
        axis.axis("off")
        if index < count:
            tile = tiles[index]
            axis.imshow(tile[..., 0] if tile.shape[-1] == 1 else tile, cmap="gray", interpolation="nearest")
    figure.suptitle(f"learned filters: {name} {tuple(weight.shape)}")
    return [save_figure(figure, run.run_dir / "filters.png")]


@hookimpl
def rabbit_visualizers():
    return {"filters": plot_filters}
