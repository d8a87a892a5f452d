"""The TensorBoard logger: off by default; on, its event files read back with TensorBoard's own reader."""
import pytest

import rabbitkit
from rabbitkit.train import api

pytest.importorskip("tensorboardX")
event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

EXPERIMENT = {
    "data": {"dataset": "function1d", "n_train": 32, "n_val": 16, "n_test": 16},
    "model": {"architecture": "mlp", "hidden": [4]},
    "train": {"epochs": 3, "batch_size": 16},
    "output": {"visualizers": []},
}


def scalars(run_dir):
    reader = event_accumulator.EventAccumulator(str(run_dir))
    reader.Reload()
    return {tag: [(e.step, e.value) for e in reader.Scalars(tag)] for tag in reader.Tags()["scalars"]}


def test_off_unless_configured(tmp_path):
    result = rabbitkit.run(EXPERIMENT, out=tmp_path, quiet=True)
    assert not list(result.run_dir.glob("events.out.tfevents.*"))


def test_every_epoch_metric_and_the_test_metrics_are_logged(tmp_path):
    result = rabbitkit.run(EXPERIMENT, {"output.tensorboard": True}, out=tmp_path, quiet=True)
    logged = scalars(result.run_dir)
    for metric in ("train_loss", "val_loss", "lr", "samples_per_s"):
        assert [step for step, _ in logged[metric]] == [1, 2, 3]
        assert [value for _, value in logged[metric]] == pytest.approx([h[metric] for h in result.history],
                                                                         rel=1e-6)  # float32 in the file
    assert logged["test_loss"] == [(3, pytest.approx(result.metrics["test_loss"], rel=1e-6))]


def test_a_resumed_run_does_not_log_replayed_epochs_twice(tmp_path):
    short = rabbitkit.run(EXPERIMENT, {"output.tensorboard": True, "train.epochs": 2}, out=tmp_path, quiet=True)
    resumed = api.resume(short.run_dir, quiet=True, epochs=4)
    steps = [step for step, _ in scalars(resumed.run_dir)["train_loss"]]
    assert steps == [1, 2, 3, 4]
