"""``function1d``: the talk's 1-D function-approximation demo data (generated).

Samples y = f(x) + noise on an interval: the MLP's job is to recover f.  Small
``n_train`` with noise and a large net shows overfitting.
"""
import math

import numpy as np

from ...errors import ConfigError, did_you_mean
from ...hookspecs import hookimpl
from ..base import Dataset, Split

FUNCTIONS = {
    "sin": lambda x: np.sin(x),
    "sinc": lambda x: np.sinc(x / math.pi),
    "step": lambda x: np.where(x >= 0, 1.0, -1.0),
    "abs": lambda x: np.abs(x) - 1.0,
    "poly": lambda x: 0.1 * x ** 3 - 0.5 * x,
    "gauss": lambda x: np.exp(-x ** 2),
}


def load_function1d(
    function: str = "sin",
    n_train: int = 256,
    n_val: int = 256,
    n_test: int = 256,
    noise: float = 0.0,
    low: float = -math.pi,
    high: float = math.pi,
    seed: int = 0,
):
    """Generate train/val/test samples of ``function`` on [low, high] with Gaussian ``noise``.

    Training inputs are drawn uniformly at random; validation and test inputs too
    (from independent streams), and only the targets of the training and validation
    splits carry noise, so the test loss measures the distance to the true function.
    """
    if function not in FUNCTIONS:
        raise ConfigError(f"data.function: unknown function '{function}'{did_you_mean(function, FUNCTIONS)}; "
                          f"known: {', '.join(FUNCTIONS)}")
    if not high > low:
        raise ConfigError(f"data.high ({high}) must be greater than data.low ({low})")
    f = FUNCTIONS[function]
    rng = np.random.default_rng(seed)
    splits = {}
    for name, n, noisy in (("train", n_train, True), ("val", n_val, True), ("test", n_test, False)):
        if n <= 0:
            continue
        x = np.sort(rng.uniform(low, high, n)).astype(np.float32)[:, None]
        y = f(x.astype(np.float64))
        if noisy and noise > 0:
            y = y + rng.normal(0.0, noise, y.shape)
        splits[name] = Split(x, y.astype(np.float32))
    info = {"function": function, "interval": f"[{low:.3g}, {high:.3g}]", "noise": noise}
    dataset = Dataset("function1d", "regression", (1,), None, None, splits, info)
    dataset.target_function = f
    return dataset


@hookimpl
def rabbit_datasets():
    return {"function1d": load_function1d}
