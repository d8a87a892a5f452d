"""Deep Dream: google/deepdream's ``dream.ipynb`` on rabbitkit networks.

Gradient ascent on an objective of a layer's output, octave by octave (the
image shrunk ``octaves - 1`` times by ``octave_scale``; details dreamt at one
scale are enlarged into the next), ``steps`` steps per octave, each step of size
``step_size`` divided by the mean absolute gradient, on an image rolled by a
random jitter of up to ``jitter`` pixels and clipped to the model's valid input
range::

    from rabbitkit.visualize import dream
    out = dream(loaded, photo, layer="features.6")        # uint8 (H, W, 3) in, uint8 out
    out = dream(net, x, layer="features.6", seed=0)       # a bare net: float (C, H, W) in and out

A layer sweep is a loop over ``layer=``; other objectives come as
``objective=`` (:mod:`rabbitkit.visualize.objectives`, or a plugin's).
Nothing is written unless asked (``rabbit dream`` writes the PNG and CSV).
"""
import numpy as np

from ..errors import ConfigError
from . import common
from .gradients import ImageGradient
from .objectives import Guide, LayerL2, WeightedSum
from .subject import Subject


def resolve_objective(objective=None, layer=None, weights=None):
    """``objective`` as given, else L2 of ``layer`` (a name, or a list summed with ``weights``)."""
    if objective is not None:
        return objective
    if layer is None:
        raise ConfigError("dream needs a layer (layer=...) or an objective (objective=...)")
    layers = [layer] if isinstance(layer, str) else list(layer)
    weights = [1.0] * len(layers) if weights is None else [float(w) for w in weights]
    if len(weights) != len(layers):
        raise ConfigError(f"{len(weights)} layer weights for {len(layers)} layers; give one weight per layer")
    if len(layers) == 1 and weights[0] == 1.0:
        return LayerL2(layers[0])
    return WeightedSum([(w, LayerL2(name)) for w, name in zip(weights, layers)])


def octave_sizes(height, width, octaves, octave_scale):
    """(h, w) of each octave, largest first, as ``scipy.ndimage.zoom`` rounds them."""
    sizes = [(height, width)]
    for _ in range(octaves - 1):
        h, w = sizes[-1]
        sizes.append((round(h / octave_scale), round(w / octave_scale)))
    return sizes


def _zoom_to(x, size):
    from scipy.ndimage import zoom

    h, w = x.shape[-2:]
    if (h, w) == tuple(size):
        return x.copy()
    return zoom(x, (1, size[0] / h, size[1] / w), order=1).astype(x.dtype, copy=False)


def make_step(gradient, x, rng, step_size=1.5, jitter=32, clip=None, tile_offset=False):
    """One ascent step on float (C, H, W) ``x`` in place; returns the objective before the step.

    The image is rolled by a random (dy, dx) in [-jitter, jitter], stepped by
    ``step_size / mean|g| * g`` and rolled back; ``clip(x)`` then clips it.
    """
    oy, ox = rng.integers(-jitter, jitter + 1, 2) if jitter else (0, 0)
    shifted = np.roll(x, (oy, ox), axis=(-2, -1))
    offset = tuple(int(v) for v in rng.integers(0, 1 << 16, 2)) if tile_offset else (0, 0)
    value, g = gradient(shifted[None], offset=offset)
    g = g[0]
    scale = step_size / max(float(np.abs(g).mean()), 1e-12)
    shifted += (scale * g).astype(x.dtype, copy=False)
    x[...] = np.roll(shifted, (-oy, -ox), axis=(-2, -1))
    if clip is not None:
        clip(x)
    return value


def dream(model, image, layer=None, **options):
    """Deep Dream one image; returns the dreamt image (see the module docstring).

    ``layer``: a layer name, or a list of names summed with ``weights``;
    ``objective``: any objective instead; ``guide``: an image (same kind as
    ``image``) whose ``layer`` features the dream moves towards (the
    notebook's ``objective_guide``); ``minimise`` flips the sign.
    ``octaves`` (4), ``octave_scale`` (1.4), ``steps`` per octave (10),
    ``step_size`` (1.5), ``jitter`` (32 pixels): the notebook's defaults.
    ``clip``: clip pixels to the model's valid input range (``input_range`` for
    a bare net).  ``tile_size``: compute gradients in tiles of that many pixels
    (bounded memory for large images; the tile grid shifts at random each step).
    ``seed``: an int or a ``numpy.random.Generator`` drawing the jitter and tile
    shifts.  ``log``: a :class:`~rabbitkit.visualize.common.StepLog` to record
    each step's objective into; ``progress``: False silences the bar.
    """
    return dream_frames(model, image, 1, 0.0, layer, **options)[0]


