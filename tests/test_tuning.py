"""Choosing kernel variants by measuring (rabbitkit.backend.tuning)."""
import json
import pathlib
import re
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


def test_a_new_candidate_is_measured_not_ignored(tuner):
    """A choice stored among two variants does not hold once a third exists (a later
    version of a layer adds one): the shape is measured again among all three."""
    assert tuning.choose("demo", 5, {"a": lambda: time.sleep(0.002), "b": lambda: None}, default="a") == "b"
    ran = []
    three = {"a": lambda: time.sleep(0.002), "b": lambda: time.sleep(0.002), "c": lambda: ran.append("c")}
    assert tuning.choose("demo", 5, three, default="a") == "c"
    assert len(ran) == 1 + tuning.TIMED_CALLS
    assert set(json.loads(tuner.read_text())[tuning.machine_key()]["demo 5"]["seconds"]) == {"a", "b", "c"}


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
    """With two threads and a batch of two, a 3x3 Conv2D offers its five variants; all give one result."""
    import numba

    from rabbitkit.layers.conv2d import Conv2D

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs two Numba threads")
    asked = []
    real = tuning.choose

    def spy(op, shape, candidates, default, **options):
        asked.append((op, sorted(candidates)))
        return real(op, shape, candidates, default, **options)

    monkeypatch.setattr(tuning, "choose", spy)
    numba.set_num_threads(2)
    layer = Conv2D(2, 3, 3, padding=1)
    x = np.random.default_rng(0).standard_normal((2, 2, 6, 6)).astype(np.float32)
    y = layer.forward(x)
    layer.backward(np.ones_like(y))
    variants = ["banded", "per-sample", "whole-batch", "winograd", "winograd-batch"]
    assert asked == [("conv2d.forward", variants), ("conv2d.backward", variants)]
    np.testing.assert_allclose(layer.grads["bias"], np.full(3, 72.0), rtol=1e-6)  # added once, not per timing call
    choices = tuning.measured()
    assert [key.split()[0] for key, _, _ in choices] == ["conv2d.forward", "conv2d.backward"]


def test_whole_batch_lowering_is_not_offered_above_its_column_budget(tuner, monkeypatch):
    """A column matrix over the budget is never lowered, not even to time it: the
    banded variant runs (and is the default with tuning off).  The same budget holds
    the whole batch's transformed tiles of whole-batch Winograd."""
    from rabbitkit.layers.conv2d import Conv2D

    asked = []
    real = tuning.choose
    monkeypatch.setattr(tuning, "choose", lambda op, shape, candidates, default, **options: asked.append(
        (sorted(candidates), default)) or real(op, shape, candidates, default, **options))
    layer = Conv2D(2, 3, 3, padding=1)
    x = np.random.default_rng(0).standard_normal((1, 2, 9, 7)).astype(np.float32)
    layer.whole_batch_column_budget = 2 * 9 * 9 * 9 - 1  # one element short of this image's (K, Ho*Wp)
    layer.forward(x)
    tuning.set_enabled(False)
    layer.backward(np.ones((1, 3, 9, 7), np.float32))
    assert asked == [(["banded", "winograd"], "banded"), (["banded", "winograd"], "banded")]
    layer.whole_batch_column_budget = 2 * 9 * 9 * 9
    layer.forward(x)
    assert asked[-1] == (["banded", "whole-batch", "winograd"], "whole-batch")
    layer.whole_batch_column_budget = 16 * (2 + 3) * 5 * 4  # whole-batch Winograd's transformed 5 x 4 tiles
    layer.forward(x)
    assert asked[-1] == (["banded", "whole-batch", "winograd", "winograd-batch"], "whole-batch")


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
    second = rabbit(args, env, tmp_path)  # measures only the close calls again
    assert second.returncode == 0, second.stderr
    (records,) = stored.values()
    close = {key for key, record in records.items()
             if sorted(record["seconds"].values())[1] <= (1 + tuning.CLOSE_CALL) * min(record["seconds"].values())}
    again_measured = {line.split(": ", 1)[0] for line in second.stdout.splitlines() if "-> " in line}
    assert again_measured == close
    assert "nothing new to measure" in rabbit(args, env, tmp_path).stdout
    again = rabbit(args + ["--again"], env, tmp_path)
    assert again.stdout.count("-> ") == first.stdout.count("-> ")



