"""Reading run directories back: what ``rabbit runs`` lists and ``rabbit compare`` overlays.

Everything comes from files the trainer writes: ``config.toml`` (the resolved
config), ``metrics.csv`` (one row per epoch), ``final_metrics.json`` (after the
test), and ``status.json`` (state, process, start time; see :mod:`.status`).
"""
import csv
import dataclasses
import math
import os
import pathlib
import time

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

from ..errors import RabbitError, did_you_mean
from . import status as status_module
from .tables import aligned, csv_text, number

TEST_METRICS = ("test_accuracy", "test_sequence_accuracy", "test_bpc", "test_loss")


@dataclasses.dataclass
class RunInfo:
    """One run directory, read back."""

    path: pathlib.Path
    status: str
    started: str
    config: dict  # flat: {"train.lr": 0.01, "train.optimizer.name": "adam", ...}
    history: list
    final: dict
    monitor: str | None
    epochs: int | None

    @property
    def name(self):
        return self.path.name

    @property
    def epochs_done(self):
        return len(self.history)

    @property
    def higher_is_better(self):
        return self.monitor is not None and "accuracy" in self.monitor

    @property
    def best(self):
        """(value, epoch) of the monitored metric, or (None, None)."""
        if self.monitor and f"best_{self.monitor}" in self.final:
            return self.final[f"best_{self.monitor}"], self.final.get("best_epoch")
        values = [(h[self.monitor], h.get("epoch")) for h in self.history if _finite(h.get(self.monitor))]
        if not values:
            return None, None
        pick = max if self.higher_is_better else min
        return pick(values, key=lambda pair: pair[0])

    @property
    def test(self):
        """(metric name, value) of the headline test metric, or (None, None)."""
        for name in TEST_METRICS:
            if name in self.final:
                return name, self.final[name]
        return None, None

    @property
    def wall_seconds(self):
        return self.history[-1].get("wall_seconds") if self.history else None

    def record(self):
        """The CSV row of ``rabbit runs --csv``."""
        best, best_epoch = self.best
        test_name, test = self.test
        return {"run": self.name, "path": str(self.path), "started": self.started, "status": self.status,
                "epochs_done": self.epochs_done, "epochs": self.epochs, "monitor": self.monitor, "best": best,
                "best_epoch": best_epoch, "test_metric": test_name, "test": test, "wall_seconds": self.wall_seconds}


CSV_COLUMNS = ("run", "path", "started", "status", "epochs_done", "epochs", "monitor", "best", "best_epoch",
               "test_metric", "test", "wall_seconds")


def _finite(value):
    return isinstance(value, (int, float)) and math.isfinite(value)


def _scalar(text):
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def read_history(run_dir):
    """metrics.csv as a list of dicts of numbers ([] when there is none yet)."""
    try:
        with open(run_dir / "metrics.csv", newline="") as handle:
            return [{k: _scalar(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(handle)]
    except FileNotFoundError:
        return []


def flatten(table, prefix=""):
    """{"train": {"lr": 0.1, "optimizer": {"name": "adam"}}} -> {"train.lr": 0.1, "train.optimizer.name": "adam"}."""
    flat = {}
    for key, value in table.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _default_monitor(config, history):
    if config.get("train.monitor"):
        return config["train.monitor"]
    keys = set().union(*history) if history else set()
    for name in ("val_accuracy", "val_loss", "train_accuracy", "train_loss"):
        if name in keys:
            return name
    return None


def read_run(run_dir):
    """A :class:`RunInfo` for one run directory (it must hold config.toml)."""
    import json

    run_dir = pathlib.Path(run_dir)
    config_path = run_dir / "config.toml"
    if not config_path.is_file():
        raise RabbitError(f"{run_dir}: not a run directory (no config.toml)")
    try:
        with config_path.open("rb") as handle:
            config = flatten(tomllib.load(handle))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise RabbitError(f"{config_path}: not valid TOML ({err})") from None
    history = read_history(run_dir)
    try:
        final = json.loads((run_dir / "final_metrics.json").read_text())
    except (OSError, ValueError):
        final = {}
    recorded = status_module.read_raw(run_dir) or {}
    started = recorded.get("started") or time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(config_path.stat().st_mtime))
    return RunInfo(path=run_dir, status=status_module.read_status(run_dir), started=started, config=config,
                   history=history, final=final, monitor=recorded.get("monitor") or _default_monitor(config, history),
                   epochs=recorded.get("epochs", config.get("train.epochs")))


def find_runs(root):
    """Every run directory under ``root`` (``root`` itself may be one), as :class:`RunInfo`."""
    root = pathlib.Path(root)
    if not root.is_dir():
        raise RabbitError(f"{root}: folder not found (expected a folder of run directories, e.g. runs/)")
    found = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if d != "checkpoints" and not d.startswith("."))
        if "config.toml" in files:
            found.append(read_run(pathlib.Path(folder)))
            subfolders[:] = []  # a run directory holds no other runs
    return found


