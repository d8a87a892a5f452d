"""Test-time augmentation: average the softmax over a few deterministic views.

A view is a shift (pixels), a scale and a rotation (degrees) about the image
centre, applied to the preprocessed inputs by the training augmentation's own
bilinear warp (edge border), so the views are the kind of image the net saw in
training.  ``[eval] tta`` names a preset or lists views::

    [eval]
    tta = "standard"                       # or "none", "shifts", "dense"
    # tta = [{}, {shift = [2, 0]}, {scale = 1.1}, {rotate = -8}]
"""
import dataclasses
import time

import numpy as np

from ..backend import to_host
from ..data.augment import BORDERS, similarity_maps, source_matrices, warp_bilinear
from ..errors import ConfigError


@dataclasses.dataclass(frozen=True)
class View:
    shift: tuple = (0.0, 0.0)
    scale: float = 1.0
    rotate: float = 0.0

    @property
    def identity(self):
        return self.shift == (0.0, 0.0) and self.scale == 1.0 and self.rotate == 0.0

    def describe(self):
        if self.identity:
            return "identity"
        parts = []
        if self.shift != (0.0, 0.0):
            parts.append(f"shift {self.shift[0]:g},{self.shift[1]:g}")
        if self.scale != 1.0:
            parts.append(f"scale {self.scale:g}")
        if self.rotate:
            parts.append(f"rotate {self.rotate:g}")
        return " ".join(parts)


def _axis_shifts(pixels):
    return [View((pixels, 0.0)), View((-pixels, 0.0)), View((0.0, pixels)), View((0.0, -pixels))]


_SHIFTS = _axis_shifts(2.0)
PRESETS = {
    "none": [View()],
    "shifts": [View()] + _SHIFTS,
    # The training augmentation of the main job spans +-3 px, +-15 degrees and
    # +-15 % scale: these views stay well inside what the net was trained on.
    "standard": [View()] + _SHIFTS + [View(scale=0.9), View(scale=1.1), View(rotate=-8.0), View(rotate=8.0)],
    # A grid over the same ranges, one ingredient at a time (29 views, 3.2x standard's
    # cost): shifts of 1-3 px along each axis and 2 px diagonally, scales 0.85-1.15,
    # rotations of 4-12 degrees either way.
    "dense": [View()] + _axis_shifts(1.0) + _SHIFTS + _axis_shifts(3.0)
    + [View((dx, dy)) for dy in (2.0, -2.0) for dx in (2.0, -2.0)]
    + [View(scale=s) for s in (0.85, 0.9, 0.95, 1.05, 1.1, 1.15)]
    + [View(rotate=r) for r in (-12.0, -8.0, -4.0, 4.0, 8.0, 12.0)],
}


def parse_views(spec, where="eval.tta"):
    """A preset name or a list of ``{shift, scale, rotate}`` tables -> list of :class:`View`."""
    if spec is None:
        return PRESETS["none"]
    if isinstance(spec, str):
        if spec not in PRESETS:
            raise ConfigError(f"{where}: unknown preset '{spec}'; known: {', '.join(PRESETS)}")
        return PRESETS[spec]
    if not isinstance(spec, list) or not spec:
        raise ConfigError(f"{where}: expected a preset name or a non-empty list of views, got {spec!r}")
    views = []
    for index, table in enumerate(spec):
        if not isinstance(table, dict) or set(table) - {"shift", "scale", "rotate"}:
            raise ConfigError(f"{where}[{index}]: expected a table with shift, scale, rotate; got {table!r}")
        shift = table.get("shift", (0.0, 0.0))
        if not (isinstance(shift, (list, tuple)) and len(shift) == 2):
            raise ConfigError(f"{where}[{index}].shift: expected [dx, dy], got {shift!r}")
        scale = float(table.get("scale", 1.0))
        if scale <= 0:
            raise ConfigError(f"{where}[{index}].scale: expected a positive number, got {scale}")
        views.append(View((float(shift[0]), float(shift[1])), scale, float(table.get("rotate", 0.0))))
    return views


def warp_view(x, view):
    """The view of a preprocessed batch x (N, C, H, W) float32."""
    if view.identity:
        return x
    n, _, h, w = x.shape
    forward = similarity_maps(np.full(n, np.deg2rad(view.rotate)), np.full(n, view.scale))
    mats = source_matrices(forward, np.tile(np.array(view.shift, dtype=np.float64), (n, 1)), (h, w))
    out = np.empty_like(x)
    warp_bilinear(x, mats, np.zeros((1, 2, 1, 1), np.float32), False, BORDERS["edge"], out)
    return out


def softmax(logits):
    z = logits - logits.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


@dataclasses.dataclass
class Prediction:
    """Class probabilities of a split (averaged over views), its targets and the cost."""

    probabilities: np.ndarray
    targets: np.ndarray
    views: list
    seconds: float

    @property
    def accuracy(self):
        return float(np.mean(self.probabilities.argmax(axis=1) == self.targets)) if len(self.targets) else float("nan")

    @property
    def loss(self):
        """Mean negative log-likelihood of the averaged probabilities."""
        picked = self.probabilities[np.arange(len(self.targets)), self.targets]
        return float(-np.mean(np.log(np.maximum(picked, 1e-12))))


def predict(run, split, views=None):
    """Softmax probabilities of ``run``'s model on ``split`` averaged over ``views``."""
    views = views or PRESETS["none"]
    if run.task != "classification":
        raise ConfigError(f"test-time augmentation needs a classification run, this one is {run.task}")
    run.model.reset_state()
    started = time.perf_counter()
    probabilities, targets = [], []
    for xb, yb in run.feeder.eval_batches(split):
        if xb.ndim != 4 and any(not view.identity for view in views):
            raise ConfigError(f"test-time augmentation warps images; inputs of shape {xb.shape[1:]} are not images")
        total = None
        for view in views:
            logits = np.asarray(to_host(run.model.forward(warp_view(xb, view), training=False)), dtype=np.float64)
            p = softmax(logits)
            total = p if total is None else total + p
        probabilities.append(total / len(views))
        targets.append(np.asarray(yb))
    return Prediction(np.concatenate(probabilities), np.concatenate(targets), list(views), time.perf_counter() - started)