# -- recurrent layers: rows per BLAS call of the per-step product ------------------------
RECURRENT_CELLS = [("RNN", {}), ("GRU", {}), ("LSTM", {}), ("LSTM", {"peephole": True})]
RECURRENT_IDS = ["rnn", "gru", "lstm", "lstm-peephole"]
TIME_LOOP_KERNELS = ("rnn_forward_sequence", "rnn_backward_sequence", "gru_forward_sequence",
                     "gru_backward_sequence", "lstm_forward_sequence", "lstm_backward_sequence")
BATCH = 40  # two threads: blocks of 20 rows, so 8, 16 and 20 rows per product differ


def recurrent_layer(cell, options, hidden=8, dtype=np.float32, **more):
    from rabbitkit.layers import recurrent

    return getattr(recurrent, cell)(3, hidden, num_layers=2, dtype=dtype, **options, **more)


def sequences(batch=BATCH, steps=6, dtype=np.float32):
    return np.random.default_rng(1).uniform(-1, 1, (batch, steps, 3)).astype(dtype)


def train_step(layer, x):
    """Forward and backward; (output, input gradient, final state arrays, parameter grads)."""
    layer.zero_grad()
    y = layer.forward(x, training=True)
    dx = layer.backward(np.random.default_rng(2).standard_normal(y.shape).astype(layer.dtype))
    final = layer.final_state if layer.state_arrays == 2 else (layer.final_state,)
    return y, dx, [a.copy() for a in final], {name: g.copy() for name, g in layer.grads.items()}


class KernelSpy:
    """Records every call of the recurrent time-loop kernels as (kernel, (rows per
    product, transposed)).

    After :meth:`time_with`, tuning reads a FakeClock instead of time, and each kernel
    call spends 0.5 s on it when its product plan is ``fast``, 1 s else.
    """

    def __init__(self, monkeypatch):
        from rabbitkit.layers import recurrent

        self.monkeypatch = monkeypatch
        self.calls = []
        self.clock = None
        self.fast = None
        for name in TIME_LOOP_KERNELS:
            monkeypatch.setattr(recurrent, name, self._spy(name, getattr(recurrent, name)))

    def _spy(self, name, kernel):
        def call(*args):
            plan = (args[-1], args[-3].size > 0)  # (..., swap, chunks, rows): a transposed product has scratch
            self.calls.append((name, plan))
            if self.clock is not None:
                self.clock.spend(0.5 if plan == self.fast else 1.0)
            return kernel(*args)

        return call

    def time_with(self, fast):
        self.clock = FakeClock()
        self.fast = fast
        self.monkeypatch.setattr(tuning, "time", self.clock)

    def take(self):
        calls, self.calls = self.calls, []
        return calls


@pytest.fixture
def kernels(monkeypatch):
    return KernelSpy(monkeypatch)


@pytest.fixture
def two_threads():
    import numba

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs two Numba threads")
    before = numba.get_num_threads()
    numba.set_num_threads(2)
    yield
    numba.set_num_threads(before)