# -- filters and sorting ------------------------------------------------------------------
def parse_filter(text):
    """``"train.lr=0.01"`` -> ("train.lr", 0.01, "0.01"); one-line error without '='."""
    from .config import parse_override

    if "=" not in text or not text.split("=", 1)[0].strip():
        raise RabbitError(f"--filter {text!r}: expected key=value with a resolved config key, e.g. train.lr=0.01")
    keys, value = parse_override(text)
    return ".".join(keys), value, text.split("=", 1)[1].strip()


def _matches(actual, wanted, raw):
    if isinstance(actual, bool) or isinstance(wanted, bool):
        return actual is wanted or str(actual).lower() == raw.lower()
    if isinstance(actual, (int, float)) and isinstance(wanted, (int, float)):
        return math.isclose(actual, wanted, rel_tol=1e-9, abs_tol=0.0)
    return actual == wanted or str(actual) == raw


def apply_filters(runs, filters):
    """Keep the runs whose resolved config has every ``key=value`` of ``filters``.

    ``train.optimizer=adam`` also matches ``optimizer = {name = "adam", ...}``.
    A key that no run has is an error (a typo would otherwise list nothing).
    """
    for text in filters:
        key, wanted, raw = parse_filter(text)
        known = set().union(*(r.config for r in runs)) if runs else set()
        if runs and key not in known and f"{key}.name" not in known:
            raise RabbitError(f"--filter {text!r}: no run has the config key '{key}'{did_you_mean(key, known)}")

        def keep(run, key=key, wanted=wanted, raw=raw):
            for candidate in (key, f"{key}.name"):
                if candidate in run.config and _matches(run.config[candidate], wanted, raw):
                    return True
            return False

        runs = [r for r in runs if keep(r)]
    return runs


SORT_KEYS = ("started", "name", "status", "epochs", "best", "test", "wall")


def sort_runs(runs, key="started"):
    """Newest first by default; ``best``/``test`` put the best run first; a config key sorts by its value."""
    def ranked(value, higher_is_better):  # missing values last
        if value is None:
            return (1, 0)
        return (0, -value if higher_is_better else value)

    if key == "started":
        return sorted(runs, key=lambda r: (r.started, r.name), reverse=True)
    if key == "name":
        return sorted(runs, key=lambda r: r.name)
    if key == "status":
        return sorted(runs, key=lambda r: (r.status, r.name))
    if key == "epochs":
        return sorted(runs, key=lambda r: (-r.epochs_done, r.name))
    if key == "wall":
        return sorted(runs, key=lambda r: ranked(r.wall_seconds, True))
    if key == "best":
        return sorted(runs, key=lambda r: ranked(r.best[0], r.higher_is_better))
    if key == "test":
        return sorted(runs, key=lambda r: ranked(r.test[1], r.test[0] is not None and "accuracy" in r.test[0]))
    known = set().union(*(r.config for r in runs)) if runs else set()
    if runs and key not in known:
        raise RabbitError(f"--sort {key!r}: expected one of {', '.join(SORT_KEYS)} or a config key"
                          f"{did_you_mean(key, list(SORT_KEYS) + sorted(known))}")
    return sorted(runs, key=lambda r: (key not in r.config, str(type(r.config.get(key))), r.config.get(key, 0)))


# -- output -------------------------------------------------------------------------------
def duration(seconds):
    if seconds is None:
        return "-"
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def format_runs(runs):
    """The table ``rabbit runs`` prints: one line per run."""
    rows = [["run", "started", "status", "epochs", "best", "test", "wall"]]
    for run in runs:
        best, best_epoch = run.best
        test_name, test = run.test
        epochs = f"{run.epochs_done}/{run.epochs}" if run.epochs else str(run.epochs_done)
        rows.append([
            run.name, run.started.replace("T", " "), status_module.label(run.status), epochs,
            f"{run.monitor} {number(best)}" if best is not None else "-",
            f"{test_name[5:]} {number(test)}" if test_name else "-",
            duration(run.wall_seconds),
        ])
    return aligned(rows)


def runs_csv(runs):
    return csv_text(CSV_COLUMNS, [r.record() for r in runs])
