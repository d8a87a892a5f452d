"""Fine-tuning from TOML: [model] weights and strict, a new head, [train] freeze."""
import numpy as np
import pytest

import rabbitkit
from rabbitkit.errors import CheckpointError, ConfigError
from rabbitkit.train import checkpoint
from rabbitkit.train.trainer import BEST, LAST

from test_pretrained import make_image_folder


def experiment(folder, classes, **model):
    return {
        "experiment": {"name": "ft", "seed": 1},
        "data": {"dataset": "image_folder", "path": str(folder), "image_size": 8, "val_fraction": 0.2,
                 "cache": False, "preprocess": ["scale", "standardize"]},
        "model": {"layers": [{"type": "Conv2D", "out_channels": 4, "kernel_size": 3}, {"type": "ReLU"},
                             {"type": "Flatten"}, {"type": "Dense", "out_features": classes}], **model},
        "train": {"epochs": 2, "batch_size": 4, "lr": 0.1},
        "output": {"visualizers": []},
    }


def model_state(run_dir, name=LAST):
    return checkpoint.load(run_dir / "checkpoints" / name)[0]["model"]


@pytest.fixture
def source_run(tmp_path):
    folder = make_image_folder(tmp_path / "three", classes=("a", "b", "c"), count=6)
    return rabbitkit.run(experiment(folder, 3), out=tmp_path / "runs", quiet=True).run_dir


def test_new_head_and_frozen_layers(tmp_path, source_run):
    folder = make_image_folder(tmp_path / "two", count=6)
    config = experiment(folder, 2, weights=str(source_run / "checkpoints" / BEST))
    config["train"]["freeze"] = ["0"]
    result = rabbitkit.run(config, out=tmp_path / "runs", quiet=True)
    logs = (result.run_dir / "log.txt").read_text()
    assert "new head 3 (re-initialised)" in logs and "frozen: 1 layers matching 0" in logs
    before, after = model_state(source_run, BEST), model_state(result.run_dir)
    for name in ("0.weight", "0.bias"):  # frozen: exactly the pretrained values
        assert after[name].tobytes() == before[name].tobytes(), name
    assert after["3.weight"].shape == (2, before["3.weight"].shape[1])
    assert np.isfinite(result.history[-1]["train_loss"])
    # Without freezing, the pretrained conv moves.
    config["train"]["freeze"] = []
    moved = model_state(rabbitkit.run(config, out=tmp_path / "runs", quiet=True).run_dir)
    assert moved["0.weight"].tobytes() != before["0.weight"].tobytes()


def test_strict_and_loose_loading(tmp_path, source_run):
    from safetensors.numpy import save_file

    state = dict(model_state(source_run, BEST))
    state["extra.weight"] = np.zeros(2, np.float32)
    del state["0.bias"]
    path = tmp_path / "loose.safetensors"
    save_file(state, str(path))
    folder = tmp_path / "three"  # the source run's images
    with pytest.raises(CheckpointError, match=r"loose.safetensors: no tensor '0.bias' in the file"):
        rabbitkit.run(experiment(folder, 3, weights=str(path)), out=tmp_path / "runs", quiet=True)
    result = rabbitkit.run(experiment(folder, 3, weights=str(path), strict=False), out=tmp_path / "runs", quiet=True)
    logs = (result.run_dir / "log.txt").read_text()
    assert "1 left at their initial values (first: 0.bias)" in logs and "1 in the file unused (first: extra.weight)" in logs


def test_bad_keys_are_one_line(tmp_path, source_run):
    folder = tmp_path / "three"
    config = experiment(folder, 3)
    config["train"]["freeze"] = ["feature.*"]
    with pytest.raises(ConfigError, match=r"train.freeze: freeze pattern 'feature.\*' matches no layer"):
        rabbitkit.run(config, out=tmp_path / "runs", quiet=True)
    with pytest.raises(ConfigError, match="model.strict: expected true/false"):
        rabbitkit.run(experiment(folder, 3, weights="x", strict="yes"), out=tmp_path / "runs", quiet=True)
    from rabbitkit.errors import WeightsError

    with pytest.raises(WeightsError, match="missing.pth: weight file not found"):
        rabbitkit.run(experiment(folder, 3, weights=str(tmp_path / "missing.pth")), out=tmp_path / "runs", quiet=True)
