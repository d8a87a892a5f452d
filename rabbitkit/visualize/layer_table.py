"""``rabbit layers MODEL``: every layer's dotted name, type, output shape and parameter count."""
import numpy as np

from ..probe import FeatureProbe


def layer_rows(model, input_shape):
    """``[(name, type, output shape per image, parameters)]`` for every layer, parents first.

    Shapes come from one inference forward pass of a zero image of
    ``input_shape`` (C, H, W), so every container (branches, a spatial
    transformer's localisation net) is measured as it really runs.
    """
    names = [name for name, _ in model.named_layers()]
    with FeatureProbe(model, names) as probe:
        outputs = probe.forward(np.zeros((1,) + tuple(input_shape), model.dtype))
    return [(name, type(layer).__name__, tuple(outputs[name].shape[1:]), layer.num_parameters())
            for name, layer in model.named_layers()]


def format_rows(rows):
    """One line per layer, aligned: name first (what ``--layer`` takes), then type, shape, parameters."""
    cells = [(name, kind, "x".join(map(str, shape)), f"{params:,}") for name, kind, shape, params in rows]
    widths = [max(len(row[c]) for row in cells) for c in range(3)] if cells else [0, 0, 0]
    return "\n".join(f"{n:<{widths[0]}}  {k:<{widths[1]}}  {s:<{widths[2]}}  {p}".rstrip() for n, k, s, p in cells)
