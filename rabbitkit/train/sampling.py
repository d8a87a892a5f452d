"""``rabbit sample``: text from a trained character-level language model."""
import numpy as np

from ..errors import ConfigError
from .evaluate import load_run


def sample_run(run_dir, length=500, temperature=0.8, prime="", seed=None, which="best"):
    """Prime the run's model with ``prime`` and generate ``length`` characters."""
    from ..models.char_rnn import sample

    live = load_run(run_dir, which)
    if live.task != "language_model":
        raise ConfigError(f"{run_dir}: 'rabbit sample' needs a character language model run, "
                          f"this one is {live.task}")
    rng = np.random.default_rng(seed)
    return sample(live.model, live.dataset, prime=prime, length=length, temperature=temperature, rng=rng)
