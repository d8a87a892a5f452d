"""A tiny image-folder dataset and a small GTSRB-style ConvNet run trained on it (shared by the visualize tests)."""
import numpy as np

import rabbitkit
from rabbitkit.visualize import common

CLASSES = ("bars", "blob", "stripes")
SIZE = 16


def pattern(kind, rng):
    """A 16x16 RGB uint8 image of one of three easy patterns, with noise."""
    image = rng.normal(90, 25, (SIZE, SIZE, 3))
    if kind == "bars":          # vertical red bars
        image[:, ::4, 0] += 140
    elif kind == "blob":        # a green centre
        image[5:11, 5:11, 1] += 140
    else:                       # horizontal blue stripes
        image[::4, :, 2] += 140
    return np.clip(image, 0, 255).astype(np.uint8)


def write_dataset(root, per_class=24, seed=0):
    rng = np.random.default_rng(seed)
    for kind in CLASSES:
        (root / kind).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            common.write_png(root / kind / f"{i:03d}.png", pattern(kind, rng))
    return root


def experiment(data_path):
    return {
        "experiment": {"name": "tiny", "seed": 0},
        "data": {"dataset": "image_folder", "path": str(data_path), "val_fraction": 0.25,
                 "preprocess": ["scale", "standardize"]},
        "model": {"architecture": "gtsrb_cnn", "channels": [[8], [8]], "fc_width": 16, "dropout": 0.0},
        "train": {"epochs": 6, "batch_size": 16, "optimizer": {"name": "adam"}, "lr": 0.01},
        "output": {"visualizers": []},
    }


def train_tiny_run(tmp_path_factory, visualizers=()):
    data = write_dataset(tmp_path_factory.mktemp("patterns"))
    config = experiment(data)
    config["output"]["visualizers"] = list(visualizers)
    return rabbitkit.run(config, out=tmp_path_factory.mktemp("runs"), quiet=True)
