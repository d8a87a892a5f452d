"""Neural style transfer (Gatys, Ecker & Bethge 2016) as jcjohnson/neural-style runs it.

::

    from rabbitkit.pretrained import open_model
    from rabbitkit.visualize import style_transfer

    loaded = open_model("vgg19.safetensors", arch="vgg19")
    result = style_transfer(loaded, "tubingen.jpg", ["starry_night.jpg"], output="out.png")

The image ``x`` (in the model's input space) minimises

    content_weight · Σ_content-layers mean (F - F_content)²
    + style_weight · Σ_style-layers mean_ij (G(F) - Σ_k b_k G(F_style_k))²
    + tv_weight · TV(x)

(the losses of :mod:`rabbitkit.layers.style_losses`, neural-style's definitions)
through a :class:`~rabbitkit.probe.FeatureProbe`: forward to the deepest loss
layer, backward from the gradients of every loss layer at once, frozen weights.
The optimiser is scipy's L-BFGS-B (``minimize(..., jac=True)``) with the
pixels bounded to the model's valid input range, or Adam.  Defaults are
neural-style's: content ``relu4_2``, style ``relu1_1 … relu5_1``, weights 5, 100
and 1e-3, 1000 iterations, style blend weights normalised to sum to one.

Images enter as paths or RGB arrays; the model's preprocessing maps pixels in
[0, 1] to its input.  Any preprocessing that is affine per pixel (mean/std,
RGB or BGR, a value scale) works: its matrix is read off by probing it with
five pixel values, so outputs are de-processed exactly and bounds are known.
"""
import dataclasses
import math
import pathlib

import numpy as np

from ..errors import ConfigError, DataError
from ..layers.style_losses import (ContentLoss, StyleLoss, TotalVariationLoss, blend_grams, gram_matrix,
                                   normalised_blend)
from ..probe import FeatureProbe
from . import common

__all__ = ["style_transfer", "StyleResult", "VGG19_LAYERS", "DEFAULT_CONTENT_LAYERS", "DEFAULT_STYLE_LAYERS",
           "keep_original_colors", "PixelSpace"]

DEFAULT_CONTENT_LAYERS = ("relu4_2",)
DEFAULT_STYLE_LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
OPTIMIZERS = ("lbfgs", "adam")
POOLINGS = ("max", "avg")


def _vgg19_layers():
    """neural-style's (Caffe's) VGG-19 layer names -> torchvision's ``features.N``."""
    names, index = {}, 0
    for block, convs in enumerate((2, 2, 4, 4, 4), start=1):
        for conv in range(1, convs + 1):
            names[f"conv{block}_{conv}"] = f"features.{index}"
            names[f"relu{block}_{conv}"] = f"features.{index + 1}"
            index += 2
        names[f"pool{block}"] = f"features.{index}"
        index += 1
    return names


#: ``relu4_2`` -> ``features.22`` and so on, for torchvision's VGG-19 (``features.0`` … ``features.36``).
VGG19_LAYERS = _vgg19_layers()


def resolve_layer_name(model, name):
    """The dotted name of layer ``name`` in ``model``: its own names and aliases first,
    then neural-style's VGG-19 names where the model has VGG-19's ``features.N``."""
    layers = dict(model.named_layers())
    if name in layers or name in getattr(model, "layer_aliases", {}):
        return name
    mapped = VGG19_LAYERS.get(name)
    if mapped is not None and mapped in layers and "features.36" in layers:
        return mapped
    model.get_layer(name)  # raises the one-line error with the nearest names
    return name  # pragma: no cover