@pytest.mark.parametrize("cell,options", RECURRENT_CELLS, ids=RECURRENT_IDS)
def test_recurrent_layers_measure_each_product_shape_once(cell, options, tuner, kernels, two_threads):
    """Forward and backward each time their row-block candidates, in both orientations,
    on the first use of a shape (both stacked layers share it), run the fastest, and
    reuse the choice after, in this process and the next."""
    layer = recurrent_layer(cell, options)
    assert layer._row_block_candidates(BATCH) == sorted({layer._split(BATCH)[1], 8, 16, 20})
    candidates = layer._product_candidates(BATCH)
    assert sorted(candidates.values()) == sorted((rows, transposed) for rows in layer._row_block_candidates(BATCH)
                                                 for transposed in (False, True))
    fast = (16, True)  # never the rule's choice: 8 or 20 rows, direct
    kernels.time_with(fast)
    train_step(layer, sequences())
    calls = kernels.take()
    forward, backward = sorted({name for name, _ in calls}, key=lambda name: "backward" in name)
    timed = len(candidates) * (1 + tuning.TIMED_CALLS)
    assert [name for name, _ in calls] == [forward] * (timed + 2) + [backward] * (timed + 2)
    assert sorted({plan for _, plan in calls[:timed]}) == sorted(candidates.values())
    assert [plan for _, plan in calls[timed:timed + 2]] == [fast, fast]  # the real runs of layers 0 and 1
    assert [plan for _, plan in calls[-2:]] == [fast, fast]
    op = cell.lower()
    width = layer.gates * 8
    shape = f"({BATCH}, 8, {width}, 'float32', '2 threads')"
    assert [(key, choice) for key, choice, _ in tuning.measured()] == [
        (f"{op}.forward {shape}", "16 rows transposed"), (f"{op}.backward {shape}", "16 rows transposed")]
    for _ in range(2):  # known now, then read back from the cache file
        train_step(layer, sequences())
        assert kernels.take() == [(forward, fast)] * 2 + [(backward, fast)] * 2
        tuning.forget()
    stored = json.loads(tuner.read_text())[tuning.machine_key()]
    assert stored[f"{op}.forward {shape}"]["choice"] == "16 rows transposed"


def test_recurrent_tuning_off_runs_the_built_in_rule(tuner, kernels):
    tuning.set_enabled(False)
    layer = recurrent_layer("LSTM", {})
    train_step(layer, sequences())
    rule = layer._split(BATCH)[1]
    direct = (rule, False)
    assert kernels.take() == [("lstm_forward_sequence", direct)] * 2 + [("lstm_backward_sequence", direct)] * 2
    assert not tuner.exists()


@pytest.mark.parametrize("cell,options", RECURRENT_CELLS, ids=RECURRENT_IDS)
def test_every_row_block_gives_the_defaults_numbers_within_float32_rounding(cell, options, tuner):
    """Hidden 128: 16 or 20 rows of an LSTM's 128 x 512 product exceed OpenBLAS's
    unpacked-product limit and take its packed kernels, 8 rows do not."""
    tuning.set_enabled(False)
    layer = recurrent_layer(cell, options, hidden=128)
    x = sequences(steps=12)
    default = train_step(layer, x)
    candidates = layer._product_candidates(BATCH)
    assert len(candidates) >= 6
    for rows, transposed in candidates.values():
        layer.row_block, layer.transposed_product = rows, transposed
        y, dx, final, grads = train_step(layer, x)
        for got, want in [(y, default[0]), (dx, default[1]), *zip(final, default[2]),
                          *((grads[name], default[3][name]) for name in grads)]:
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_measuring_leaves_the_layer_as_a_forced_run_would(tuner, kernels, two_threads):
    """The trial runs touch no state, gradient or random number of the layer: a measured
    run is bit for bit the run with the chosen rows forced (dropout and a carried state
    included)."""
    measured = recurrent_layer("LSTM", {}, dropout=0.3, stateful=True)
    forced = recurrent_layer("LSTM", {}, dropout=0.3, stateful=True)
    forced.load_state_dict(measured.state_dict())
    forced.rng.bit_generator.state = measured.rng.bit_generator.state
    forced.row_block, forced.transposed_product = 16, True
    kernels.time_with((16, True))
    for _ in range(2):  # the second step starts from the carried state
        got, want = train_step(measured, sequences()), train_step(forced, sequences())
        for a, b in [*zip(got[:2], want[:2]), *zip(got[2], want[2])]:
            np.testing.assert_array_equal(a, b)
        for name in got[3]:
            np.testing.assert_array_equal(got[3][name], want[3][name])
    assert len(tuning.measured()) == 2
    assert measured.rng.bit_generator.state == forced.rng.bit_generator.state


