"""The main job end to end: `rabbit run experiments/gtsrb.toml` on generated GTSRB-format
data (the official PPM layout, written here), `rabbit eval`, and the missing-data case."""
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXPERIMENT = ROOT / "experiments" / "gtsrb.toml"
CLASSES = (1, 14, 38)  # speed limit 30, stop, keep right
SMALL = ["--set", "data.image_size=16", "--set", "model.channels=[[8], [16]]", "--set", "model.fc_width=32",
         "--set", "train.batch_size=16", "--set", "data.val_fraction=0.25"]


def sign_image(cls, rng, size):
    """A frame with a class-specific glyph: bright disc for 1, octagon-ish block for 14, an arrow
    pointing right for 38 ("keep right": the main job mirrors it into 39, "keep left")."""
    w, h = size
    img = np.full((h, w, 3), rng.integers(40, 90), dtype=np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    cy, cx = h / 2 + rng.normal(0, 1), w / 2 + rng.normal(0, 1)
    r = min(w, h) * 0.35
    if cls == 1:
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = (220, 30, 30)
    elif cls == 14:
        img[(abs(yy - cy) < r) & (abs(xx - cx) < r)] = (200, 200, 40)
    else:
        dx, dy = xx - cx, abs(yy - cy)
        shaft = (dy < r / 4) & (dx > -r) & (dx <= 0)
        head = (dx > 0) & (dx < r) & (dy < 0.9 * (r - dx))
        img[shaft | head] = (30, 60, 220)
    noise = rng.integers(-20, 20, img.shape)
    return Image.fromarray(np.clip(img.astype(int) + noise, 0, 255).astype(np.uint8))


def write_official_gtsrb(root, tracks=4, per_track=6, tests_per_class=6):
    rng = np.random.default_rng(0)
    header = "Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"
    for c in CLASSES:
        folder = root / "GTSRB" / "Final_Training" / "Images" / f"{c:05d}"
        folder.mkdir(parents=True)
        lines = [header]
        for t in range(tracks):
            for i in range(per_track):
                w = h = int(24 + 2 * i)
                name = f"{t:05d}_{i:05d}.ppm"
                sign_image(c, rng, (w, h)).save(folder / name, format="PPM")
                lines.append(f"{name};{w};{h};2;2;{w - 3};{h - 3};{c}")
        (folder / f"GT-{c:05d}.csv").write_text("\n".join(lines) + "\n")
    test_dir = root / "GTSRB" / "Final_Test" / "Images"
    test_dir.mkdir(parents=True)
    lines = [header]
    k = 0
    for c in CLASSES:
        for _ in range(tests_per_class):
            name = f"{k:05d}.ppm"
            sign_image(c, rng, (30, 30)).save(test_dir / name, format="PPM")
            lines.append(f"{name};30;30;2;2;27;27;{c}")
            k += 1
    (root / "GT-final_test.csv").write_text("\n".join(lines) + "\n")


@pytest.fixture
def env(tmp_path):
    import os

    environment = dict(os.environ, RABBIT_CACHE=str(tmp_path / "cache"), RABBIT_OFFLINE="1")
    environment.pop("RABBIT_DATA", None)
    # the rabbitkit under test, whatever is installed (the command runs in tmp_path)
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), environment.get("PYTHONPATH")]))
    return environment


def rabbit(args, env, cwd):
    return subprocess.run([sys.executable, "-m", "rabbitkit.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=cwd)


def test_main_job_on_generated_gtsrb(tmp_path, env):
    data = tmp_path / "gtsrb"
    write_official_gtsrb(data)
    done = rabbit(["run", EXPERIMENT, "--out", tmp_path / "runs", "--set", f"data.path=\"{data}\"",
                   "--set", "train.epochs=16", *SMALL], env, tmp_path)  # half the arrows come mirrored: 4 classes
    assert done.returncode == 0, done.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    for name in ("config.toml", "metrics.csv", "log.txt", "curves.png", "filters.png", "final_metrics.json",
                 "checkpoints/last.safetensors", "checkpoints/best.safetensors"):
        assert (run_dir / name).is_file(), name
    rows = [line.split(",") for line in (run_dir / "metrics.csv").read_text().splitlines()]
    header, values = rows[0], [dict(zip(rows[0], r)) for r in rows[1:]]
    assert len(values) == 16
    for column in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr", "samples_per_s", "wall_seconds"):
        assert column in header
    losses = [float(v["train_loss"]) for v in values]
    assert losses[-1] < losses[0]
    assert all(0.0 <= float(v["val_accuracy"]) <= 1.0 for v in values)
    import json

    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert final["test_accuracy"] > 0.6  # three easy classes; chance is 1/3

    evaluated = rabbit(["eval", run_dir, "--split", "test"], env, tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    assert "per-class accuracy" in evaluated.stdout
    matrix = np.loadtxt(run_dir / "confusion_test.csv", delimiter=",", skiprows=1, dtype=int)[:, 1:]
    assert matrix.shape == (43, 43) and matrix.sum() == 3 * 6
    assert (run_dir / "confusion_test.png").is_file()


def test_main_job_without_data_says_how_to_provide_it(tmp_path, env):
    done = rabbit(["run", EXPERIMENT, "--out", tmp_path / "runs"], env, tmp_path)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 2 and "Traceback" not in done.stderr
    assert lines[0].startswith("error: dataset 'gtsrb' not found (looked in $RABBIT_DATA/gtsrb/ and ")
    assert lines[0].endswith("; downloads are off: $RABBIT_OFFLINE is set)")
    assert lines[1] == (f"  fix: put GTSRB_Final_Training_Images.zip, GTSRB_Final_Test_Images.zip, "
                        f"GTSRB_Final_Test_GT.zip into {tmp_path / 'cache' / 'datasets' / 'gtsrb'}  "
                        f"(or --set data.path=PATH to a copy)")


def test_main_job_without_data_and_network_says_it_once(tmp_path, env):
    """Downloads on, but the server cannot be reached (a proxy nobody listens on)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(env, https_proxy=f"http://127.0.0.1:{port}", HTTPS_PROXY=f"http://127.0.0.1:{port}")
    env.pop("RABBIT_OFFLINE")
    done = rabbit(["run", EXPERIMENT, "--out", tmp_path / "runs"], env, tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    notice, first, fix = done.stderr.strip().splitlines()
    assert notice.startswith("dataset 'gtsrb' not found locally: downloading it to ")
    assert first.startswith("error: dataset 'gtsrb' not found (not in $RABBIT_DATA/gtsrb/ and ")
    assert "; cannot reach sid.erda.dk: " in first and len(first) < 300
    assert fix.startswith("  fix: put GTSRB_Final_Training_Images.zip, ") and fix.count("data.path") == 1


def test_main_job_dry_run_on_the_real_subset(shared_data, tmp_path, env):
    subset = shared_data / "gtsrb" / "GTSRB_Kaggle_layout_subset.zip"
    done = rabbit(["run", EXPERIMENT, "--dry-run", "--set", f"data.path=\"{subset}\"", "--set", "data.max_per_class=5"],
                  env, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "gtsrb_cnn" in done.stdout and "total parameters" in done.stdout
