"""Objectives of image optimisation: what Deep Dream and class models maximise.

An objective names the layers it reads (``layers``; ``""`` is the model output)
and maps their outputs to a value and the gradient of that value with respect
to each output::

    objective = Channel("features.3", channel=5)
    value, grads = objective({"features.3": y})    # grads: {"features.3": dvalue/dy}

Values are maximised; :func:`minimise` and :class:`WeightedSum` combine them.
``tileable`` objectives are sums over spatial positions, so tiled gradients
(:mod:`rabbitkit.visualize.tiling`) apply.  Built-ins are registered by name
through the ``rabbit_objectives`` hook, as a third-party plugin's are::

    from rabbitkit.plugins import registry
    objective = registry("objectives").get("l2")(layer="features.3")
"""
import numpy as np

from ..errors import ConfigError
from ..hookspecs import hookimpl


class Objective:
    """Base class: ``layers`` read, ``tileable``, ``__call__(features) -> (value, {name: grad})``."""

    layers = ()
    tileable = False

    def __call__(self, features):
        raise NotImplementedError

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(self.layers)})"


class LayerL2(Objective):
    """Half the squared L2 norm of a layer's output (google/deepdream's ``objective_L2``)."""

    tileable = True

    def __init__(self, layer):
        self.layers = (layer,)

    def __call__(self, features):
        y = np.asarray(features[self.layers[0]], dtype=np.float64)
        return 0.5 * float(np.vdot(y, y)), {self.layers[0]: y}


def _check_channel(name, y, channel):
    if y.ndim < 2 or not 0 <= channel < y.shape[1]:
        count = y.shape[1] if y.ndim >= 2 else 0
        raise ConfigError(f"channel {channel} is out of range: layer '{name or 'output'}' has {count} channels "
                          f"(expected 0..{count - 1})")


class Channel(Objective):
    """The sum of one channel of a layer over every position."""

    tileable = True

    def __init__(self, layer, channel):
        self.layers, self.channel = (layer,), int(channel)

    def __call__(self, features):
        name = self.layers[0]
        y = np.asarray(features[name])
        _check_channel(name, y, self.channel)
        grad = np.zeros(y.shape, np.float64)
        grad[:, self.channel] = 1.0
        return float(y[:, self.channel].sum(dtype=np.float64)), {name: grad}


class Unit(Objective):
    """One unit: channel ``channel`` at ``position`` (row, column; default the centre) of a
    conv layer, or feature ``channel`` of a dense layer."""

    def __init__(self, layer, channel, position=None):
        self.layers, self.channel = (layer,), int(channel)
        self.position = None if position is None else tuple(int(p) for p in position)

    def __call__(self, features):
        name = self.layers[0]
        y = np.asarray(features[name])
        _check_channel(name, y, self.channel)
        index = (slice(None), self.channel)
        if y.ndim == 4:
            position = self.position or (y.shape[2] // 2, y.shape[3] // 2)
            if not (0 <= position[0] < y.shape[2] and 0 <= position[1] < y.shape[3]):
                raise ConfigError(f"unit position {position} is outside layer '{name}' of {y.shape[2]}x{y.shape[3]} positions")
            index += position
        grad = np.zeros(y.shape, np.float64)
        grad[index] = 1.0
        return float(y[index].sum(dtype=np.float64)), {name: grad}


class ClassLogit(Objective):
    """The logit (pre-softmax score) of a class: one class for every image, or one per image
    (``classes=[3, 14, ...]``, image n pushes ``classes[n]``)."""

    def __init__(self, classes, layer=""):
        self.layers = (layer,)
        self.classes = np.atleast_1d(np.asarray(classes, dtype=np.int64))

    def __call__(self, features):
        name = self.layers[0]
        y = np.asarray(features[name])
        if y.ndim != 2:
            raise ConfigError(f"a class objective needs (batch, classes) scores; '{name or 'output'}' gives {y.shape}")
        bad = [int(c) for c in self.classes if not 0 <= c < y.shape[1]]
        if bad:
            raise ConfigError(f"class {bad[0]} is out of range: the model has {y.shape[1]} classes "
                              f"(expected 0..{y.shape[1] - 1})")
        classes = np.broadcast_to(self.classes, (y.shape[0],)) if self.classes.size == 1 else self.classes
        if classes.shape[0] != y.shape[0]:
            raise ConfigError(f"{classes.shape[0]} classes for a batch of {y.shape[0]} images")
        rows = np.arange(y.shape[0])
        grad = np.zeros(y.shape, np.float64)
        grad[rows, classes] = 1.0
        return float(y[rows, classes].sum(dtype=np.float64)), {name: grad}


class Guide(Objective):
    """google/deepdream's ``objective_guide``: each position's feature vector is pulled
    towards the guide image's best-matching one.

    Value: sum over positions i of max_j <x_i, g_j> (x: the image's features at
    ``layer``, g: the guide's, any size); its gradient at x_i is the best match
    g_j (the notebook's ``y[:, A.argmax(1)]``).
    """

    tileable = True

    def __init__(self, layer, guide_features):
        self.layers = (layer,)
        guide = np.asarray(guide_features, dtype=np.float64)
        if guide.ndim == 4:
            guide = guide[0]
        self.guide = guide.reshape(guide.shape[0], -1)  # (C, positions)

    def __call__(self, features):
        name = self.layers[0]
        y = np.asarray(features[name], dtype=np.float64)
        if y.shape[1] != self.guide.shape[0]:
            raise ConfigError(f"guide features have {self.guide.shape[0]} channels, layer '{name}' {y.shape[1]}")
        n, channels = y.shape[:2]
        x = y.reshape(n, channels, -1)
        scores = np.einsum("ncp,cq->npq", x, self.guide)  # dot products with every guide position
        best = scores.argmax(axis=2)
        grad = self.guide[:, best].transpose(1, 0, 2).reshape(y.shape)
        return float(np.take_along_axis(scores, best[..., None], axis=2).sum()), {name: grad}


class WeightedSum(Objective):
    """sum_k w_k * objective_k (a negative weight minimises that term)."""

    def __init__(self, terms):
        self.terms = [(float(w), objective) for w, objective in terms]
        if not self.terms:
            raise ConfigError("a weighted sum of objectives needs at least one term")
        self.layers = tuple(dict.fromkeys(name for _, o in self.terms for name in o.layers))
        self.tileable = all(o.tileable for _, o in self.terms)

    def __call__(self, features):
        total, grads = 0.0, {}
        for weight, objective in self.terms:
            present = {name: features[name] for name in objective.layers if name in features}
            if len(present) < len(objective.layers):  # a tile that owns none of this term's positions
                continue
            value, term_grads = objective(present)
            total += weight * value
            for name, grad in term_grads.items():
                scaled = weight * np.asarray(grad, dtype=np.float64)
                grads[name] = scaled if name not in grads else grads[name] + scaled
        return total, grads

    def __repr__(self):
        return " + ".join(f"{w:g}*{o!r}" for w, o in self.terms)


def minimise(objective):
    """The objective with its sign flipped (maximising it minimises the original)."""
    return WeightedSum([(-1.0, objective)])


def build(name, **options):
    """An objective by registered name (a built-in or a plugin's), e.g. ``build("channel", layer=..., channel=3)``."""
    from ..plugins import registry

    factory = registry("objectives").get(name)
    try:
        return factory(**options)
    except TypeError as err:
        raise ConfigError(f"objective '{name}': {err}") from None


@hookimpl
def rabbit_objectives():
    return {"l2": LayerL2, "channel": Channel, "unit": Unit, "class": ClassLogit, "guide": Guide}