# -- pixels <-> model input ----------------------------------------------------
class PixelSpace:
    """The model's preprocessing as an affine map of RGB pixels in [0, 1]:
    ``input[c] = Σ_k A[c, k] · pixel[k] + b[c]`` (mean/std, RGB or BGR, scale).

    ``encode`` is the model's own preprocess, ``(H, W, 3)`` float pixels to a
    (1, 3, H, W) input; ``A`` and ``b`` are read off it (five pixels: black, the
    three primaries and one grey-ish), and an encoder that is not affine (LCN,
    ZCA, colour-space steps) is refused.
    """

    def __init__(self, encode, dtype=np.float32):
        self._encode = encode
        self.dtype = np.dtype(dtype)
        probes = np.zeros((5, 1, 1, 3))
        for k in range(3):
            probes[k + 1, 0, 0, k] = 1.0
        probes[4] = (64, 128, 191)
        probes[4] /= 255.0  # pixel values an encoder of uint8 images sees exactly
        images = [np.asarray(self._encode(p.astype(np.float32)), dtype=np.float64).reshape(-1) for p in probes]
        if any(image.shape != (3,) for image in images):
            raise ConfigError("the model's preprocessing must map an RGB pixel to 3 input channels")
        self.offset = images[0]
        self.matrix = np.stack([images[k + 1] - self.offset for k in range(3)], axis=1)
        predicted = self.matrix @ probes[4, 0, 0] + self.offset
        if not np.allclose(predicted, images[4], rtol=1e-4, atol=1e-5 * (1 + np.abs(images[4]).max())):
            raise ConfigError("the model's preprocessing is not affine per pixel; style transfer needs "
                              "mean/std, channel order and scale only")
        if abs(np.linalg.det(self.matrix)) < 1e-12:
            raise ConfigError("the model's preprocessing loses colour information (singular channel map)")
        self.inverse = np.linalg.inv(self.matrix)
        corners = np.array([[(i >> k) & 1 for k in range(3)] for i in range(8)], dtype=np.float64)
        values = corners @ self.matrix.T + self.offset
        self.low, self.high = values.min(axis=0), values.max(axis=0)  # per input channel
        self.scale = np.abs(self.matrix).sum(axis=1)  # input units per pixel unit, per channel

    def encode(self, pixels):
        """(H, W, 3) pixels -> (1, 3, H, W) model input (the affine map, exactly)."""
        x = np.einsum("hwk,ck->chw", np.asarray(pixels, dtype=np.float64), self.matrix) + self.offset[:, None, None]
        return np.ascontiguousarray(x[None], dtype=self.dtype)

    def decode(self, x):
        """(1, 3, H, W) model input -> (H, W, 3) float pixels (not clipped)."""
        x = np.asarray(x, dtype=np.float64).reshape(3, *np.shape(x)[-2:]) - self.offset[:, None, None]
        return np.einsum("chw,kc->hwk", x, self.inverse)

    def bounds(self, shape):
        """Per-element (low, high) arrays of a (1, 3, H, W) input: the image of the RGB cube."""
        low = np.broadcast_to(self.low[None, :, None, None], shape)
        high = np.broadcast_to(self.high[None, :, None, None], shape)
        return np.ascontiguousarray(low, np.float64), np.ascontiguousarray(high, np.float64)


def _pixel_space(loaded, encode):
    network = loaded_model(loaded)
    if encode is not None:
        return PixelSpace(encode, network.dtype)
    preprocess = getattr(loaded, "preprocess", None)
    if preprocess is None:  # a bare network: pixels in [0, 1] are its input
        return PixelSpace(lambda p: np.transpose(p, (2, 0, 1))[None], network.dtype)
    preprocessing = getattr(loaded, "preprocessing", None)
    if preprocessing is None and hasattr(loaded, "preprocessing"):
        raise ConfigError(f"model {getattr(loaded, 'name', '')} does not take images; style transfer needs an image model")
    if getattr(preprocessing, "channels", 3) != 3:
        raise ConfigError(f"model {getattr(loaded, 'name', '')} takes {preprocessing.channels}-channel input; "
                          "style transfer needs an RGB model")

    def through_model(pixels):  # a loaded model's preprocess takes uint8 HWC images
        return preprocess(np.clip(np.rint(pixels * 255.0), 0, 255).astype(np.uint8), size=None)

    return PixelSpace(through_model, network.dtype)


def loaded_model(loaded):
    """The network of a pretrained/run model (``.model``) or the network itself."""
    model = getattr(loaded, "model", loaded)
    if not hasattr(model, "named_layers") or not hasattr(model, "forward"):
        raise ConfigError(f"{type(loaded).__name__} is not a model: expected a rabbitkit network or a loaded model")
    return model


# -- images ----------------------------------------------------------------------
def _as_pixels(image, what):
    """An image path or array as float (H, W, 3) RGB in [0, 1]."""
    if isinstance(image, (str, pathlib.Path)):
        return common.load_image(image).astype(np.float32) / 255.0
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] != 3:
        raise DataError(f"{what}: expected an RGB image of shape (H, W, 3), got {array.shape}")
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    return np.clip(array.astype(np.float32), 0.0, 1.0)


