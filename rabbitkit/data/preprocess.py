"""Preprocessing from the talk: fitted on the training split, applied to every split, saved with the run.

A :class:`Pipeline` is built from the ``[data] preprocess`` list of an experiment::

    preprocess = ["scale", "yuv", {name = "lcn", kernel = 7}, "standardize"]

Images enter as uint8 (0..255) or float32 NCHW and leave as float32 NCHW.
uint8 input is always mapped to [0, 1] first (that is the ``scale`` step, which
may be listed for clarity); colour conversions expect RGB in [0, 1], so they
belong before ``standardize``/``zca``.

Steps (options in parentheses):

* ``scale``: uint8 0..255 -> float32 0..1 (a no-op on float input).
* ``standardize`` (``eps``): per-channel mean 0 and standard deviation 1, with
  statistics of the training split.
* ``zca`` (``epsilon``, ``max_samples``): ZCA whitening of whole images
  (Krizhevsky 2009); the D x D matrix for D = C*H*W is fitted on at most
  ``max_samples`` training images.  Cost grows as D^3: fine at 3x32x32,
  minutes at 3x48x48.
* ``lcn`` (``kernel``, ``sigma``, ``eps``): local contrast normalisation (Jarrett
  et al. 2009; used by Sermanet & LeCun on GTSRB): subtract the Gaussian-weighted
  local mean across channels, divide by the local standard deviation where it
  exceeds the image's mean local standard deviation (and ``eps``, which keeps
  flat images from amplifying rounding noise).  Per image, nothing to fit.
* ``equalize`` (``levels``): histogram equalisation of each image, channel by
  channel, to [0, 1] (the "Histeq" column of Ciresan et al.'s committee).
* ``clahe`` (``tiles``, ``clip_limit``, ``levels``): contrast-limited adaptive
  histogram equalisation (Zuiderveld 1994; the "Adapthisteq" column of Ciresan et
  al.'s committee), channel by channel, to [0, 1]: each of ``tiles`` x ``tiles``
  regions gets its own equalisation, its histogram clipped at ``clip_limit`` times
  the mean bin count (OpenCV's convention; at least one pixel per bin) with the
  excess spread over all bins, and each pixel's value is interpolated bilinearly
  between the mappings of the four nearest region centres.
* ``yuv`` (BT.601, Y in [0, 1], U in [-0.436, 0.436], V in [-0.615, 0.615]),
  ``lab`` (CIE L*a*b*, D65 sRGB; L in [0, 100], a/b about [-128, 127]),
  ``hsv`` and ``hsl`` (channels H, S, V / H, S, L, all in [0, 1]; H is the
  fraction of a turn, as in :mod:`colorsys`), ``grayscale`` (BT.601 luma, one channel).
"""
import inspect
import math

import numpy as np
from numba import prange

from ..backend.cpu import kernel
from ..errors import ConfigError, did_you_mean
from .filters import blur_plane, gaussian_weights
from .options import check_options

FIT_CHUNK = 1024  # images per chunk while fitting (bounds the memory of the intermediate steps)


def to_float_images(x):
    """float32 C-contiguous copy/view of ``x``; uint8 becomes [0, 1]."""
    if x.dtype == np.uint8:
        return np.multiply(x, np.float32(1 / 255), dtype=np.float32)
    return np.ascontiguousarray(x, dtype=np.float32)


# -- colour conversions -----------------------------------------------------------
YUV, LAB, HSV, HSL, GRAY = 0, 1, 2, 3, 4


@kernel(parallel=False)
def _srgb_to_linear(c):
    return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4


@kernel(parallel=False)
def _lab_f(t):
    delta = 6.0 / 29.0
    return t ** (1.0 / 3.0) if t > delta**3 else t / (3.0 * delta * delta) + 4.0 / 29.0


