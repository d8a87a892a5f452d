"""Runs: resume equality, Ctrl-C, SIGKILL, atomic checkpoints, divergence, devices, hooks."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import rabbitkit
from rabbitkit.errors import CheckpointError
from rabbitkit.train import api, checkpoint
from rabbitkit.train.trainer import DivergenceError

EXPERIMENT = {
    "experiment": {"name": "t", "seed": 7},
    "data": {"dataset": "function1d", "n_train": 96, "n_val": 32, "n_test": 32, "noise": 0.1},
    "model": {"architecture": "mlp", "hidden": [12, 12], "activation": "Tanh", "dropout": 0.2},
    "init": {"default": "xavier_uniform"},
    "train": {"epochs": 4, "batch_size": 16, "optimizer": {"name": "sgd", "momentum": 0.9}, "lr": 0.05,
              "schedule": {"name": "cosine"}, "l2": 1e-4},
    "output": {"visualizers": []},
}


def history_without_timing(history):
    drop = ("samples_per_s", "epoch_seconds", "wall_seconds")
    return [{k: v for k, v in row.items() if k not in drop} for row in history]


def run(tmp_path, overrides=None, **kwargs):
    return rabbitkit.run(EXPERIMENT, overrides, out=tmp_path / "runs", quiet=True, **kwargs)


def test_same_seed_same_metrics(tmp_path):
    first = run(tmp_path)
    second = run(tmp_path)
    assert first.run_dir != second.run_dir
    assert history_without_timing(first.history) == history_without_timing(second.history)
    assert first.history[-1]["train_loss"] < first.history[0]["train_loss"]
    other_seed = run(tmp_path, {"experiment.seed": 8})
    assert history_without_timing(other_seed.history) != history_without_timing(first.history)


class InterruptAtStep:
    """A plugin that presses Ctrl-C (sends SIGINT to this process) during a given step."""

    def __init__(self, step):
        self.step = step

    @rabbitkit.hookimpl
    def rabbit_train_start(self, run):
        original = run._train_step

        def step_then_interrupt(xb, yb):
            result = original(xb, yb)
            if run.step + 1 == self.step:
                os.kill(os.getpid(), signal.SIGINT)
            return result

        run._train_step = step_then_interrupt


def test_ctrl_c_saves_mid_epoch_and_resume_equals_uninterrupted(tmp_path):
    reference = run(tmp_path)
    manager = rabbitkit.plugins.get_manager()
    plugin = InterruptAtStep(step=9)  # epoch 2 of 4 (6 steps per epoch), batch 3
    manager.register(plugin, name="interrupter")
    try:
        interrupted = run(tmp_path)
    finally:
        manager.unregister(plugin)
    assert interrupted.stopped == "interrupted"
    assert len(interrupted.history) == 1
    _, metadata = checkpoint.load(interrupted.run_dir / "checkpoints" / "last.safetensors")
    assert metadata["position"]["batch"] == 2 and metadata["epoch"] == 1
    resumed = api.resume(interrupted.run_dir, quiet=True)
    assert resumed.stopped == "completed"
    assert history_without_timing(resumed.history) == history_without_timing(reference.history)
    assert resumed.metrics["test_loss"] == reference.metrics["test_loss"]
    rows = (interrupted.run_dir / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + 4


def test_resume_extends_a_finished_run_like_a_longer_run(tmp_path):
    constant = {"train.schedule": "constant"}
    long_run = run(tmp_path, dict(constant, **{"train.epochs": 5}))
    short = run(tmp_path, dict(constant, **{"train.epochs": 3}))
    extended = api.resume(short.run_dir, quiet=True, epochs=5)
    assert history_without_timing(extended.history) == history_without_timing(long_run.history)


def test_resume_with_multipliers_equals_the_uninterrupted_run(tmp_path):
    # Multipliers live in the configuration (config.toml), not in the checkpoint: a resumed
    # run must read them back and continue exactly.
    multipliers = {"train.schedule": "constant", "train.lr_mult": {"0": 0.1, "*.bias": 3.0}}
    long_run = run(tmp_path, dict(multipliers, **{"train.epochs": 4}))
    short = run(tmp_path, dict(multipliers, **{"train.epochs": 2}))
    extended = api.resume(short.run_dir, quiet=True, epochs=4)
    assert history_without_timing(extended.history) == history_without_timing(long_run.history)
    without = run(tmp_path, {"train.schedule": "constant", "train.epochs": 4})
    assert without.history[-1]["train_loss"] != long_run.history[-1]["train_loss"]  # they did change the run


LR_MULT_EXPERIMENT = """
[experiment]
name = "lr_mult"
seed = 3
[data]
dataset = "function1d"
n_train = 64
n_val = 16
n_test = 16
[model]
architecture = "mlp"
hidden = [8, 8]
activation = "Tanh"
[train]
epochs = 2
batch_size = 16
optimizer = { name = "sgd", momentum = 0.9 }
lr = 0.05
weight_decay = 0.01
lr_mult = { "0" = 0.0, "4.bias" = 0.5 }   # the first layer held still, as Caffe's lr_mult = 0
decay_mult = { "2" = 0.0 }
[output]
visualizers = []
"""


def test_lr_mult_from_toml_holds_a_layer_still_and_is_logged(tmp_path):
    path = tmp_path / "lr_mult.toml"
    path.write_text(LR_MULT_EXPERIMENT)
    initial = {}

    class InitialWeights:
        @rabbitkit.hookimpl
        def rabbit_train_start(self, run):
            initial.update(run.model.state_dict())

    manager = rabbitkit.plugins.get_manager()
    plugin = InitialWeights()
    manager.register(plugin, name="initial-weights")
    try:
        result = rabbitkit.run(path, out=tmp_path / "runs", quiet=True)
    finally:
        manager.unregister(plugin)
    groups, _ = checkpoint.load(result.run_dir / "checkpoints" / "last.safetensors")
    final = groups["model"]
    assert sorted(final) == ["0.bias", "0.weight", "2.bias", "2.weight", "4.bias", "4.weight"]
    for name in ("0.weight", "0.bias"):
        np.testing.assert_array_equal(final[name], initial[name], err_msg=name)
    for name in ("2.weight", "4.weight", "4.bias"):
        assert np.abs(final[name] - initial[name]).max() > 1e-4, name
    log = (result.run_dir / "log.txt").read_text().splitlines()
    assert log[1].endswith("lr_mult 0 on 2 of 6 parameters, 0.5 on 1 of 6 parameters; decay_mult 0 on 1 of 3 weights")


SCRIPT = textwrap.dedent("""
    import json, sys, rabbitkit
    experiment = json.loads(sys.argv[1])
    rabbitkit.run(experiment, out=sys.argv[2], quiet=True)