def _longest_side_size(pixels, longest):
    """(width, height) with the longest side ``longest`` (neural-style's ``image.scale(img, size)``)."""
    h, w = pixels.shape[:2]
    scale = longest / max(h, w)
    return max(1, round(w * scale)), max(1, round(h * scale))


def resize_pixels(pixels, size):
    """Bilinear resize of float (H, W, 3) pixels to ``size`` = (width, height), per channel."""
    from ..data.images import pillow

    Image = pillow()
    size = (int(size[0]), int(size[1]))
    if (pixels.shape[1], pixels.shape[0]) == size:
        return np.array(pixels, dtype=np.float32)
    channels = [np.asarray(Image.fromarray(np.ascontiguousarray(pixels[:, :, k], np.float32), mode="F")
                           .resize(size, Image.BILINEAR)) for k in range(pixels.shape[2])]
    return np.stack(channels, axis=2).astype(np.float32)


BT601 = np.array([0.299, 0.587, 0.114])


def keep_original_colors(content, generated):
    """The generated image's luminance with the content's chroma (neural-style's
    ``-original_colors 1``: YUV, Y from the generated image, U and V from the content).

    In BT.601 YUV, U = 0.492 (B - Y) and V = 0.877 (R - Y): keeping U and V keeps
    every R - Y, G - Y, B - Y, so the result is ``Y_generated + (content - Y_content)``
    per channel.  Y is clamped to the range that keeps all three channels in
    [0, 1] (it holds the content's own Y), so the output is in gamut and its
    chroma is exactly the content's.  Both are float (H, W, 3) in [0, 1].
    """
    content = np.asarray(content, dtype=np.float64)
    generated = np.asarray(generated, dtype=np.float64)
    if content.shape != generated.shape:
        content = resize_pixels(content.astype(np.float32), (generated.shape[1], generated.shape[0])).astype(np.float64)
    chroma = content - (content @ BT601)[:, :, None]  # R - Y, G - Y, B - Y
    low = np.max(-chroma, axis=2)
    high = np.min(1.0 - chroma, axis=2)
    y = np.clip(generated @ BT601, low, high)
    return y[:, :, None] + chroma


# -- the optimisation ---------------------------------------------------------------
@dataclasses.dataclass
class StyleResult:
    """The generated image and the record of its optimisation."""

    image: np.ndarray          #: float (H, W, 3) RGB pixels in [0, 1]
    pixels: np.ndarray         #: the same as uint8, what the PNG holds
    log: common.StepLog        #: one row per iteration: scale, content, style, tv, total
    losses: dict               #: the loss terms of the result (content, style, tv, total, per layer)
    initial_losses: dict       #: the same of the starting image (first scale)
    files: tuple = ()          #: the PNG and CSV written, if ``output`` was given


class _Objective:
    """Loss terms and the input gradient at one scale, for a flat float64 image."""

    def __init__(self, probe, content_losses, style_losses, tv, shape, dtype):
        self.probe, self.content_losses, self.style_losses = probe, content_losses, style_losses
        self.tv, self.shape, self.dtype = tv, shape, dtype
        self.terms = {}
        self.evaluations = 0

    def __call__(self, flat):
        x = np.ascontiguousarray(np.reshape(flat, self.shape), dtype=self.dtype)
        features = self.probe.forward(x)
        backend = self.probe.model.backend
        gradients, terms = {}, {"content": 0.0, "style": 0.0, "tv": 0.0}
        for kind, losses in (("content", self.content_losses), ("style", self.style_losses)):
            for name, loss in losses:
                value = loss.forward(features[name])
                terms[kind] += value
                terms[f"{kind}:{name}"] = value
                # A style loss's gradient is made when the backward pass reaches its layer
                # (StyleLoss.backward makes a new array): not all five are alive at once.
                grad = loss.backward if kind == "style" else loss.backward()
                gradients[name] = grad if name not in gradients else _added(gradients[name], grad, backend)
        dx = np.asarray(backend.to_host(self.probe.backward(gradients)), dtype=np.float64).reshape(self.shape)
        if self.tv is not None:
            terms["tv"] = self.tv.forward(x)
            dx += self.tv.backward()
        terms["total"] = terms["content"] + terms["style"] + terms["tv"]
        self.terms = terms
        self.evaluations += 1
        return terms["total"], dx.reshape(-1)


