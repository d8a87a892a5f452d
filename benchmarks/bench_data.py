"""Data-layer timings: GTSRB subset first/cached load and augmentation throughput.

    python benchmarks/bench_data.py [--path ZIP] [--batch 128] [--repeats 20]

Prints indicative numbers (machine-dependent; run on a quiet machine).  The first
load decodes and resizes every PNG (thread pool over Pillow); the cached load
reads the .npz written by the first.  Augmentation is measured per batch of
float32 NCHW images, at 32x32 and 48x48, for the geometric warp alone, warp +
elastic distortion, and the full set with colour jitter.
"""
import argparse
import os
import pathlib
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_ZIP = ROOT.parent / "shared" / "data" / "gtsrb" / "GTSRB_Kaggle_layout_subset.zip"

CONFIGS = {
    "flip+affine": {"hflip": True, "rotate": 10.0, "scale": 0.1, "translate": 3.0},
    "affine+elastic": {"rotate": 10.0, "scale": 0.1, "translate": 3.0, "elastic_alpha": 3.0, "elastic_sigma": 4.0},
    "all": {"hflip": True, "rotate": 10.0, "scale": 0.1, "translate": 3.0, "elastic_alpha": 3.0,
            "elastic_sigma": 4.0, "brightness": 0.1, "contrast": 0.2, "saturation": 0.2},
}


def time_loads(path, image_size):
    from rabbitkit.data.datasets.gtsrb import load_gtsrb

    with tempfile.TemporaryDirectory() as cache:
        os.environ["RABBIT_CACHE"] = cache
        start = time.perf_counter()
        ds = load_gtsrb(path=str(path), image_size=image_size)
        first = time.perf_counter() - start
        start = time.perf_counter()
        load_gtsrb(path=str(path), image_size=image_size)
        cached = time.perf_counter() - start
    n = sum(len(s) for s in ds.splits.values())
    print(f"gtsrb subset {image_size}x{image_size}: {n} images, first load {first:.2f} s "
          f"({n / first:.0f} images/s), cached load {cached:.3f} s")


def time_augment(size, batch, repeats):
    from rabbitkit.data.augment import Augmenter

    rng = np.random.default_rng(0)
    x = rng.random((batch, 3, size, size), dtype=np.float32)
    y = rng.integers(0, 43, batch)
    for name, config in CONFIGS.items():
        augmenter = Augmenter.from_config(config)
        augmenter(x, y, rng)  # compile / load the cached kernels
        start = time.perf_counter()
        for _ in range(repeats):
            augmenter(x, y, rng)
        rate = batch * repeats / (time.perf_counter() - start)
        print(f"augment {size}x{size} {name:15s}: {rate:9.0f} images/s")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--path", default=str(DEFAULT_ZIP))
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    if pathlib.Path(args.path).exists():
        for size in (32, 48):
            time_loads(args.path, size)
    else:
        print(f"skipping load timings: {args.path} not found", file=sys.stderr)
    for size in (32, 48):
        time_augment(size, args.batch, args.repeats)


if __name__ == "__main__":
    main()