def guided_objective(subject, guide, layer):
    """:class:`Guide` objective from a guide image's features at ``layer``."""
    if layer is None:
        raise ConfigError("a guided dream needs exactly one layer (layer=NAME)")
    from ..probe import FeatureProbe
    from ..backend import to_host

    with FeatureProbe(subject.network, [layer]) as probe:
        features = probe.forward(subject.to_input(guide)[None])[layer]
    return Guide(layer, np.asarray(to_host(features))[0])


def dream_octaves(gradient, base, rng, *, octaves=4, octave_scale=1.4, steps=10, step_size=1.5, jitter=32,
                  clip=None, tile_offset=False, log=None, progress=None, context=None):
    """The notebook's ``deepdream`` loop on model-space (C, H, W) ``base``; returns the result."""
    if octaves < 1 or steps < 0 or octave_scale <= 0:
        raise ConfigError(f"octaves must be >= 1, steps >= 0 and octave_scale > 0; got {octaves}, {steps}, {octave_scale}")
    sizes = octave_sizes(*base.shape[-2:], octaves, octave_scale)
    bases = [base]
    for size in sizes[1:]:
        bases.append(_zoom_to(bases[-1], size))
    detail = np.zeros_like(bases[-1])
    x = None
    with common.objective_bar(steps * octaves, "dream", progress) as bar:
        for octave, octave_base in enumerate(reversed(bases)):
            if octave > 0:
                detail = _zoom_to(detail, octave_base.shape[-2:])
            x = octave_base + detail
            for _ in range(steps):
                value = make_step(gradient, x, rng, step_size, jitter, clip, tile_offset)
                if log is not None:
                    log.record({**(context or {}), "octave": octave + 1}, objective=value)
                bar.update(1, objective=value)
            detail = x - octave_base
    return x


def zoom_in(x, zoom):
    """The notebook's zoom-loop transform: enlarge the centre by 1 / (1 - zoom), same size."""
    from scipy.ndimage import affine_transform

    h, w = x.shape[-2:]
    s = float(zoom)
    out = np.empty_like(x)
    for c in range(x.shape[0]):
        out[c] = affine_transform(x[c], [1 - s, 1 - s], [h * s / 2, w * s / 2], order=1)
    return out


def dream_frames(model, image, frames, zoom=0.05, layer=None, *, objective=None, weights=None, guide=None,
                 minimise=False, clip=True, tile_size=None, seed=None, input_range=None, log=None, progress=None,
                 **octave_options):
    """The notebook's zoom loop: dream, zoom into the centre by ``zoom``, dream again;
    returns ``frames`` images.  Options as :func:`dream`; one generator (``seed``)
    drives every frame, and ``log`` rows carry the frame number.
    """
    if frames < 1 or not 0 <= zoom < 1:
        raise ConfigError(f"frames must be >= 1 and zoom in [0, 1); got {frames} and {zoom}")
    subject = Subject(model, input_range)
    rng = common.make_rng(seed)
    if guide is not None:
        objective = guided_objective(subject, guide, layer if isinstance(layer, str) else None)
    objective = resolve_objective(objective, layer, weights)
    if minimise:
        objective = WeightedSum([(-1.0, objective)])
    clip = subject.clip if clip else None
    x = subject.to_input(image)
    out = []
    with ImageGradient(subject.network, objective, tile_size) as gradient:
        for frame in range(frames):
            if frame:
                x = zoom_in(x, zoom)
                if clip is not None:
                    clip(x)
            context = {"frame": frame} if frames > 1 else None
            x = dream_octaves(gradient, x, rng, clip=clip, tile_offset=tile_size is not None, log=log,
                              progress=progress, context=context, **octave_options)
            out.append(subject.to_output(x))
    return out