def _added(a, b, backend):
    """a + b for two gradients of one layer (host or device; either may be a callable
    that makes it, see FeatureProbe.backward): made when first needed."""
    def total():
        first, second = (g() if callable(g) else g for g in (a, b))
        added = np.asarray(backend.to_host(first), dtype=np.float64) + np.asarray(backend.to_host(second), np.float64)
        return backend.asarray(added.astype(np.dtype(first.dtype)), first.dtype)

    return total


def _parse_layers(value, default):
    if value is None:
        return list(default)
    if isinstance(value, str):
        value = value.split(",")
    names = [str(name).strip() for name in value if str(name).strip()]
    if not names:
        raise ConfigError("expected at least one layer name")
    return names


def _check_choice(value, choices, what):
    if value not in choices:
        raise ConfigError(f"{what} '{value}': expected one of {', '.join(choices)}")


def style_transfer(model, content, styles, *, output=None, content_layers=None, style_layers=None,
                   style_blend=None, content_weight=5.0, style_weight=100.0, tv_weight=1e-3, iterations=1000,
                   optimizer="lbfgs", learning_rate=10.0, lbfgs_memory=10, init="content", style_scale=1.0,
                   original_colors=False, scales=(512,), pooling="max", seed=0, progress=None, encode=None):
    """Neural style transfer; returns a :class:`StyleResult` (and writes ``output`` PNG + CSV).

    ``model``: a loaded model (``.model`` and ``.preprocess``, see
    :func:`rabbitkit.pretrained.open_model`) or a rabbitkit network, with
    ``encode`` (pixels (H, W, 3) in [0, 1] -> input (1, 3, H, W)) or none (the
    pixels are the input).  ``content``, ``styles``: paths or RGB arrays.
    ``content_layers``/``style_layers``: layer names (dotted, aliases, or
    neural-style's VGG-19 names on a VGG-19).  ``style_blend``: one weight per
    style image, normalised to sum 1 (default equal).  ``init``: ``"content"``,
    ``"noise"`` (grey plus Gaussian noise of standard deviation 0.1 in pixel
    units, from ``seed``) or an image (path or array).  ``scales``: the longest
    image side at each stage, coarse to fine; each stage starts from the last
    one's result, resized.  Style images are resized to ``style_scale`` times the
    stage's size.  ``learning_rate`` (Adam) is in 0-255 pixel units, as
    neural-style's 10.  ``pooling="avg"`` swaps the model's max pooling for
    average pooling in place (the model keeps it).  ``lbfgs_memory``: L-BFGS
    correction pairs (each holds two float64 copies of the image).

    Every input is checked before any computation; the output PNG and its CSV
    are written only at the end, atomically.
    """
    network = loaded_model(model)
    _check_choice(optimizer, OPTIMIZERS, "optimizer")
    _check_choice(pooling, POOLINGS, "pooling")
    iterations = int(iterations)
    if iterations < 1:
        raise ConfigError(f"iterations {iterations}: expected at least 1")
    scales = [int(s) for s in ([scales] if isinstance(scales, (int, np.integer)) else scales)]
    if not scales or any(s < 1 for s in scales):
        raise ConfigError(f"scales {scales}: expected positive image sizes")
    if not style_scale > 0:
        raise ConfigError(f"style scale {style_scale}: expected a positive number")
    if output is not None:
        output = pathlib.Path(output)
        if not output.parent.is_dir():
            raise DataError(f"{output}: folder {output.parent} does not exist")
    styles = [styles] if isinstance(styles, (str, pathlib.Path, np.ndarray)) else list(styles)
    if not styles:
        raise ConfigError("style transfer needs at least one style image")
    blend = normalised_blend(style_blend, len(styles))
    content_names = [resolve_layer_name(network, n) for n in _parse_layers(content_layers, DEFAULT_CONTENT_LAYERS)]
    style_names = [resolve_layer_name(network, n) for n in _parse_layers(style_layers, DEFAULT_STYLE_LAYERS)]
    content_pixels = _as_pixels(content, "content image")
    style_pixels = [_as_pixels(s, "style image") for s in styles]
    rng = common.make_rng(seed)
    if isinstance(init, str) and init in ("content", "noise"):
        init_pixels = init
    elif isinstance(init, (str, pathlib.Path, np.ndarray)):
        init_pixels = _as_pixels(init, "init image")
    else:
        raise ConfigError(f"init {init!r}: expected content, noise or an image")
    space = _pixel_space(model, encode)
    if pooling == "avg":
        from ..layers.pooling import swap_max_to_avg

        swap_max_to_avg(network)

    log = common.StepLog()
    x_pixels = None
    terms, initial = {}, {}
    with FeatureProbe(network, list(dict.fromkeys(content_names + style_names))) as probe:
        for stage, size in enumerate(scales):
            content_size = _longest_side_size(content_pixels, size)
            target = resize_pixels(content_pixels, content_size)
            style_size = math.ceil(style_scale * size)
            if stage > 0:
                start = resize_pixels(x_pixels, content_size)
            elif isinstance(init_pixels, np.ndarray):
                start = resize_pixels(init_pixels, content_size)
            elif init_pixels == "noise":
                start = np.clip(0.5 + 0.1 * rng.standard_normal(target.shape), 0.0, 1.0).astype(np.float32)
            else:
                start = target
            x_content = space.encode(target)
            content_features = probe.forward(x_content)
            content_losses = [(name, ContentLoss(probe.model.backend.to_host(content_features[name]).copy(),
                                                 content_weight)) for name in content_names]
            style_grams = {name: [] for name in style_names}
            for pixels in style_pixels:
                resized = resize_pixels(pixels, _longest_side_size(pixels, style_size))
                outputs = probe.forward(space.encode(resized))
                for name in style_names:
                    style_grams[name].append(gram_matrix(outputs[name]))
            style_losses = [(name, StyleLoss(blend_grams(style_grams[name], blend), style_weight))
                            for name in style_names]
            tv = TotalVariationLoss(tv_weight) if tv_weight > 0 else None
            x0 = space.encode(start)
            objective = _Objective(probe, content_losses, style_losses, tv, x0.shape, network.dtype)
            if stage == 0:
                objective(x0.reshape(-1))
                initial = dict(objective.terms)
            x = _optimise(objective, x0, space, optimizer, iterations, learning_rate, lbfgs_memory, log,
                          {"scale": size}, progress, f"style {size}px")
            terms = objective.terms
            x_pixels = np.clip(space.decode(x), 0.0, 1.0).astype(np.float32)

    image = x_pixels.astype(np.float64)
    if original_colors:
        image = keep_original_colors(resize_pixels(content_pixels, (image.shape[1], image.shape[0])), image)
    pixels = np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)
    files = ()
    if output is not None:
        files = common.save_image_and_log(output, pixels, log)
    return StyleResult(image=image, pixels=pixels, log=log, losses=dict(terms), initial_losses=initial,
                       files=tuple(files))