def test_the_recurrent_key_names_batch_hidden_width_dtype_and_threads(tuner, kernels, two_threads):
    import numba

    kernels.time_with((8, False))
    recurrent_layer("GRU", {}).forward(sequences())
    recurrent_layer("GRU", {}).forward(sequences(batch=24))
    recurrent_layer("GRU", {}, hidden=16).forward(sequences())
    recurrent_layer("GRU", {}, dtype=np.float64).forward(sequences(dtype=np.float64))
    recurrent_layer("GRU", {}).forward(sequences())  # known: measured before
    try:
        numba.set_num_threads(1)  # another machine key; one block of 40 rows
        recurrent_layer("GRU", {}).forward(sequences())
    finally:
        numba.set_num_threads(2)
    assert [key for key, _, _ in tuning.measured()] == [
        "gru.forward (40, 8, 24, 'float32', '2 threads')",
        "gru.forward (24, 8, 24, 'float32', '2 threads')",
        "gru.forward (40, 16, 48, 'float32', '2 threads')",
        "gru.forward (40, 8, 24, 'float64', '2 threads')",
        "gru.forward (40, 8, 24, 'float32', '1 threads')",
    ]
    stored = json.loads(tuner.read_text())
    assert sorted(len(choices) for choices in stored.values()) == [1, 4]  # one thread / two threads


def test_rabbit_tune_measures_char_rnns_recurrent_shapes(tmp_path):
    """End to end on the char-rnn experiment with a small corpus and a small LSTM."""
    import os

    from test_main_job import rabbit

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("To be, or not to be: that is the question.\n" * 40, encoding="utf-8")
    root = pathlib.Path(__file__).resolve().parents[1]
    # This checkout's rabbitkit, not whichever one is installed (a git worktree's tests).
    path = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, RABBIT_CACHE=str(tmp_path / "cache"), RABBIT_TUNE="0", NUMBA_NUM_THREADS="2",
               PYTHONPATH=path)
    experiment = root / "experiments" / "char_rnn.toml"
    args = ["tune", experiment, "--set", f"data.path=\"{corpus}\"", "--set", "model.hidden_size=16",
            "--set", "train.batch_size=24", "--set", "train.seq_len=8"]  # 2 threads: blocks of 12 rows
    done = rabbit(args, env, tmp_path)
    assert done.returncode == 0, done.stderr
    shape = "(24, 16, 64, 'float32', '2 threads')"
    for direction in ("forward", "backward"):
        assert f"lstm.{direction} {shape}: " in done.stdout
    stored = json.loads((tmp_path / "cache" / "tuning.json").read_text())
    assert sum(len(v) for v in stored.values()) == done.stdout.count("-> ")
    rabbit(args, env, tmp_path)  # the close calls' second round
    assert "nothing new to measure" in rabbit(args, env, tmp_path).stdout


def test_a_close_call_is_measured_once_more_by_the_next_process(tuner):
    """A runner-up within CLOSE_CALL of the winner is timed again by the next process
    (not by the one that measured it), each candidate keeping its best time of both
    rounds; after MEASURING_ROUNDS the choice holds.  A clear call holds at once."""
    tuner.write_text(json.dumps({tuning.machine_key(): {
        "demo 1": {"choice": "a", "seconds": {"a": 1.0, "b": 1.0 + tuning.CLOSE_CALL / 2}},
        "demo 2": {"choice": "a", "seconds": {"a": 1.0, "b": 2.0}},
    }}))
    tuning.forget()
    ran = []
    candidates = {"a": lambda: (ran.append("a"), time.sleep(0.003)), "b": lambda: ran.append("b")}
    assert tuning.choose("demo", 2, candidates, default="a") == "a" and ran == []  # clear: no measuring
    assert tuning.choose("demo", 1, candidates, default="a") == "b"  # close: measured again, b now wins
    assert ran.count("a") == ran.count("b") == 1 + tuning.TIMED_CALLS
    record = json.loads(tuner.read_text())[tuning.machine_key()]["demo 1"]
    assert record["rounds"] == 2 and record["choice"] == "b"
    assert 0.003 <= record["seconds"]["a"] < 1.0 and record["seconds"]["b"] < 0.003  # the best of both rounds
    tuning.forget()
    ran.clear()
    assert tuning.choose("demo", 1, candidates, default="a") == "b" and ran == []  # rounds done: it holds


