"""Choosing kernel variants by measuring (rabbitkit.backend.tuning)."""
import json
import time

import numpy as np
import pytest

from rabbitkit.backend import tuning


@pytest.fixture
def tuner(tmp_path, monkeypatch):
    monkeypatch.setenv("RABBIT_CACHE", str(tmp_path))
    tuning.forget()
    tuning.set_enabled(True)
    yield tmp_path / "tuning.json"
    tuning.set_enabled(None)
    tuning.forget()


def test_the_faster_candidate_wins_and_is_stored_per_machine(tuner):
    calls = {"slow": 0, "fast": 0}

    def slow():
        calls["slow"] += 1
        time.sleep(0.004)

    def fast():
        calls["fast"] += 1

    assert tuning.choose("demo", (3, 4), {"slow": slow, "fast": fast}, default="slow") == "fast"
    assert calls == {"slow": 1 + tuning.TIMED_CALLS, "fast": 1 + tuning.TIMED_CALLS}
    # known now: no more measuring, in this process or the next (read from disk)
    assert tuning.choose("demo", (3, 4), {"slow": slow, "fast": fast}, default="slow") == "fast"
    tuning.forget()
    assert tuning.choose("demo", (3, 4), {"slow": slow, "fast": fast}, default="slow") == "fast"
    assert calls["fast"] == 1 + tuning.TIMED_CALLS
    stored = json.loads(tuner.read_text())
    (machine,) = stored
    assert tuning.cpu_model() in machine and "threads" in machine
    record = stored[machine]["demo (3, 4)"]
    assert record["choice"] == "fast" and record["seconds"]["slow"] > record["seconds"]["fast"]


def test_tuning_off_takes_the_default_and_measures_nothing(tuner):
    tuning.set_enabled(False)
    ran = []
    assert tuning.choose("demo", 1, {"a": lambda: ran.append("a"), "b": lambda: ran.append("b")}, default="b") == "b"
    assert ran == [] and not tuner.exists()


class FakeClock:
    """tuning's view of time.perf_counter: advanced by hand, so timings are exact."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now

    def spend(self, seconds):
        self.now += seconds


def test_setup_runs_untimed_before_every_call(tuner, monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(tuning, "time", clock)
    setups = []
    candidates = {"a": lambda: clock.spend(2.0), "b": lambda: clock.spend(1.0)}
    choice = tuning.choose("demo", 5, candidates, default="a", setup=lambda: (setups.append(1), clock.spend(100.0)))
    assert choice == "b"
    assert len(setups) == len(candidates) * (1 + tuning.TIMED_CALLS)
    ((_, _, seconds),) = tuning.measured()
    assert seconds == {"a": 2.0, "b": 1.0}  # the setup's 100 s counted nowhere


def test_choices_follow_the_thread_count(tuner):
    """The machine key names the thread count; a change of it in the process is a new machine."""
    import numba

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs two Numba threads")
    before = numba.get_num_threads()
    ran = []
    candidates = {"a": lambda: ran.append("a") or time.sleep(0.002), "b": lambda: ran.append("b")}
    try:
        numba.set_num_threads(1)
        assert tuning.choose("demo", 6, candidates, default="a") == "b"
        measured_once = len(ran)
        numba.set_num_threads(2)
        assert tuning.choose("demo", 6, candidates, default="a") == "b"
        assert len(ran) == 2 * measured_once
        numba.set_num_threads(1)
        assert tuning.choose("demo", 6, candidates, default="a") == "b"
        assert len(ran) == 2 * measured_once  # known for one thread already
    finally:
        numba.set_num_threads(before)
    stored = json.loads(tuner.read_text())
    assert sorted(machine.rsplit("|", 1)[1].strip() for machine in stored) == ["1 threads", "2 threads"]


def test_a_damaged_cache_is_measured_again(tuner):
    tuner.write_text("{not json")
    assert tuning.choose("demo", 2, {"a": lambda: time.sleep(0.002), "b": lambda: None}, default="a") == "b"
    assert json.loads(tuner.read_text())  # rewritten whole


def test_conv2d_asks_the_tuner_and_runs_the_choice(tuner, monkeypatch):
    """With two threads and a batch of two, Conv2D offers both variants; both give one result."""
    import numba

    from rabbitkit.layers.conv2d import Conv2D

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs two Numba threads")
    asked = []
    real = tuning.choose

    def spy(op, shape, candidates, default):
        asked.append((op, sorted(candidates)))
        return real(op, shape, candidates, default)

    monkeypatch.setattr(tuning, "choose", spy)
    numba.set_num_threads(2)
    layer = Conv2D(2, 3, 3, padding=1)
    x = np.random.default_rng(0).standard_normal((2, 2, 6, 6)).astype(np.float32)
    y = layer.forward(x)
    layer.backward(np.ones_like(y))
    assert asked == [("conv2d.forward", ["per-sample", "whole-batch"]), ("conv2d.backward", ["per-sample", "whole-batch"])]
    np.testing.assert_allclose(layer.grads["bias"], np.full(3, 72.0), rtol=1e-6)  # added once, not per timing call
    choices = tuning.measured()
    assert [key.split()[0] for key, _, _ in choices] == ["conv2d.forward", "conv2d.backward"]


def test_rabbit_tune_measures_an_experiments_conv_shapes(tmp_path):
    """End to end: `rabbit tune` on the main job's net with generated GTSRB-format data."""
    import os

    from test_main_job import EXPERIMENT, SMALL, rabbit, write_official_gtsrb

    data = tmp_path / "gtsrb"
    write_official_gtsrb(data, tracks=2, per_track=4, tests_per_class=2)
    env = dict(os.environ, RABBIT_CACHE=str(tmp_path / "cache"), RABBIT_TUNE="0", NUMBA_NUM_THREADS="2")
    args = ["tune", EXPERIMENT, "--set", f"data.path=\"{data}\"", *SMALL, "--set", "train.batch_size=4"]
    first = rabbit(args, env, tmp_path)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("machine: ") and "conv2d.forward" in first.stdout and "-> " in first.stdout
    stored = json.loads((tmp_path / "cache" / "tuning.json").read_text())
    assert sum(len(v) for v in stored.values()) == first.stdout.count("-> ")
    second = rabbit(args, env, tmp_path)
    assert "nothing new to measure" in second.stdout
    again = rabbit(args + ["--again"], env, tmp_path)
    assert again.stdout.count("-> ") == first.stdout.count("-> ")