""")


def test_sigkill_resumes_from_last_good_checkpoint(tmp_path):
    slow = dict(EXPERIMENT, train=dict(EXPERIMENT["train"], epochs=40, schedule="constant"))
    process = subprocess.Popen([sys.executable, "-c", SCRIPT, json.dumps(slow), str(tmp_path / "runs")])
    deadline = time.time() + 120
    last = None
    while time.time() < deadline:
        found = list((tmp_path / "runs").glob("*/checkpoints/last.safetensors"))
        if found:
            last = found[0]
            _, meta = checkpoint.load(last)
            if meta["epoch"] >= 2:
                break
        time.sleep(0.05)
    process.kill()
    process.wait()
    assert last is not None, "no checkpoint appeared"
    run_dir = last.parents[1]
    _, meta = checkpoint.load(last)
    assert meta["epoch"] < 40
    resumed = api.resume(run_dir, quiet=True)
    reference = rabbitkit.run(slow, out=tmp_path / "ref", quiet=True)
    assert history_without_timing(resumed.history) == history_without_timing(reference.history)


def test_crash_during_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    result = run(tmp_path, {"train.epochs": 2})
    last = result.run_dir / "checkpoints" / "last.safetensors"
    before = last.read_bytes()
    import safetensors.numpy

    def dying_save(tensors, filename, metadata=None):
        pathlib.Path(filename).write_bytes(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", dying_save)
    with pytest.raises(OSError):
        checkpoint.save(last, {"model": {"w": np.zeros(3, np.float32)}}, {"epoch": 99})
    assert last.read_bytes() == before
    assert not [p for p in last.parent.iterdir() if p.name.startswith(".")]
    groups, meta = checkpoint.load(last)
    assert meta["epoch"] == 2 and "0.weight" in groups["model"] or "1.weight" in groups["model"]


def test_corrupt_checkpoint_is_one_clear_error(tmp_path):
    result = run(tmp_path, {"train.epochs": 1})
    last = result.run_dir / "checkpoints" / "last.safetensors"
    last.write_bytes(last.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="last.safetensors: not a readable safetensors checkpoint"):
        api.resume(result.run_dir, quiet=True)
    done = subprocess.run([sys.executable, "-m", "rabbitkit.cli", "resume", str(result.run_dir)],
                          capture_output=True, text=True)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    assert "last.safetensors" in done.stderr and "Traceback" not in done.stderr


class NaNAtStep:
    """A plugin that makes the loss NaN at a given step (divergence, on cue)."""

    def __init__(self, step):
        self.step = step

    @rabbitkit.hookimpl
    def rabbit_train_start(self, run):
        original = run.loss.forward

        def forward(out, yb):
            value = original(out, yb)
            return float("nan") if run.step + 1 == self.step else value

        run.loss.forward = forward


def run_with_nan_at(tmp_path, step, overrides=None):
    manager = rabbitkit.plugins.get_manager()
    plugin = NaNAtStep(step)
    manager.register(plugin, name="nan-maker")
    try:
        with pytest.raises(DivergenceError) as err:
            run(tmp_path, overrides)
    finally:
        manager.unregister(plugin)
    return err.value


def test_divergence_names_the_last_good_checkpoint_which_exists(tmp_path):
    err = run_with_nan_at(tmp_path, step=15)  # epoch 3 (6 steps per epoch)
    message = str(err)
    assert message.startswith("loss is nan at epoch 3, step 15; the last good checkpoint is ")
    named = pathlib.Path(message.rsplit(" ", 1)[1])
    assert named.is_file() and named == err.run_dir / "checkpoints" / "last.safetensors"
    _, metadata = checkpoint.load(named)
    assert metadata["epoch"] == 2
    assert f"stopped: {message}" in (err.run_dir / "log.txt").read_text()


def test_nan_in_the_first_epoch_says_there_is_no_checkpoint(tmp_path):
    err = run_with_nan_at(tmp_path, step=3)
    assert str(err) == "loss is nan at epoch 1, step 3; no checkpoint was written before it (nothing to resume)"
    assert not list((err.run_dir / "checkpoints").iterdir())
    assert json.loads((err.run_dir / "status.json").read_text())["state"] == "diverged"


def test_real_divergence_with_a_huge_learning_rate(tmp_path):
    with pytest.raises(DivergenceError, match="loss is (nan|inf|[0-9.e+]+ at epoch 1, more than)"):
        run(tmp_path, {"train.lr": 1e6, "train.epochs": 5, "model.activation": "ReLU",
                       "train.optimizer": {"name": "sgd"}, "model.dropout": 0.0})
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert "stopped: loss is" in (run_dir / "log.txt").read_text()


SINE_LR_1E9 = textwrap.dedent("""
    [data]
    dataset = "function1d"
    n_train = 64
    n_val = 32
    n_test = 32
    [model]
    architecture = "mlp"
    hidden = [16]
    activation = "Tanh"
    [train]
    epochs = 3
    batch_size = 16
    optimizer = "adam"
    lr = 1e9
    [output]
    visualizers = []
