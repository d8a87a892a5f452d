"""Run directories: config, metrics.csv, log, checkpoints and plots of one run.

Runs never overwrite each other: a new run gets a fresh folder named after the
experiment and the start time, with a numeric suffix if that name is taken.
"""
import csv
import io
import json
import os
import pathlib
import time


def atomic_write_text(path, text):
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def new_run_directory(parent, name):
    """Create and return ``parent/<name>-<YYYYmmdd-HHMMSS>[-k]`` (never an existing one)."""
    parent = pathlib.Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    stem = f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    for attempt in range(1000):
        candidate = parent / (stem if attempt == 0 else f"{stem}-{attempt}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a run directory under {parent}")


class RunDirectory:
    """Paths and writers of one run directory."""

    def __init__(self, path):
        self.path = pathlib.Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.checkpoints = self.path / "checkpoints"
        self.checkpoints.mkdir(exist_ok=True)

    @property
    def config_path(self):
        return self.path / "config.toml"

    def write_config(self, text):
        atomic_write_text(self.config_path, text)

    def log(self, message):
        with open(self.path / "log.txt", "a") as handle:
            handle.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')}  {message}\n")

    def write_metrics(self, history):
        """metrics.csv: one row per epoch (rewritten whole, so it always matches the history)."""
        columns = []
        for row in history:
            columns += [key for key in row if key not in columns]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns)
        writer.writeheader()
        for row in history:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        atomic_write_text(self.path / "metrics.csv", buffer.getvalue())

    def write_json(self, name, data):
        clean = {k: v for k, v in data.items() if isinstance(v, (int, float, str, bool, type(None)))}
        atomic_write_text(self.path / name, json.dumps(clean, indent=2, sort_keys=True) + "\n")