@kernel(parallel=False)
def _hue(r, g, b, hi, lo):
    """Hue as a fraction of a turn (0 for grey), as colorsys computes it."""
    if hi == lo:
        return 0.0
    span = hi - lo
    rc, gc, bc = (hi - r) / span, (hi - g) / span, (hi - b) / span
    if r == hi:
        h = bc - gc
    elif g == hi:
        h = 2.0 + rc - bc
    else:
        h = 4.0 + gc - rc
    h = h / 6.0
    return h - math.floor(h)


@kernel(parallel=False)
def _convert_pixel(r, g, b, mode):
    """(c0, c1, c2) of one RGB pixel in colour space ``mode``."""
    if mode == YUV or mode == GRAY:
        y = 0.299 * r + 0.587 * g + 0.114 * b
        return y, 0.492 * (b - y), 0.877 * (r - y)
    if mode == LAB:
        rl, gl, bl = _srgb_to_linear(r), _srgb_to_linear(g), _srgb_to_linear(b)
        fx = _lab_f((0.4124564 * rl + 0.3575761 * gl + 0.1804375 * bl) / 0.95047)
        fy = _lab_f(0.2126729 * rl + 0.7151522 * gl + 0.0721750 * bl)
        fz = _lab_f((0.0193339 * rl + 0.1191920 * gl + 0.9503041 * bl) / 1.08883)
        return 116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)
    hi, lo = max(r, g, b), min(r, g, b)
    h = _hue(r, g, b, hi, lo)
    if mode == HSV:
        return h, (hi - lo) / hi if hi > 0 else 0.0, hi
    light = 0.5 * (hi + lo)
    if hi == lo:
        sat = 0.0
    elif light <= 0.5:
        sat = (hi - lo) / (hi + lo)
    else:
        sat = (hi - lo) / (2.0 - hi - lo)
    return h, sat, light


@kernel
def convert_colour(x, y, mode):
    """y (N, C_out, H, W) = colour space ``mode`` of the RGB images x (N, 3, H, W)."""
    n, _, h, w = x.shape
    for s in prange(n):
        for i in range(h):
            for j in range(w):
                c0, c1, c2 = _convert_pixel(x[s, 0, i, j], x[s, 1, i, j], x[s, 2, i, j], mode)
                y[s, 0, i, j] = c0
                if y.shape[1] == 3:
                    y[s, 1, i, j] = c1
                    y[s, 2, i, j] = c2


# -- local contrast normalisation ---------------------------------------------------
@kernel
def lcn_images(x, weights, eps, y):
    """Local contrast normalisation of each image of x (N, C, H, W) into y."""
    n, c, h, w = x.shape
    for s in prange(n):
        tmp = np.empty((h, w), x.dtype)
        blurred = np.empty((h, w), x.dtype)
        local = np.zeros((h, w), x.dtype)
        # Subtractive step: one local mean shared by all channels.
        for ch in range(c):
            blur_plane(x[s, ch], blurred, weights, tmp)
            local += blurred
        local /= c
        for ch in range(c):
            y[s, ch] = x[s, ch] - local
        # Divisive step: local standard deviation across channels, floored by its image mean.
        local[:] = 0.0
        for ch in range(c):
            blur_plane(y[s, ch] * y[s, ch], blurred, weights, tmp)
            local += blurred
        mean_sd = 0.0
        for i in range(h):
            for j in range(w):
                local[i, j] = math.sqrt(max(local[i, j] / c, 0.0))
                mean_sd += local[i, j]
        mean_sd /= h * w
        for i in range(h):
            for j in range(w):
                d = max(local[i, j], mean_sd, eps)
                for ch in range(c):
                    y[s, ch, i, j] /= d


@kernel(parallel=False)
def _bin_of(value, levels):
    return int(min(max(value, 0.0), 1.0) * (levels - 1) + 0.5)