""")


def test_finite_divergence_is_caught_and_said_once(tmp_path):
    """The sine demo at lr=1e9 reaches a loss of ~1e20 without NaN: caught after epoch 1."""
    experiment = tmp_path / "sine.toml"
    experiment.write_text(SINE_LR_1E9)
    done = subprocess.run([sys.executable, "-m", "rabbitkit.cli", "run", str(experiment), "--out",
                           str(tmp_path / "runs")], capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.count("loss is") == 1 and "stopped" not in done.stdout + done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert "at epoch 1, more than train.divergence_factor = 1000 times the first step's" in line
    assert line.endswith("no checkpoint was written before it (nothing to resume)")


def test_divergence_factor_0_turns_the_rule_off(tmp_path):
    result = rabbitkit.run(tomllib_loads(SINE_LR_1E9), {"train.divergence_factor": 0.0}, out=tmp_path, quiet=True)
    assert result.stopped == "completed" and result.history[-1]["train_loss"] > 1e6


def test_divergence_factor_must_exceed_1(tmp_path):
    from rabbitkit.errors import ConfigError

    with pytest.raises(ConfigError, match="train.divergence_factor: expected 0 \\(off\\) or a multiple > 1, got 0.5"):
        rabbitkit.run(tomllib_loads(SINE_LR_1E9), {"train.divergence_factor": 0.5}, out=tmp_path, quiet=True)


def tomllib_loads(text):
    try:
        import tomllib
    except ModuleNotFoundError:
        import tomli as tomllib
    return tomllib.loads(text)


def test_lifecycle_hooks_fire(tmp_path):
    calls = []

    class Recorder:
        @rabbitkit.hookimpl
        def rabbit_train_start(self, run):
            calls.append(("start", run.config["experiment"]["name"]))

        @rabbitkit.hookimpl
        def rabbit_epoch_end(self, run, epoch, metrics):
            calls.append(("epoch", epoch, round(metrics["train_loss"], 12)))

        @rabbitkit.hookimpl
        def rabbit_train_end(self, run, result):
            calls.append(("end", result.stopped))

    manager = rabbitkit.plugins.get_manager()
    plugin = Recorder()
    manager.register(plugin, name="recorder")
    try:
        result = run(tmp_path, {"train.epochs": 2})
    finally:
        manager.unregister(plugin)
    assert calls[0] == ("start", "t") and calls[-1] == ("end", "completed")
    assert [c[1] for c in calls if c[0] == "epoch"] == [1, 2]
    assert calls[1][2] == round(result.history[0]["train_loss"], 12)


def test_early_stopping(tmp_path):
    result = run(tmp_path, {"train.epochs": 50, "train.lr": 1e-9, "train.schedule": "constant",
                            "train.early_stopping": {"patience": 2, "min_delta": 1.0}})
    assert result.stopped == "early_stopping"
    assert len(result.history) == 3


def test_trained_on_cuda_evaluated_on_cpu_and_back(tmp_path):
    tiny = {"data.n_train": 16, "data.n_val": 8, "data.n_test": 8, "model.hidden": [4], "model.dropout": 0.0,
            "train.epochs": 1, "train.batch_size": 8}
    on_cuda = run(tmp_path, dict(tiny, **{"experiment.device": "cuda"}))
    on_cpu = run(tmp_path, tiny)
    # the same seed gives the same training on both devices, up to float32 rounding
    assert on_cuda.history[0]["train_loss"] == pytest.approx(on_cpu.history[0]["train_loss"], rel=1e-4)
    from rabbitkit.train.evaluate import load_run

    cuda_model_on_cpu = load_run(on_cuda.run_dir, which="last", device="cpu")
    assert all(layer.device == "cpu" for layer in cuda_model_on_cpu.model.layers)
    assert cuda_model_on_cpu.evaluate("test")["loss"] == pytest.approx(on_cuda.metrics["test_loss"], rel=1e-4)
    cpu_model_on_cuda = load_run(on_cpu.run_dir, which="last", device="cuda")
    assert all(layer.device == "cuda" for layer in cpu_model_on_cuda.model.layers)
    assert cpu_model_on_cuda.evaluate("test")["loss"] == pytest.approx(on_cpu.metrics["test_loss"], rel=1e-4)
