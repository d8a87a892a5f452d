"""Every shipped experiment file validates and builds (dry run) on small stand-in data."""
import pathlib

import pytest

from rabbitkit.plugins import get_manager
from rabbitkit.train import config as cfg
from rabbitkit.train.dryrun import describe

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((ROOT / "experiments").glob("*.toml"))


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


@pytest.mark.parametrize("name", ["sine", "overfitting", "char_rnn", "char_rnn_gru", "char_rnn_vanilla"])
def test_experiment_builds(name, shared_data, monkeypatch):
    monkeypatch.chdir(ROOT)  # char_rnn's path is relative to the repository
    text = describe(cfg.load(ROOT / "experiments" / f"{name}.toml"), get_manager())
    assert "total parameters" in text


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
