"""Training-time augmentation from the talk, on the fly, seeded, as parallel Numba kernels.

``Augmenter.from_config(table)`` reads the ``[data.augment]`` table; calling the
augmenter on a float32 NCHW batch with its labels and a numpy Generator returns
a new augmented batch (the input is not modified) and the labels (changed only
by class-mapped flips).  Every random draw comes from that generator, so a
seeded generator gives the same batch every time.

Geometry is one combined warp per image, with bilinear sampling: horizontal and
vertical flips, 90-degree rotations, random crops (``crop_padding``: integer
shifts of up to that many pixels, as pad-and-crop does), translations
(``translate``: shifts uniform in +-pixels), rotations (``rotate``: +-degrees),
scaling (``scale``: factor uniform in [1 - s, 1 + s]) and elastic distortions
(Simard et al. 2003: a uniform(-1, 1) displacement field per axis, smoothed by a
Gaussian of ``elastic_sigma`` pixels and multiplied by ``elastic_alpha``).
Pixels that come from outside the image follow ``border``: "edge" (repeat the
edge), "reflect" (mirror) or "zero".  Flips and 90-degree rotations alone move
pixels exactly.

Flips: each one is applied to half of the samples.  They are off by default
because a mirrored traffic sign may mean something else.  ``flip_class_map``
(for ``hflip``) and ``vflip_class_map`` (for ``vflip``) map a class id to the
class of its mirror image: a class that maps to itself is flipped freely, a
pair such as "turn left" <-> "turn right" is flipped *and relabelled*, and a
class that is absent or maps to -1 is never flipped.  Without a map every class
is flipped and keeps its label (natural images).  See
``rabbitkit.data.datasets.gtsrb.HFLIP_CLASS_MAP``.

Colour (after geometry, per image): ``brightness`` adds an offset uniform in
+-b to every pixel; ``contrast`` scales the deviation from the image mean by a
factor in [1 - c, 1 + c]; ``saturation`` (3 channels) scales the deviation from
each pixel's luma by a factor in [1 - s, 1 + s].
"""
import math

import numpy as np
from numba import prange

from ..backend.cpu import kernel
from ..errors import ConfigError
from .filters import blur_planes, gaussian_weights
from .options import check_options

BORDERS = {"zero": 0, "edge": 1, "reflect": 2}


@kernel(parallel=False)
def _source_index(k, n, border):
    """Index into [0, n) for a tap at k, or -1 for a zero-border tap outside."""
    if 0 <= k < n:
        return k
    if border == 0:
        return -1
    if border == 1:
        return 0 if k < 0 else n - 1
    if n == 1:
        return 0
    period = 2 * (n - 1)  # mirror without repeating the edge pixel: -1 -> 1, n -> n - 2
    k = abs(k) % period
    return k if k < n else period - k


@kernel
def warp_bilinear(x, mats, disp, has_disp, border, out):
    """out[s] = x[s] sampled at mats[s] @ (j - cx, i - cy, 1) (+ disp[s] when has_disp), bilinear.

    ``mats`` (N, 2, 3) maps output pixel coordinates (centred) to source
    coordinates (absolute); ``disp`` (N, 2, H, W) adds (dx, dy) per output pixel.
    """
    n, c, h, w = x.shape
    cy = (h - 1) * 0.5
    cx = (w - 1) * 0.5
    for s in prange(n):
        for i in range(h):
            for j in range(w):
                u = j - cx
                v = i - cy
                sx = mats[s, 0, 0] * u + mats[s, 0, 1] * v + mats[s, 0, 2]
                sy = mats[s, 1, 0] * u + mats[s, 1, 1] * v + mats[s, 1, 2]
                if has_disp:
                    sx += disp[s, 0, i, j]
                    sy += disp[s, 1, i, j]
                x0 = int(math.floor(sx))
                y0 = int(math.floor(sy))
                fx = sx - x0
                fy = sy - y0
                xa = _source_index(x0, w, border)
                xb = _source_index(x0 + 1, w, border)
                ya = _source_index(y0, h, border)
                yb = _source_index(y0 + 1, h, border)
                for ch in range(c):
                    v00 = x[s, ch, ya, xa] if ya >= 0 and xa >= 0 else 0.0
                    v01 = x[s, ch, ya, xb] if ya >= 0 and xb >= 0 else 0.0
                    v10 = x[s, ch, yb, xa] if yb >= 0 and xa >= 0 else 0.0
                    v11 = x[s, ch, yb, xb] if yb >= 0 and xb >= 0 else 0.0
                    top = v00 + fx * (v01 - v00)
                    bottom = v10 + fx * (v11 - v10)
                    out[s, ch, i, j] = top + fy * (bottom - top)


