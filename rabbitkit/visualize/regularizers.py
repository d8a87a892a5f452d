"""Image regularisers of activation maximisation (Yosinski et al. 2015, "Understanding
Neural Networks Through Deep Visualization", Section 3), applied after each step.

Each is a callable ``regularizer(images, grad, step)`` that changes the float
(N, C, H, W) ``images`` in place, in the model's input space, where 0 is the
dataset mean for standardised inputs (Caffe's mean-subtracted input in the
paper).  Percentiles are per image.  Registered by name through the
``rabbit_image_regularizers`` hook, as a third-party plugin's are::

    from rabbitkit.plugins import registry
    blur = registry("image_regularizers").get("blur")(sigma=1.0, every=4)

:data:`YOSINSKI_PRESETS` holds the paper's four parameter sets (its Table 1),
with the iteration counts and learning-rate policies the authors' toolbox
(``deep-visualization-toolbox/optimize_image.py``) gives for them.
"""
import numpy as np

from ..errors import ConfigError
from ..hookspecs import hookimpl


def _check_percentile(percentile):
    if not 0 <= percentile < 100:
        raise ConfigError(f"percentile must be in [0, 100), got {percentile}")
    return float(percentile)


class L2Decay:
    """x <- (1 - decay) x: pulls pixels towards 0 (theta_decay)."""

    def __init__(self, decay):
        if not 0 <= decay < 1:
            raise ConfigError(f"L2 decay must be in [0, 1), got {decay}")
        self.decay = float(decay)

    def __call__(self, images, grad, step):
        if self.decay:
            images *= images.dtype.type(1.0 - self.decay)


class GaussianBlur:
    """A Gaussian blur of width ``sigma`` pixels every ``every`` steps (theta_b_width, theta_b_every)."""

    def __init__(self, sigma, every=1):
        if sigma < 0 or every < 0:
            raise ConfigError(f"blur sigma and every must be >= 0, got {sigma} and {every}")
        self.sigma, self.every = float(sigma), int(every)

    def __call__(self, images, grad, step):
        if self.sigma > 0 and self.every > 0 and step % self.every == 0:
            from scipy.ndimage import gaussian_filter

            images[...] = gaussian_filter(images, sigma=(0, 0, self.sigma, self.sigma), mode="mirror")


class ClipSmallNorm:
    """Pixels whose norm over channels is below the ``percentile``-th percentile become 0 (theta_n_pct)."""

    def __init__(self, percentile):
        self.percentile = _check_percentile(percentile)

    def __call__(self, images, grad, step):
        if self.percentile:
            _zero_below(images, np.sqrt((images.astype(np.float64) ** 2).sum(axis=1)), self.percentile)


class ClipSmallContribution:
    """Pixels whose contribution |sum_c x * dobjective/dx| (the linearised change of the
    objective if the pixel were set to 0) is below the ``percentile``-th percentile become 0
    (theta_c_pct)."""

    def __init__(self, percentile):
        self.percentile = _check_percentile(percentile)

    def __call__(self, images, grad, step):
        if self.percentile:
            _zero_below(images, np.abs((images.astype(np.float64) * grad).sum(axis=1)), self.percentile)


def _zero_below(images, score, percentile):
    """Zero every channel of the pixels whose ``score`` (N, H, W) is below the image's percentile."""
    threshold = np.percentile(score.reshape(score.shape[0], -1), percentile, axis=1)
    small = score < threshold[:, None, None]
    images *= ~small[:, None]


#: Yosinski et al. 2015, Table 1, in its order (decay, blur width and interval,
#: norm and contribution percentiles); ``steps`` and the learning-rate policy
#: from the authors' toolbox README, which reproduces the table.  Learning rates
#: are for Caffe's 0..255 pixels (see :func:`rabbitkit.visualize.classes.class_models`
#: for how rabbitkit steps).
YOSINSKI_PRESETS = {
    1: dict(decay=0.0, blur_sigma=0.5, blur_every=4, norm_percentile=50, contribution_percentile=0,
            steps=500, lr_policy="progress", lr=100.0, desired_progress=2.0),
    2: dict(decay=0.3, blur_sigma=0.0, blur_every=0, norm_percentile=20, contribution_percentile=0,
            steps=750, lr_policy="constant", lr=100.0, desired_progress=None),
    3: dict(decay=0.0001, blur_sigma=1.0, blur_every=4, norm_percentile=0, contribution_percentile=0,
            steps=1000, lr_policy="constant", lr=100.0, desired_progress=None),
    4: dict(decay=0.0, blur_sigma=0.5, blur_every=4, norm_percentile=0, contribution_percentile=90,
            steps=1000, lr_policy="progress", lr=1e8, desired_progress=2.0),
}


def yosinski(decay=0.0, blur_sigma=0.0, blur_every=0, norm_percentile=0.0, contribution_percentile=0.0, **_):
    """The paper's four regularisers, in the toolbox's order of application."""
    return [L2Decay(decay), GaussianBlur(blur_sigma, blur_every), ClipSmallNorm(norm_percentile),
            ClipSmallContribution(contribution_percentile)]


def build(name, **options):
    """An image regulariser by registered name (a built-in or a plugin's)."""
    from ..plugins import registry

    factory = registry("image_regularizers").get(name)
    try:
        return factory(**options)
    except TypeError as err:
        raise ConfigError(f"image regulariser '{name}': {err}") from None


@hookimpl
def rabbit_image_regularizers():
    return {"l2_decay": L2Decay, "blur": GaussianBlur, "clip_small_norm": ClipSmallNorm,
            "clip_small_contribution": ClipSmallContribution}
