"""Learning-rate schedules' values and the early-stopping rule, epoch by epoch."""
import math
import types

import pytest

from rabbitkit.errors import ConfigError
from rabbitkit.train import builder
from rabbitkit.train.schedules import CosineSchedule, PlateauSchedule, StepSchedule
from rabbitkit.train.trainer import Run


def test_step_schedule_halves_every_two_epochs():
    schedule = StepSchedule(0.1, 10, step_size=2, gamma=0.5)
    assert [schedule.lr_for(e) for e in range(6)] == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025, 0.025])


def test_cosine_with_warm_up():
    schedule = CosineSchedule(1.0, 10, eta_min=0.1, warmup_epochs=2)
    lrs = [schedule.lr_for(e) for e in range(11)]
    assert lrs[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])  # linear warm-up, then the full rate
    assert lrs[6] == pytest.approx(0.55)  # half way through the 8 cosine epochs: (1 + 0.1) / 2
    assert all(a > b for a, b in zip(lrs[2:10], lrs[3:10]))  # falls monotonically
    assert lrs[10] == pytest.approx(0.1)  # eta_min at the end
    no_warmup = CosineSchedule(0.2, 4)
    assert [no_warmup.lr_for(e) for e in range(5)] == pytest.approx(
        [0.2, 0.1 * (1 + math.sqrt(0.5)), 0.1, 0.1 * (1 - math.sqrt(0.5)), 0.0])


def feed(schedule, metrics, higher_is_better=False):
    lrs = []
    for value in metrics:
        schedule.observe(value, higher_is_better)
        lrs.append(schedule.lr_for(0))
    return lrs


def test_plateau_cuts_after_more_than_patience_bad_epochs_and_stops_at_min_lr():
    schedule = PlateauSchedule(1.0, 20, factor=0.1, patience=2, min_lr=0.005)
    lrs = feed(schedule, [1.0, 0.9, 0.95, 0.96, 0.97, 0.98, 0.99, 1.0, 0.8, 0.85, 0.86, 0.87])
    assert lrs == pytest.approx([1, 1, 1, 1, 0.1, 0.1, 0.1, 0.01, 0.01, 0.01, 0.01, 0.005])
    restored = PlateauSchedule(1.0, 20, factor=0.1, patience=2, min_lr=0.005)
    restored.load_state_dict(schedule.state_dict())
    assert restored.lr_for(0) == 0.005 and restored.best == 0.8


def test_plateau_min_delta_and_higher_is_better():
    schedule = PlateauSchedule(1.0, 10, factor=0.5, patience=1, min_delta=0.05)
    # accuracy creeping up by less than min_delta is no improvement
    assert feed(schedule, [0.5, 0.52, 0.54, 0.7, 0.6, 0.6], higher_is_better=True) == pytest.approx(
        [1, 1, 0.5, 0.5, 0.5, 0.25])


@pytest.mark.parametrize("mode,higher,expected", [
    ("max", False, [1, 1, 1, 1]),  # rising values improve, whatever the monitor says
    ("min", True, [1, 1, 0.5, 0.5]),
    ("auto", True, [1, 1, 1, 1]),
    ("auto", False, [1, 1, 0.5, 0.5]),
])
def test_plateau_mode_decides_the_direction(mode, higher, expected):
    schedule = PlateauSchedule(1.0, 10, factor=0.5, patience=1, mode=mode)
    assert feed(schedule, [0.1, 0.2, 0.3, 0.4], higher_is_better=higher) == pytest.approx(expected)


def test_plateau_mode_is_checked():
    config = {"source": "exp.toml", "train": {"schedule": {"name": "plateau", "mode": "maximum"}, "lr": 0.1,
                                               "epochs": 3}}
    with pytest.raises(ConfigError, match="exp.toml: train.schedule: mode: expected one of 'auto', 'min', 'max', "
                                          "got 'maximum'"):
        builder.build_schedule(config)


def stopping_epoch(values, patience, metric="val_loss", monitor="val_loss", min_delta=0.0, other=None):
    """The first epoch after which the trainer's rule stops, feeding ``values`` one epoch at a time."""
    fake = types.SimpleNamespace(config={"train": {"early_stopping": {
        "patience": patience, "metric": None if metric == monitor else metric, "min_delta": min_delta}}},
        monitor=monitor, best={"value": 0.0}, history=[])
    for epoch, value in enumerate(values, start=1):
        row = {"epoch": epoch, metric: value}
        if other is not None:
            row[monitor] = other[epoch - 1]
        fake.history.append(row)
        if Run._early_stop(fake):
            return epoch
    return None


def test_early_stopping_patience_resets_on_improvement():
    # improvements at epochs 2 and 4 each restart the count; epochs 5 and 6 do not improve on 4
    assert stopping_epoch([1.0, 0.9, 0.95, 0.85, 0.9, 0.92, 0.5], patience=2) == 6
    assert stopping_epoch([1.0, 0.9, 0.8, 0.7, 0.6], patience=2) is None


def test_early_stopping_higher_is_better_for_accuracies():
    assert stopping_epoch([0.5, 0.6, 0.55, 0.58, 0.9], patience=2, metric="val_accuracy",
                          monitor="val_accuracy") == 4
    assert stopping_epoch([0.5, 0.6, 0.7, 0.8], patience=1, metric="val_accuracy", monitor="val_accuracy") is None


def test_early_stopping_min_delta():
    assert stopping_epoch([1.0, 0.99, 0.98, 0.97], patience=2, min_delta=0.05) == 3
    assert stopping_epoch([1.0, 0.99, 0.98, 0.97], patience=2, min_delta=0.0) is None


def test_early_stopping_on_a_metric_other_than_the_monitor():
    # the monitor (val_loss) keeps improving, the watched val_accuracy stalls: it stops
    stalls = [0.8, 0.8, 0.8, 0.8]
    improving_loss = [1.0, 0.9, 0.8, 0.7]
    assert stopping_epoch(stalls, patience=2, metric="val_accuracy", other=improving_loss) == 3
    # ... and the other way round: the accuracy improves while the loss would stall
    assert stopping_epoch([0.5, 0.6, 0.7, 0.8], patience=2, metric="val_accuracy", other=[1.0] * 4) is None