@kernel
def jitter_colour(x, brightness, contrast, saturation):
    """In place, per image: saturation (C == 3), then contrast around the image mean, then brightness."""
    n, c, h, w = x.shape
    for s in prange(n):
        if c == 3 and saturation[s] != 1.0:
            for i in range(h):
                for j in range(w):
                    luma = 0.299 * x[s, 0, i, j] + 0.587 * x[s, 1, i, j] + 0.114 * x[s, 2, i, j]
                    for ch in range(3):
                        x[s, ch, i, j] = luma + saturation[s] * (x[s, ch, i, j] - luma)
        mean = 0.0
        if contrast[s] != 1.0:
            for ch in range(c):
                for i in range(h):
                    for j in range(w):
                        mean += x[s, ch, i, j]
            mean /= c * h * w
        for ch in range(c):
            for i in range(h):
                for j in range(w):
                    x[s, ch, i, j] = mean + contrast[s] * (x[s, ch, i, j] - mean) + brightness[s]


def similarity_maps(theta, factor):
    """(N, 2, 2) rotations by ``theta`` (radians) scaled by ``factor``, per image."""
    cos, sin = np.cos(theta) * factor, np.sin(theta) * factor
    return np.stack([np.stack([cos, -sin], -1), np.stack([sin, cos], -1)], 1)


def source_matrices(forward, shift, shape):
    """(N, 2, 3) output->source matrices for :func:`warp_bilinear` from the images'
    forward maps ``forward`` (N, 2, 2, about the centre) and pixel shifts (N, 2) (dx, dy)."""
    h, w = shape
    inverse = np.linalg.inv(forward)
    centre = np.array([(w - 1) / 2, (h - 1) / 2])
    # source = inverse @ (output - centre - shift) + centre
    offset = centre - np.einsum("nij,nj->ni", inverse, shift)
    return np.concatenate([inverse, offset[:, :, None]], axis=2).astype(np.float32)


def _class_table(mapping, owner):
    """(flippable mask, target class) lookup arrays from a {class: class} map (TOML keys are strings)."""
    pairs = {}
    for key, value in mapping.items():
        try:
            src, dst = int(key), int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"augment: {owner} must map class ids to class ids, got {key!r} = {value!r}") from None
        if src < 0 or dst < -1:
            raise ConfigError(f"augment: {owner} has a negative class id in {key!r} = {value!r}")
        pairs[src] = dst
    size = max(pairs, default=-1) + 1
    target = np.full(size, -1, np.int64)
    for src, dst in pairs.items():
        target[src] = dst
    return target


