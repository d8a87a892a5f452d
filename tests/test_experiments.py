"""Every shipped experiment file validates and builds (dry run) on small stand-in data."""
import pathlib

import pytest

from rabbitkit.plugins import get_manager
from rabbitkit.train import config as cfg
from rabbitkit.train.dryrun import describe

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Committee files ([committee] tables) are checked in tests/test_tta_committee.py.
EXPERIMENTS = sorted(p for p in (ROOT / "experiments").glob("*.toml") if not p.stem.endswith("_committee"))


def test_there_are_experiments():
    names = {p.stem for p in EXPERIMENTS}
    assert {"gtsrb", "gtsrb_stn", "cifar10", "sine", "overfitting", "char_rnn", "char_rnn_gru",
            "char_rnn_vanilla"} <= names


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_experiment_validates(path):
    config = cfg.load(path)
    manager = get_manager()
    assert callable(manager.registry("datasets").get(config["data"]["dataset"]))
    assert callable(manager.registry("architectures").get(config["model"]["architecture"]))
    assert config["experiment"]["name"] == path.stem


@pytest.mark.parametrize("name", ["sine", "overfitting"])
def test_generated_data_experiment_builds(name):
    """No real data needed: these run everywhere, ../shared or not."""
    text = describe(cfg.load(ROOT / "experiments" / f"{name}.toml"), get_manager())
    assert "total parameters" in text


@pytest.mark.parametrize("name", ["char_rnn", "char_rnn_gru", "char_rnn_vanilla"])
def test_experiment_builds(name, shared_data, monkeypatch):
    monkeypatch.chdir(ROOT)  # char_rnn's path is relative to the repository
    text = describe(cfg.load(ROOT / "experiments" / f"{name}.toml"), get_manager())
    assert "total parameters" in text


def test_the_sine_demo_trains_to_the_end_under_the_default_divergence_rule(tmp_path):
    """The shipped sine experiment, whole (60 epochs): not stopped by train.divergence_factor."""
    import rabbitkit

    result = rabbitkit.run(ROOT / "experiments" / "sine.toml", {"output.visualizers": []}, out=tmp_path, quiet=True)
    assert result.stopped == "completed" and len(result.history) == 60
    assert result.metrics["test_loss"] < 0.01  # noise 0.05: the fit is close


def write_cifar_binary(folder, per_batch=20):
    """cifar-10-batches-bin/data_batch_1..5.bin and test_batch.bin: 1 label byte + 3072 pixel bytes each."""
    import numpy as np

    rng = np.random.default_rng(0)
    root = folder / "cifar-10-batches-bin"
    root.mkdir(parents=True)
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        labels = rng.integers(0, 10, per_batch, dtype=np.uint8)
        pixels = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        (root / name).write_bytes(np.concatenate([labels[:, None], pixels], axis=1).tobytes())
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (root / "batches.meta.txt").write_text("\n".join(names) + "\n")
    return root


def test_cifar10_experiment_builds_on_binary_batches(tmp_path, monkeypatch):
    monkeypatch.setenv("RABBIT_CACHE", str(tmp_path / "cache"))
    root = write_cifar_binary(tmp_path)
    config = cfg.load(ROOT / "experiments" / "cifar10.toml", overrides={"data.path": str(root)})
    text = describe(config, get_manager())
    assert "input (3, 32, 32), 10 outputs" in text


def test_overfitting_demo_and_l2_closing_the_gap(tmp_path):
    """experiments/overfitting.toml: training and validation loss part ways; L2 narrows the gap."""
    import rabbitkit

    path = ROOT / "experiments" / "overfitting.toml"
    plain = rabbitkit.run(path, {"output.visualizers": [], "output.checkpoint_every": 1000}, out=tmp_path, quiet=True)
    decayed = rabbitkit.run(path, {"output.visualizers": [], "output.checkpoint_every": 1000, "train.l2": 0.01},
                            out=tmp_path, quiet=True)
    # both run all 1000 epochs under the default divergence rule (epoch 2 spikes to ~80x the first loss)
    assert plain.stopped == decayed.stopped == "completed" and len(plain.history) == len(decayed.history) == 1000
    last_plain, last_decayed = plain.history[-1], decayed.history[-1]
    gap_plain = last_plain["val_loss"] - last_plain["train_loss"]
    gap_decayed = last_decayed["val_loss"] - last_decayed["train_loss"]
    best_val_plain = min(h["val_loss"] for h in plain.history)
    assert last_plain["train_loss"] < 0.1 * last_plain["val_loss"]  # memorised the noise
    assert last_plain["val_loss"] > 1.2 * best_val_plain  # validation turned up again
    assert gap_decayed < 0.7 * gap_plain
    assert last_decayed["val_loss"] < last_plain["val_loss"]
