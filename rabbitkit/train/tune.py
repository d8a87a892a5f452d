"""``rabbit tune EXP.toml``: measure an experiment's kernel variants ahead of its run.

Builds the experiment's model and data, runs one training step's forward and
backward pass and the evaluation batches' forward passes (which meets every
shape the run will meet), with tuning on, and reports the choices stored for
this machine (see :mod:`rabbitkit.backend.tuning`).
"""
import tempfile

from ..backend import tuning
from . import config as config_module
from .trainer import Run


def tune_experiment(path, overrides=None, measure_again=False):
    """Returns (machine key, [(op key, choice, {variant: seconds})] measured now, stored choices)."""
    config = config_module.load(path, overrides=overrides)
    config["experiment"]["kernel_choices"] = None  # measuring, not replaying
    tuning.forget(measure_again=measure_again)
    with tempfile.TemporaryDirectory() as scratch:
        live = Run(config, scratch, log_to_stdout=False, progress=False)
        tuning.set_enabled(True)
        try:
            live.feeder.fit()
            for _, (xb, yb) in live.feeder.train_batches(0, 0, limit=1):
                live.model.zero_grad()
                out = live.model.forward(xb, training=True)
                live.loss.forward(out, yb)
                live.model.backward(live.loss.backward())
            for split in ("val", "test"):
                if live.feeder.has_split(split):
                    for xb, _ in live.feeder.eval_batches(split):
                        live.model.forward(xb, training=False)
        finally:
            tuning.set_enabled(None)
    return tuning.machine_key(), tuning.measured(), tuning.known_choices()


def format_choices(machine, measured, known):
    lines = [f"machine: {machine}", f"cache: {tuning.cache_path()}"]
    if not measured:
        lines.append(f"nothing new to measure: {len(known)} choices stored for this machine "
                     "(--again measures them afresh)")
    for key, choice, seconds in measured:
        timings = ", ".join(f"{name} {1e3 * s:.3f} ms" for name, s in sorted(seconds.items(), key=lambda kv: kv[1]))
        lines.append(f"{key}: {timings} -> {choice}")
    return "\n".join(lines)