class Augmenter:
    """Random augmentation of training batches (see the module docstring for every option)."""

    def __init__(
        self,
        hflip: bool = False,
        vflip: bool = False,
        flip_class_map: dict | None = None,
        vflip_class_map: dict | None = None,
        rot90: bool = False,
        crop_padding: int = 0,
        translate: float = 0.0,
        rotate: float = 0.0,
        scale: float = 0.0,
        elastic_alpha: float = 0.0,
        elastic_sigma: float = 4.0,
        brightness: float = 0.0,
        contrast: float = 0.0,
        saturation: float = 0.0,
        border: str = "edge",
    ):
        for name, value in (("crop_padding", crop_padding), ("translate", translate), ("rotate", rotate),
                            ("scale", scale), ("elastic_alpha", elastic_alpha), ("brightness", brightness),
                            ("contrast", contrast), ("saturation", saturation)):
            if value < 0:
                raise ConfigError(f"augment: {name} must be >= 0, got {value}")
        if scale >= 1:
            raise ConfigError(f"augment: scale must be < 1 (a factor in [1 - scale, 1 + scale]), got {scale}")
        if contrast > 1 or saturation > 1:
            raise ConfigError("augment: contrast and saturation must be <= 1 (factors in [1 - v, 1 + v])")
        if elastic_sigma <= 0:
            raise ConfigError(f"augment: elastic_sigma must be > 0, got {elastic_sigma}")
        if border not in BORDERS:
            raise ConfigError(f"augment: border must be one of {', '.join(BORDERS)}, got {border!r}")
        self.hflip, self.vflip, self.rot90 = bool(hflip), bool(vflip), bool(rot90)
        self.flip_class_map, self.vflip_class_map = flip_class_map, vflip_class_map
        self.crop_padding, self.translate = int(crop_padding), float(translate)
        self.rotate, self.scale = float(rotate), float(scale)
        self.elastic_alpha, self.elastic_sigma = float(elastic_alpha), float(elastic_sigma)
        self.brightness, self.contrast, self.saturation = float(brightness), float(contrast), float(saturation)
        self.border = border
        self._htable = None if flip_class_map is None else _class_table(flip_class_map, "flip_class_map")
        self._vtable = None if vflip_class_map is None else _class_table(vflip_class_map, "vflip_class_map")
        self._elastic_weights = gaussian_weights(self.elastic_sigma).astype(np.float32)

    @classmethod
    def from_config(cls, table):
        """An Augmenter from the ``[data.augment]`` table (None or {} = no augmentation)."""
        table = dict(table or {})
        check_options("augment", cls.__init__, table)
        return cls(**table)

    def to_config(self):
        keys = ("hflip", "vflip", "flip_class_map", "vflip_class_map", "rot90", "crop_padding", "translate", "rotate",
                "scale", "elastic_alpha", "elastic_sigma", "brightness", "contrast", "saturation", "border")
        return {k: getattr(self, k) for k in keys}

    @property
    def geometric(self):
        return bool(self.hflip or self.vflip or self.rot90 or self.crop_padding or self.translate or self.rotate
                    or self.scale or self.elastic_alpha)

    @property
    def colour(self):
        return bool(self.brightness or self.contrast or self.saturation)

    @property
    def enabled(self):
        return self.geometric or self.colour

    def __repr__(self):
        on = {k: v for k, v in self.to_config().items() if v not in (False, 0, 0.0, None) and k not in ("border", "elastic_sigma")}
        return f"Augmenter({', '.join(f'{k}={v}' for k, v in on.items())})"

    @staticmethod
    def _flips(y, table, rng):
        """(flip mask, new labels) for one flip axis: half the flippable samples flip."""
        coin = rng.random(len(y)) < 0.5
        if table is None:
            return coin, y
        known = y < len(table)
        target = np.where(known, table[np.minimum(y, len(table) - 1)], -1)
        flip = coin & (target >= 0)
        return flip, np.where(flip, target, y)

    def matrices(self, y, shape, rng):
        """(N, 2, 3) output->source matrices and the new labels for one batch."""
        n = len(y)
        h, w = shape
        forward = np.tile(np.eye(2), (n, 1, 1))  # forward map of the image, centred coordinates
        y = np.asarray(y)
        if self.hflip:
            flip, y = self._flips(y, self._htable, rng)
            forward[flip, :, 0] *= -1
        if self.vflip:
            flip, y = self._flips(y, self._vtable, rng)
            forward[flip, :, 1] *= -1
        if self.rot90:
            if h != w:
                raise ConfigError(f"augment: rot90 needs square images, got {h}x{w}")
            k = rng.integers(0, 4, n)
            forward = similarity_maps(k * np.pi / 2, np.ones(n)).round() @ forward
        if self.rotate or self.scale:
            theta = np.deg2rad(rng.uniform(-self.rotate, self.rotate, n)) if self.rotate else np.zeros(n)
            factor = rng.uniform(1 - self.scale, 1 + self.scale, n) if self.scale else np.ones(n)
            forward = similarity_maps(theta, factor) @ forward
        shift = np.zeros((n, 2))
        if self.translate:
            shift += rng.uniform(-self.translate, self.translate, (n, 2))
        if self.crop_padding:
            shift += rng.integers(-self.crop_padding, self.crop_padding + 1, (n, 2))
        return source_matrices(forward, shift, (h, w)), y

    def __call__(self, x, y, rng):
        """Augment one batch: x float32 (N, C, H, W), y (N,) labels, rng a numpy Generator."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 4:
            raise ConfigError(f"augment: expects image batches (N, C, H, W), got shape {x.shape}")
        if not self.enabled:
            return x, y
        n, c, h, w = x.shape
        y_out = y
        if self.geometric:
            mats, y_out = self.matrices(y, (h, w), rng)
            if self.elastic_alpha:
                # uniform(-1, 1) drawn directly in float32 (half the cost of float64 draws)
                noise = rng.random((n * 2, h, w), dtype=np.float32) * np.float32(2) - np.float32(1)
                disp = np.empty_like(noise)
                blur_planes(noise, self._elastic_weights, disp)
                disp = (disp * np.float32(self.elastic_alpha)).reshape(n, 2, h, w)
            else:
                disp = np.zeros((1, 2, 1, 1), np.float32)
            out = np.empty_like(x)
            warp_bilinear(x, mats, disp, bool(self.elastic_alpha), BORDERS[self.border], out)
        else:
            out = x.copy()
        if self.colour:
            brightness = rng.uniform(-self.brightness, self.brightness, n).astype(np.float32)
            contrast = rng.uniform(1 - self.contrast, 1 + self.contrast, n).astype(np.float32)
            saturation = rng.uniform(1 - self.saturation, 1 + self.saturation, n).astype(np.float32)
            jitter_colour(out, brightness, contrast, saturation)
        if y_out is not y and y is not None:
            y_out = y_out.astype(np.asarray(y).dtype)
        return out, y_out
