"""Learning-rate schedules, stepped once per epoch: step, cosine, reduce-on-plateau."""
import math

from ..errors import ConfigError, did_you_mean


class StepSchedule:
    """lr = base_lr * gamma ** (epoch // step_size)."""

    def __init__(self, base_lr, epochs, step_size: int = 10, gamma: float = 0.1):
        self.base_lr, self.step_size, self.gamma = base_lr, int(step_size), float(gamma)

    def lr_for(self, epoch, metric=None):
        return self.base_lr * self.gamma ** (epoch // self.step_size)

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


class CosineSchedule:
    """Cosine annealing from base_lr to eta_min over the run, optional linear warm-up."""

    def __init__(self, base_lr, epochs, eta_min: float = 0.0, warmup_epochs: int = 0):
        self.base_lr, self.epochs, self.eta_min, self.warmup = base_lr, max(1, int(epochs)), float(eta_min), int(warmup_epochs)

    def lr_for(self, epoch, metric=None):
        if epoch < self.warmup:
            return self.base_lr * (epoch + 1) / (self.warmup + 1)
        span = max(1, self.epochs - self.warmup)
        progress = min(1.0, (epoch - self.warmup) / span)
        return self.eta_min + 0.5 * (self.base_lr - self.eta_min) * (1 + math.cos(math.pi * progress))

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


class PlateauSchedule:
    """Multiply lr by ``factor`` when the monitored metric has not improved for more than ``patience`` epochs.

    ``mode``: ``"auto"`` (accuracies improve upwards, everything else downwards, as
    the monitor), ``"min"`` or ``"max"`` to say it outright.
    """

    MODES = ("auto", "min", "max")

    def __init__(self, base_lr, epochs, factor: float = 0.1, patience: int = 5, min_delta: float = 0.0,
                 min_lr: float = 0.0, mode: str = "auto"):
        if mode not in self.MODES:
            raise ValueError(f"mode: expected one of {', '.join(repr(m) for m in self.MODES)}, got {mode!r}")
        self.lr, self.factor, self.patience = base_lr, float(factor), int(patience)
        self.min_delta, self.min_lr, self.mode = float(min_delta), float(min_lr), mode
        self.best = None
        self.bad_epochs = 0

    def observe(self, metric, higher_is_better):
        if metric is None:
            return
        if self.mode != "auto":
            higher_is_better = self.mode == "max"
        improved = self.best is None or (
            metric > self.best + self.min_delta if higher_is_better else metric < self.best - self.min_delta)
        if improved:
            self.best, self.bad_epochs = metric, 0
        else:
            self.bad_epochs += 1
            if self.bad_epochs > self.patience:
                self.lr = max(self.min_lr, self.lr * self.factor)
                self.bad_epochs = 0

    def lr_for(self, epoch, metric=None):
        return self.lr

    def state_dict(self):
        return {"lr": self.lr, "best": self.best, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state):
        self.lr, self.best, self.bad_epochs = state["lr"], state["best"], state["bad_epochs"]


class ConstantSchedule(StepSchedule):
    """lr = base_lr throughout (the default)."""

    def __init__(self, base_lr, epochs):
        super().__init__(base_lr, epochs, step_size=1, gamma=1.0)


SCHEDULES = {"constant": ConstantSchedule, "step": StepSchedule, "cosine": CosineSchedule, "plateau": PlateauSchedule}


def get_schedule(name):
    if name not in SCHEDULES:
        raise ConfigError(f"unknown schedule '{name}'{did_you_mean(name, SCHEDULES)}; known: {', '.join(SCHEDULES)}")
    return SCHEDULES[name]