@kernel
def equalize_planes(x, levels, y):
    """y[s, c] = histogram equalisation of the plane x[s, c] (values in [0, 1]) over ``levels`` bins.

    Each value maps to the fraction of the plane's pixels at or below its bin,
    rescaled so the darkest occupied bin maps to 0 (as skimage's equalize_hist).
    """
    n, c, h, w = x.shape
    size = h * w
    for plane in prange(n * c):
        s = plane // c
        ch = plane - s * c
        counts = np.zeros(levels, np.int64)
        for i in range(h):
            for j in range(w):
                counts[_bin_of(x[s, ch, i, j], levels)] += 1
        cdf = np.cumsum(counts)
        lowest = 0
        for b in range(levels):
            if counts[b] > 0:
                lowest = cdf[b]
                break
        span = size - lowest
        for i in range(h):
            for j in range(w):
                b = _bin_of(x[s, ch, i, j], levels)
                y[s, ch, i, j] = (cdf[b] - lowest) / span if span > 0 else 0.5


@kernel(parallel=False)
def _clahe_tile_map(plane, top, bottom, left, right, levels, clip, lut):
    """lut[b] = the clipped, redistributed cumulative histogram of plane[top:bottom, left:right] at bin b, in [0, 1]."""
    counts = np.zeros(levels, np.int64)
    for i in range(top, bottom):
        for j in range(left, right):
            counts[_bin_of(plane[i, j], levels)] += 1
    excess = 0
    for b in range(levels):
        if counts[b] > clip:
            excess += counts[b] - clip
            counts[b] = clip
    # The excess goes to every bin evenly; what does not divide goes one pixel per
    # bin at an even stride, so the histogram keeps its total (as OpenCV does).
    share, rest = excess // levels, excess % levels
    stride = max(levels // rest, 1) if rest > 0 else levels
    total = 0
    for b in range(levels):
        counts[b] += share
        if rest > 0 and b % stride == 0 and b // stride < rest:
            counts[b] += 1
        total += counts[b]
    running = 0
    for b in range(levels):
        running += counts[b]
        lut[b] = running / total


@kernel(parallel=False)
def _tile_edges(size, tiles):
    """Start of each of ``tiles`` near-equal regions along an axis of ``size`` pixels, and the end."""
    edges = np.empty(tiles + 1, np.int64)
    for k in range(tiles + 1):
        edges[k] = (k * size) // tiles
    return edges


@kernel(parallel=False)
def _neighbours(position, edges, tiles):
    """(lower region, upper region, weight of the upper) for a pixel centre at
    ``position``: the two regions whose centres enclose it (one region, weight 0,
    before the first centre and after the last)."""
    if position <= 0.5 * (edges[0] + edges[1]):
        return 0, 0, 0.0
    for k in range(tiles - 1):
        lower, upper = 0.5 * (edges[k] + edges[k + 1]), 0.5 * (edges[k + 1] + edges[k + 2])
        if position < upper:
            return k, k + 1, (position - lower) / (upper - lower)
    return tiles - 1, tiles - 1, 0.0


@kernel
def clahe_planes(x, tiles, clip_limit, levels, y):
    """y[s, c] = CLAHE of the plane x[s, c] (values in [0, 1]) on a tiles x tiles grid."""
    n, c, h, w = x.shape
    rows, cols = _tile_edges(h, tiles), _tile_edges(w, tiles)
    # Each column's two regions and weight, found once rather than once per pixel.
    left, right = np.empty(w, np.int64), np.empty(w, np.int64)
    wxs = np.empty(w, np.float64)
    for j in range(w):
        left[j], right[j], wxs[j] = _neighbours(j + 0.5, cols, tiles)
    for plane in prange(n * c):
        s = plane // c
        ch = plane - s * c
        luts = np.empty((tiles, tiles, levels), np.float64)
        for ti in range(tiles):
            for tj in range(tiles):
                pixels = (rows[ti + 1] - rows[ti]) * (cols[tj + 1] - cols[tj])
                clip = max(int(clip_limit * pixels / levels), 1)
                _clahe_tile_map(x[s, ch], rows[ti], rows[ti + 1], cols[tj], cols[tj + 1], levels, clip, luts[ti, tj])
        for i in range(h):
            ti0, ti1, wy = _neighbours(i + 0.5, rows, tiles)
            for j in range(w):
                tj0, tj1, wx = left[j], right[j], wxs[j]
                b = _bin_of(x[s, ch, i, j], levels)
                top = (1.0 - wx) * luts[ti0, tj0, b] + wx * luts[ti0, tj1, b]
                bottom = (1.0 - wx) * luts[ti1, tj0, b] + wx * luts[ti1, tj1, b]
                y[s, ch, i, j] = (1.0 - wy) * top + wy * bottom


# -- steps --------------------------------------------------------------------------
class Step:
    """One preprocessing step.  Subclasses set ``name`` and, if they learn from
    data, ``fitted_tensors`` (names of the arrays ``fit`` computes)."""

    name = ""
    fitted_tensors = ()

    def __init__(self):
        self.state = {}

    @property
    def needs_fit(self):
        return bool(self.fitted_tensors)

    def fit(self, chunks):
        """Learn from the training data; ``chunks()`` yields float32 NCHW pieces of it."""

    def apply(self, x):
        raise NotImplementedError

    def output_shape(self, input_shape):
        return tuple(input_shape)

    def options(self):
        """The constructor options (what :meth:`Pipeline.to_config` writes back)."""
        return {k: getattr(self, k) for k in inspect.signature(type(self).__init__).parameters if k != "self"}

    def check_channels(self, input_shape, channels=3):
        if len(input_shape) != 3 or input_shape[0] != channels:
            raise ConfigError(
                f"preprocessing '{self.name}' needs {channels}-channel images (C, H, W), got input shape {tuple(input_shape)}"
            )


class Scale(Step):
    """uint8 images to float32 in [0, 1]."""

    name = "scale"

    def apply(self, x):
        return to_float_images(x)


class Standardize(Step):
    """Per-channel mean 0 and standard deviation 1 (statistics of the training split)."""

    name = "standardize"
    fitted_tensors = ("mean", "std")

    def __init__(self, eps: float = 1e-6):
        super().__init__()
        self.eps = float(eps)

    def fit(self, chunks):
        count, total, total_sq, shift = 0, 0.0, 0.0, None
        for x in chunks():
            x = x.astype(np.float64)
            if shift is None:  # subtracting a rough mean keeps the float64 sums accurate
                shift = x.mean(axis=(0, 2, 3))
            d = x - shift[None, :, None, None]
            count += d.shape[0] * d.shape[2] * d.shape[3]
            total = total + d.sum(axis=(0, 2, 3))
            total_sq = total_sq + (d * d).sum(axis=(0, 2, 3))
        if not count:
            raise ConfigError("preprocessing 'standardize': the training split is empty")
        mean = total / count
        var = np.maximum(total_sq / count - mean * mean, 0.0)
        self.state = {"mean": (mean + shift).astype(np.float32), "std": np.sqrt(var).astype(np.float32)}

    def apply(self, x):
        x = to_float_images(x)
        mean = self.state["mean"].reshape(1, -1, *([1] * (x.ndim - 2)))
        inv = (1.0 / np.maximum(self.state["std"], self.eps)).astype(np.float32).reshape(mean.shape)
        return (x - mean) * inv


class ZCA(Step):
    """ZCA whitening (regularised by ``epsilon``, fitted on up to ``max_samples`` images)."""

    name = "zca"
    fitted_tensors = ("mean", "matrix")

    def __init__(self, epsilon: float = 0.01, max_samples: int = 10000):
        super().__init__()
        self.epsilon = float(epsilon)
        self.max_samples = int(max_samples)

    def fit(self, chunks):
        pieces, total = [], 0
        for x in chunks():
            pieces.append(x.reshape(len(x), -1).astype(np.float64))
            total += len(x)
        data = np.concatenate(pieces)
        if len(data) > self.max_samples:  # evenly spaced, deterministic subsample
            data = data[np.linspace(0, len(data) - 1, self.max_samples).astype(np.int64)]
        mean = data.mean(axis=0)
        data -= mean
        cov = data.T @ data / len(data)
        eigenvalues, vectors = np.linalg.eigh(cov)
        scale = 1.0 / np.sqrt(np.maximum(eigenvalues, 0.0) + self.epsilon)
        matrix = (vectors * scale) @ vectors.T
        self.state = {"mean": mean.astype(np.float32), "matrix": matrix.astype(np.float32)}

    def apply(self, x):
        x = to_float_images(x)
        flat = x.reshape(len(x), -1) - self.state["mean"]
        return np.dot(flat, self.state["matrix"]).reshape(x.shape)  # the matrix is symmetric


class LCN(Step):
    """Local contrast normalisation with a Gaussian window of ``kernel`` pixels."""

    name = "lcn"

    def __init__(self, kernel: int = 7, sigma: float | None = None, eps: float = 1e-2):
        super().__init__()
        if kernel < 1 or kernel % 2 == 0:
            raise ConfigError(f"preprocessing 'lcn': kernel must be an odd number of pixels, got {kernel}")
        self.kernel = int(kernel)
        self.sigma = None if sigma is None else float(sigma)
        self.eps = float(eps)
        self.weights = gaussian_weights(self.sigma or self.kernel / 4, radius=self.kernel // 2).astype(np.float32)

    def apply(self, x):
        x = to_float_images(x)
        y = np.empty_like(x)
        lcn_images(x, self.weights, np.float32(self.eps), y)
        return y


class Equalize(Step):
    """Histogram equalisation of every image, channel by channel (Ciresan et al. 2012's
    "Histeq" committee column); output in [0, 1]."""

    name = "equalize"

    def __init__(self, levels: int = 256):
        super().__init__()
        if not 2 <= levels <= 65536:
            raise ConfigError(f"preprocessing 'equalize': levels must be 2..65536, got {levels}")
        self.levels = int(levels)

    def apply(self, x):
        x = to_float_images(x)
        y = np.empty_like(x)
        equalize_planes(x, self.levels, y)
        return y


class CLAHE(Step):
    """Contrast-limited adaptive histogram equalisation of every image, channel by
    channel (Ciresan et al. 2012's "Adapthisteq" committee column); output in [0, 1]."""

    name = "clahe"

    def __init__(self, tiles: int = 4, clip_limit: float = 2.0, levels: int = 256):
        super().__init__()
        if not 1 <= tiles <= 64:
            raise ConfigError(f"preprocessing 'clahe': tiles must be 1..64 regions per side, got {tiles}")
        if not clip_limit > 0:
            raise ConfigError(f"preprocessing 'clahe': clip_limit must be > 0 (times the mean bin count), got {clip_limit}")
        if not 2 <= levels <= 65536:
            raise ConfigError(f"preprocessing 'clahe': levels must be 2..65536, got {levels}")
        self.tiles, self.clip_limit, self.levels = int(tiles), float(clip_limit), int(levels)

    def apply(self, x):
        x = to_float_images(x)
        if self.tiles > min(x.shape[2:]):
            raise ConfigError(f"preprocessing 'clahe': {self.tiles} tiles per side do not fit "
                              f"{x.shape[2]}x{x.shape[3]} images")
        y = np.empty_like(x)
        clahe_planes(x, self.tiles, self.clip_limit, self.levels, y)
        return y


class Colour(Step):
    mode = YUV
    channels_out = 3

    def apply(self, x):
        x = to_float_images(x)
        self.check_channels(x.shape[1:])
        y = np.empty((x.shape[0], self.channels_out) + x.shape[2:], np.float32)
        convert_colour(x, y, self.mode)
        return y

    def output_shape(self, input_shape):
        self.check_channels(input_shape)
        return (self.channels_out,) + tuple(input_shape[1:])


class YUVStep(Colour):
    """RGB to YUV."""

    name, mode = "yuv", YUV


class LabStep(Colour):
    """RGB to CIE L*a*b*."""

    name, mode = "lab", LAB


class HSVStep(Colour):
    """RGB to HSV."""

    name, mode = "hsv", HSV


class HSLStep(Colour):
    """RGB to HSL."""

    name, mode = "hsl", HSL


class Grayscale(Colour):
    """RGB to one luminance channel."""

    name, mode, channels_out = "grayscale", GRAY, 1

    def apply(self, x):
        if x.shape[1] == 1:  # already one channel
            return to_float_images(x)
        return super().apply(x)

    def output_shape(self, input_shape):
        if input_shape[0] == 1:
            return tuple(input_shape)
        return super().output_shape(input_shape)


STEPS = {cls.name: cls for cls in (Scale, Standardize, ZCA, LCN, Equalize, CLAHE, YUVStep, LabStep, HSVStep, HSLStep, Grayscale)}


def make_step(spec):
    """A Step from ``"name"`` or ``{"name": ..., **options}``, validating names, options and types."""
    if isinstance(spec, str):
        name, options = spec, {}
    elif isinstance(spec, dict) and "name" in spec:
        options = dict(spec)
        name = options.pop("name")
    else:
        raise ConfigError(f"preprocessing step must be a name or a table with 'name', got {spec!r}")
    if name not in STEPS:
        raise ConfigError(f"unknown preprocessing '{name}'{did_you_mean(name, STEPS)}; known: {', '.join(STEPS)}")
    cls = STEPS[name]
    check_options(f"preprocessing '{name}'", cls.__init__, options)
    return cls(**options)


class Pipeline:
    """An ordered list of preprocessing steps.

    ``fit(train_x)`` learns the statistics (training split only), ``apply(x)``
    maps any split to float32 NCHW, ``state_dict()``/``load_state_dict()`` carry
    the learned arrays (saved with the run), ``to_config()`` the step list.
    """

    def __init__(self, steps=()):
        self.steps = list(steps)
        self.fitted = not any(s.needs_fit for s in self.steps)

    @classmethod
    def from_config(cls, specs):
        """A pipeline from a list of names / ``{"name": ..., options}`` tables (None or [] = just scaling)."""
        if specs is None:
            specs = []
        if isinstance(specs, (str, dict)):
            specs = [specs]
        return cls([make_step(s) for s in specs])

    def to_config(self):
        return [{"name": s.name, **s.options()} for s in self.steps]

    def __repr__(self):
        return "Pipeline([" + ", ".join(s.name for s in self.steps) + "])"

    def _through(self, x, upto):
        x = to_float_images(x)
        for step in self.steps[:upto]:
            x = step.apply(x)
        return x

    def fit(self, train_x):
        """Fit every step on the training images, each on the output of the steps before it."""
        train_x = np.asarray(train_x)
        for k, step in enumerate(self.steps):
            if step.needs_fit:
                def chunks(k=k):
                    for start in range(0, len(train_x), FIT_CHUNK):
                        yield self._through(train_x[start:start + FIT_CHUNK], k)

                step.fit(chunks)
        self.fitted = True
        return self

    def apply(self, x):
        """float32 NCHW output of every step applied to ``x`` (uint8 or float NCHW)."""
        if not self.fitted:
            raise RuntimeError("preprocessing pipeline is not fitted: call fit(train_x) or load_state_dict() first")
        return self._through(x, len(self.steps))

    __call__ = apply

    def output_shape(self, input_shape):
        shape = tuple(input_shape)
        for step in self.steps:
            shape = step.output_shape(shape)
        return shape

    def state_dict(self):
        """``{"<index>.<step>.<tensor>": array}`` of every fitted statistic."""
        return {f"{i}.{s.name}.{k}": v for i, s in enumerate(self.steps) for k, v in s.state.items()}

    def load_state_dict(self, state):
        expected = {f"{i}.{s.name}.{k}" for i, s in enumerate(self.steps) for k in s.fitted_tensors}
        if set(state) != expected:
            missing = sorted(expected - set(state))
            extra = sorted(set(state) - expected)
            raise ConfigError(
                f"preprocessing state does not match the pipeline {self!r}: missing {missing or 'nothing'}, unexpected {extra or 'nothing'}"
            )
        for i, step in enumerate(self.steps):
            step.state = {k: np.asarray(state[f"{i}.{step.name}.{k}"]) for k in step.fitted_tensors}
        self.fitted = True
        return self
