"""Class models and saliency maps: what a classifier thinks a class looks like, and
which pixels its decision rests on.

* :func:`class_models`: activation maximisation of class logits from noise with
  Yosinski et al. 2015's regularisers (presets 1-4: their Table 1), one image per class.
* :func:`saliency`: Simonyan, Vedaldi & Zisserman 2014's image-specific class
  saliency, max over channels of |d class score / d pixel|.

Both take a loaded model (uint8 pixels in and out) or a bare network (model-space
arrays, see :mod:`rabbitkit.visualize.subject`) and write nothing::

    from rabbitkit.visualize import class_models, saliency
    result = class_models(loaded, classes=[0, 14], preset=3, seed=0)
    result.images[1], result.probabilities[1]      # the "stop" class's image and its softmax
    maps = saliency(loaded, photos)                 # (N, H, W) in [0, 1]
"""
import dataclasses

import numpy as np

from ..errors import ConfigError
from . import common
from .gradients import ImageGradient
from .objectives import ClassLogit
from .regularizers import YOSINSKI_PRESETS, yosinski
from .subject import Subject


@dataclasses.dataclass
class ClassModels:
    """Result of :func:`class_models`: one image per class, with its final scores."""

    classes: list
    images: list          # per class: uint8 (H, W, C) for a loaded model, else float (C, H, W)
    probabilities: np.ndarray  # (classes,) softmax of the target class for the final image
    logits: np.ndarray         # (classes,) its logit
    names: list


class _ScoredClassLogit(ClassLogit):
    """The class-logit objective, keeping the last scores (for the softmax in the log)."""

    def __call__(self, features):
        self.last_scores = np.asarray(features[self.layers[0]], dtype=np.float64)
        return super().__call__(features)


def _softmax(scores):
    shifted = scores - scores.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)


def _input_shape(subject, input_shape):
    shape = input_shape or (getattr(subject.loaded, "input_shape", None) if subject.loaded is not None else None)
    if shape is None:
        raise ConfigError("class models of a bare network need input_shape=(C, H, W)")
    return tuple(int(s) for s in shape)


def num_classes_of(network, input_shape):
    shape = network.output_shape(tuple(input_shape))
    if len(shape) != 1:
        raise ConfigError(f"the model's output has shape {shape} per image; class scores need one axis")
    return shape[0]


def parse_classes(spec, count):
    """``"all"``, ``"0,14,3"`` or a list of ints -> list of class indices, each checked against ``count``."""
    if isinstance(spec, str):
        if spec.strip() == "all":
            return list(range(count))
        try:
            spec = [int(part) for part in spec.split(",") if part.strip()]
        except ValueError:
            raise ConfigError(f"classes '{spec}': expected 'all' or class indices like 0,14,3") from None
    classes = [int(c) for c in spec]
    if not classes:
        raise ConfigError("no classes given; expected 'all' or class indices like 0,14,3")
    bad = [c for c in classes if not 0 <= c < count]
    if bad:
        raise ConfigError(f"class {bad[0]} is out of range: the model has {count} classes (expected 0..{count - 1})")
    return classes