def _log_row(log, bar, context, terms):
    row = {key: terms[key] for key in ("content", "style", "tv", "total")}
    row.update({key: value for key, value in terms.items() if ":" in key})
    log.record(context, **row)
    bar.update(1, content=terms["content"], style=terms["style"], tv=terms["tv"])


def _optimise(objective, x0, space, optimizer, iterations, learning_rate, memory, log, context, progress, label):
    low, high = space.bounds(x0.shape)
    with common.objective_bar(iterations, label, enabled=progress) as bar:
        if optimizer == "adam":
            x = np.array(x0, dtype=objective.dtype)
            lr = float(learning_rate) / 255.0 * float(np.mean(space.scale))
            adam = common.ImageAdam(x, lr=lr)
            for _ in range(iterations):
                _, grad = objective(x.reshape(-1))
                adam.step(grad.reshape(x.shape).astype(x.dtype))
                np.clip(x, low, high, out=x)
                _log_row(log, bar, context, objective.terms)
            objective(x.reshape(-1))  # the terms of the final image
            return x
        from scipy.optimize import Bounds, minimize

        def record(_):
            _log_row(log, bar, context, objective.terms)

        # neural-style runs optim.lbfgs with tolFun = tolX = -1: no early stop but the iteration count.
        result = minimize(objective, x0.reshape(-1).astype(np.float64), jac=True, method="L-BFGS-B",
                          bounds=Bounds(low.reshape(-1), high.reshape(-1)), callback=record,
                          options={"maxiter": iterations, "maxfun": max(15000, 2 * iterations),
                                   "maxcor": int(memory), "ftol": 0.0, "gtol": 0.0})
        objective(result.x)  # the terms of the returned image
        return result.x.reshape(x0.shape)