def test_a_close_call_is_not_measured_twice_by_one_process(tuner, monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(tuning.time, "perf_counter", lambda: clock[0])
    ran = []

    def taking(name, seconds):
        def call():
            ran.append(name)
            clock[0] += seconds
        return call

    candidates = {"a": taking("a", 1.0), "b": taking("b", 1.0 + tuning.CLOSE_CALL / 2)}
    assert tuning.choose("demo", 3, candidates, default="b") == "a"
    assert len(ran) == 2 * (1 + tuning.TIMED_CALLS)
    assert tuning.choose("demo", 3, candidates, default="b") == "a"
    assert len(ran) == 2 * (1 + tuning.TIMED_CALLS)  # a close call, but this process measured it already


def test_release_runs_once_after_a_measurement_only(tuner):
    released = []
    candidates = {"a": lambda: None, "b": lambda: None}
    tuning.choose("demo.release", (1,), candidates, default="a", release=lambda: released.append(1))
    assert released == [1]
    tuning.choose("demo.release", (1,), candidates, default="a", release=lambda: released.append(1))
    assert released == [1]  # a known choice measures nothing and frees nothing


def test_a_measured_conv2d_keeps_only_its_choices_scratch(tuner):
    """The variants that lost leave no scratch behind: after the measured forward pass
    the workspace holds what the chosen variant alone allocates."""
    from rabbitkit.layers import _conv_lowering
    from rabbitkit.layers.conv2d import Conv2D

    layer = Conv2D(4, 5, 3, padding=1)
    x = np.random.default_rng(0).standard_normal((1, 4, 20, 17)).astype(np.float32)
    _conv_lowering.release_scratch()
    layer.forward(x)
    ((_, choice, seconds),) = tuning.measured()
    assert len(seconds) > 1
    measured_bytes = _conv_lowering.scratch_bytes()
    _conv_lowering.release_scratch()
    layer.algorithm = choice
    layer.forward(x)
    assert measured_bytes == _conv_lowering.scratch_bytes() > 0


def test_choices_of_older_kernels_are_measured_again(tuner, monkeypatch):
    """The machine key names the kernels' generation: after a kernel change raises it,
    the stored choices (measured among the old kernels) no longer apply."""
    ran = []
    candidates = {"a": lambda: ran.append("a") or time.sleep(0.002), "b": lambda: ran.append("b")}  # no close call
    tuning.choose("demo.kernels", 1, candidates, default="a")
    measured_once = len(ran)
    tuning.forget()
    tuning.choose("demo.kernels", 1, candidates, default="a")
    assert len(ran) == measured_once  # stored, same kernels
    monkeypatch.setattr(tuning, "KERNELS", tuning.KERNELS + 1)
    tuning.forget()
    tuning.choose("demo.kernels", 1, candidates, default="a")
    assert len(ran) == 2 * measured_once
    assert len(json.loads(tuner.read_text())) == 2  # one machine key per generation


# -- a run keeps its choices --------------------------------------------------------------
def conv_experiment(folder, epochs):
    return {
        "experiment": {"name": "tuned", "seed": 3, "tune": True},
        "data": {"dataset": "image_folder", "path": str(folder), "image_size": 10, "val_fraction": 0.2,
                 "cache": False, "preprocess": ["scale", "standardize"]},
        "model": {"layers": [{"type": "Conv2D", "out_channels": 8, "kernel_size": 3, "padding": 1}, {"type": "ReLU"},
                             {"type": "Conv2D", "out_channels": 8, "kernel_size": 3, "padding": 1}, {"type": "ReLU"},
                             {"type": "Flatten"}, {"type": "Dense", "out_features": 2}]},
        "train": {"epochs": epochs, "batch_size": 4, "lr": 0.05, "schedule": "constant"},
        "output": {"visualizers": []},
    }


def cache_changes_its_mind(tuner, chosen):
    """Rewrite the tuning cache to name, for every shape of ``chosen``, another candidate,
    settled for good (as a close call measured again could); its records."""
    stored = json.loads(tuner.read_text())
    (records,) = stored.values()
    for key, record in records.items():
        if key in chosen:
            record["choice"] = next(name for name in sorted(record["seconds"]) if name != chosen[key])
            record["rounds"] = tuning.MEASURING_ROUNDS
    tuner.write_text(json.dumps(stored))
    tuning.forget()
    return records


def test_a_resumed_run_keeps_the_kernel_choices_it_started_with(tuner, tmp_path, monkeypatch):
    """The checkpoints keep the variants a run chose; resumed after the cache changed
    its mind (a close call measured again, a new generation of kernels), the run takes
    the same variants again and ends as the uninterrupted run did, bit for bit."""
    monkeypatch.setenv("RABBIT_TUNE", "1")  # runs follow it (tests turn it off, see conftest)
    import rabbitkit
    from rabbitkit.train import api, checkpoint

    from test_pretrained import make_image_folder
    from test_trainer import history_without_timing

    folder = make_image_folder(tmp_path / "images", count=6)
    reference = rabbitkit.run(conv_experiment(folder, 3), out=tmp_path / "runs", quiet=True)
    _, metadata = checkpoint.load(reference.run_dir / "checkpoints" / "last.safetensors")
    chosen = metadata["kernel_choices"]
    assert chosen and all(key.startswith("conv2d.") for key in chosen)
    short = rabbitkit.run(conv_experiment(folder, 1), out=tmp_path / "runs", quiet=True)
    # The cache now names another candidate for every shape the run met.
    records = cache_changes_its_mind(tuner, chosen)
    assert tuning.known_choices()[next(iter(chosen))]["choice"] != chosen[next(iter(chosen))]
    extended = api.resume(short.run_dir, quiet=True, epochs=3)
    assert tuning.used() == chosen
    _, metadata = checkpoint.load(extended.run_dir / "checkpoints" / "last.safetensors")
    assert metadata["kernel_choices"] == chosen
    assert history_without_timing(extended.history) == history_without_timing(reference.history)
    # A fresh run takes the cache's choices again: the pins were the resumed run's only.
    rabbitkit.run(conv_experiment(folder, 1), out=tmp_path / "runs", quiet=True)
    assert all(tuning.used()[key] == records[key]["choice"] for key in chosen)


def test_a_checkpoint_with_damaged_kernel_choices_is_refused_in_one_line(tuner, tmp_path):
    import rabbitkit
    from rabbitkit.errors import CheckpointError
    from rabbitkit.train import api, checkpoint

    from test_pretrained import make_image_folder

    folder = make_image_folder(tmp_path / "images", count=6)
    run = rabbitkit.run(conv_experiment(folder, 1), out=tmp_path / "runs", quiet=True)
    path = run.run_dir / "checkpoints" / "last.safetensors"
    groups, metadata = checkpoint.load(path)
    metadata["kernel_choices"] = ["banded"]
    checkpoint.save(path, groups, metadata)
    with pytest.raises(CheckpointError, match=r"last.safetensors: 'kernel_choices' must map kernel shapes to "
                                              r"variant names, got \['banded'\]"):
        api.resume(run.run_dir, quiet=True, epochs=2)


def test_a_pinned_choice_is_taken_unmeasured_even_with_tuning_off(tuner):
    measured = []
    candidates = {"plain": lambda: measured.append("plain"), "fancy": lambda: measured.append("fancy")}
    tuning.start_run(pinned={"op.pinned (3, 5)": "fancy", "op.gone (1,)": "plain"})
    tuning.set_enabled(False)
    assert tuning.choose("op.pinned", (3, 5), candidates, default="plain") == "fancy"
    assert tuning.choose("op.other", (3, 5), candidates, default="plain") == "plain"
    tuning.set_enabled(True)
    # A pin naming no candidate of the shape (another version's variant) is not taken.
    tuning.start_run(pinned={"op.pinned (3, 5)": "retired"})
    assert tuning.choose("op.pinned", (3, 5), candidates, default="plain") in candidates
    assert measured and tuning.used()["op.pinned (3, 5)"] in candidates
    assert measured.count("plain") == measured.count("fancy") == 1 + tuning.TIMED_CALLS


def test_a_fresh_run_given_another_runs_folder_takes_its_kernel_choices_and_repeats_it(tuner, tmp_path,
                                                                                       monkeypatch):
    """`experiment.kernel_choices = RUN`: the variants RUN chose, whatever the cache says
    now, so the same seed on the same machine gives RUN's history bit for bit."""
    monkeypatch.setenv("RABBIT_TUNE", "1")
    import rabbitkit
    from rabbitkit.train import api, checkpoint, evaluate

    from test_pretrained import make_image_folder
    from test_trainer import history_without_timing

    folder = make_image_folder(tmp_path / "images", count=6)
    reference = rabbitkit.run(conv_experiment(folder, 2), out=tmp_path / "runs", quiet=True)
    chosen = json.loads((reference.run_dir / tuning.CHOICES_FILE).read_text())
    assert chosen and chosen == tuning.used()
    # The last checkpoint's choices are the training's; the folder's file adds the test's shapes.
    _, metadata = checkpoint.load(reference.run_dir / "checkpoints" / "last.safetensors")
    assert metadata["kernel_choices"].items() <= chosen.items()
    records = cache_changes_its_mind(tuner, chosen)
    # Without the key a fresh run follows the cache ...
    rabbitkit.run(conv_experiment(folder, 1), out=tmp_path / "runs", quiet=True)
    assert all(tuning.used()[key] == records[key]["choice"] != chosen[key] for key in chosen)
    # ... with it, the reference run's variants and its history, from the folder or the file,
    # and with tuning off too (the choices are replayed, not measured).
    for source, tune in ((reference.run_dir, True), (reference.run_dir / tuning.CHOICES_FILE, False)):
        config = conv_experiment(folder, 2)
        config["experiment"].update(kernel_choices=str(source), tune=tune)
        replay = rabbitkit.run(config, out=tmp_path / "runs", quiet=True)
        assert tuning.used() == chosen
        assert json.loads((replay.run_dir / tuning.CHOICES_FILE).read_text()) == chosen
        assert history_without_timing(replay.history) == history_without_timing(reference.history)
    # Resuming a replaying run needs its own checkpoint only, not the run it replayed.
    config = conv_experiment(folder, 1)
    config["experiment"]["kernel_choices"] = str(reference.run_dir)
    short = rabbitkit.run(config, out=tmp_path / "runs", quiet=True)
    (reference.run_dir / tuning.CHOICES_FILE).unlink()
    extended = api.resume(short.run_dir, quiet=True, epochs=2)
    assert tuning.used() == chosen
    assert history_without_timing(extended.history) == history_without_timing(reference.history)
    assert f"kernel_choices = {json.dumps(str(reference.run_dir))}" in (short.run_dir / "config.toml").read_text()
    # Evaluating it later takes its own kept choices, not the gone run's.
    evaluate.load_run(short.run_dir)
    assert tuning.used() == json.loads((short.run_dir / tuning.CHOICES_FILE).read_text())


@pytest.mark.parametrize("content, expected", [
    (None, r"no such file \(kernel choices: a run's folder, which holds kernel_choices.json, or such a file\)"),
    ("{not json", r"not a kernel-choices JSON file \(Expecting property name"),
    ('{"conv2d.forward (1, 2)": 3}', (r"kernel choices must be a JSON object of kernel shapes to variant names, "
                                      r'got \{"conv2d.forward \(1, 2\)": 3\}')),
    ('["banded"]', r'must be a JSON object .*got \["banded"\]'),
])
def test_kernel_choices_that_cannot_be_read_are_refused_in_one_line_naming_the_file(tmp_path, content, expected):
    from rabbitkit.cli import main

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    if content is not None:
        (run_dir / tuning.CHOICES_FILE).write_text(content)
    experiment = tmp_path / "exp.toml"
    experiment.write_text('[experiment]\nname = "x"\n[data]\ndataset = "function1d"\n[model]\narchitecture = "mlp"\n'
                          '[train]\nepochs = 1\n[output]\nvisualizers = []\n')
    from click.testing import CliRunner

    result = CliRunner().invoke(main, ["run", str(experiment), "--set", f"experiment.kernel_choices={run_dir}",
                                       "--out", str(tmp_path / "runs")])
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and str(run_dir / tuning.CHOICES_FILE) in lines[0], result.output
    assert re.search(expected, lines[0]), lines[0]