def class_models(model, classes="all", *, preset=3, steps=None, lr=None, lr_policy=None, desired_progress=None,
                 regularizers=None,
                 seed=None, input_shape=None, input_range=None, log=None, progress=None):
    """Maximise each class's logit from noise; returns :class:`ClassModels`.

    ``preset``: 1-4, Yosinski et al.'s regulariser settings (their Table 1, see
    :data:`~rabbitkit.visualize.regularizers.YOSINSKI_PRESETS`), with the
    toolbox's step count for it (``steps`` overrides).  ``regularizers`` (a list
    of callables, e.g. built by name from plugins) replaces the preset's.

    Step size: by default the toolbox's "progress" policy for every preset,
    uncapped: each image steps by ``desired_progress / |g|^2 * g``, the step that
    would raise a linear logit by ``desired_progress`` (2.0), whatever the
    network's scale.  The toolbox's constant rate of 100 (0..255 Caffe pixels)
    is tuned to AlexNet's sensitivity and barely moves small nets;
    ``lr_policy="constant", lr=100`` gives it (rescaled by (range width / 255)^2
    to the model's input range), and ``lr`` caps the progress policy likewise.
    The start is the toolbox's ``mean_plus_rand``: Gaussian noise of one pixel
    level around 0, the mean of standardised inputs.
    """
    if preset not in YOSINSKI_PRESETS:
        raise ConfigError(f"preset {preset} unknown; Yosinski et al.'s presets are 1, 2, 3, 4")
    settings = dict(YOSINSKI_PRESETS[preset])
    steps = int(settings["steps"] if steps is None else steps)
    policy = lr_policy or "progress"
    progress_per_step = float(desired_progress or 2.0)
    if policy not in ("constant", "progress"):
        raise ConfigError(f"lr_policy '{policy}' unknown; expected constant or progress")
    subject = Subject(model, input_range)
    shape = _input_shape(subject, input_shape)
    classes = parse_classes(classes, num_classes_of(subject.network, shape))
    regularizers = yosinski(**settings) if regularizers is None else list(regularizers)
    level = (subject.span() or 1.0) / 255.0  # one pixel level in model units
    if lr is None:
        lr = settings["lr"] if policy == "constant" else np.inf
    lr = float(lr) * level**2
    rng = common.make_rng(seed)
    x = rng.normal(0.0, level, (len(classes),) + shape).astype(subject.network.dtype)
    subject.clip(x)
    objective = _ScoredClassLogit(classes)
    rows = np.arange(len(classes))
    with ImageGradient(subject.network, objective) as gradient, \
            common.objective_bar(steps, "class models", progress) as bar:
        for step in range(1, steps + 1):
            value, grad = gradient(x)
            probability = _softmax(objective.last_scores)[rows, classes]
            _ascend(x, grad, policy, lr, progress_per_step)
            for regularizer in regularizers:
                regularizer(x, grad, step)
            subject.clip(x)
            mean_logit = value / len(classes)
            if log is not None:
                log.record(objective=mean_logit, mean_probability=float(probability.mean()),
                           min_probability=float(probability.min()))
            bar.update(1, logit=mean_logit, p=float(probability.mean()))
        gradient(x)  # the scores of the final images
    scores = objective.last_scores
    return ClassModels(classes, [subject.to_output(image) for image in x], _softmax(scores)[rows, classes],
                       scores[rows, classes], [subject.class_name(c) for c in classes])


def _ascend(x, grad, policy, lr, desired_progress):
    """x += rate * grad per image: a constant rate, or the toolbox's "progress" rate
    min(lr, desired_progress / |g|^2) (the step that would raise a linear objective by desired_progress)."""
    if policy == "constant":
        x += (lr * grad).astype(x.dtype, copy=False)
        return
    squared = (grad.astype(np.float64) ** 2).reshape(len(x), -1).sum(axis=1)
    rate = np.minimum(lr, desired_progress / np.maximum(squared, 1e-30))
    x += (rate.reshape(-1, *([1] * (x.ndim - 1))) * grad).astype(x.dtype, copy=False)


def saliency(model, images, classes=None, *, input_range=None):
    """Simonyan et al.'s saliency: max over channels of |d score_c / d pixel| per image.

    ``images``: a list (or batch) of the caller's kind of image (see module
    docstring); ``classes``: one per image, default each image's predicted
    class.  Returns ``(maps, classes)``: float (N, H, W) maps scaled to [0, 1]
    per image, and the classes used.
    """
    subject = Subject(model, input_range)
    x = np.stack([subject.to_input(image, model_size=True) for image in images])
    from ..probe import FeatureProbe
    from ..backend import to_host

    if classes is None:
        with FeatureProbe(subject.network, [""]) as probe:
            classes = np.asarray(to_host(probe.forward(x)[""])).argmax(axis=1).tolist()
    count = num_classes_of(subject.network, x.shape[1:])
    classes = parse_classes(list(classes), count)
    if len(classes) != len(x):
        raise ConfigError(f"{len(classes)} classes for {len(x)} images; give one class per image")
    with ImageGradient(subject.network, ClassLogit(classes)) as gradient:
        _, grad = gradient(x)
    maps = np.abs(grad).max(axis=1)
    peak = maps.reshape(len(maps), -1).max(axis=1).reshape(-1, 1, 1)
    return maps / np.maximum(peak, 1e-30), classes
