"""``rabbit compare``: several runs' curves overlaid, their config differences and final metrics."""
import pathlib

from ..errors import RabbitError
from . import status as status_module
from .runs import find_runs, read_run
from .tables import aligned, number

FINAL = ("train_loss", "val_loss", "val_accuracy", "val_bpc")


def config_differences(runs):
    """{key: [value per run]} for every resolved config key whose value is not the same in all runs."""
    keys = sorted(set().union(*(r.config for r in runs)))
    missing = object()
    differing = {}
    for key in keys:
        values = [r.config.get(key, missing) for r in runs]
        if any(v != values[0] for v in values[1:]):
            differing[key] = [None if v is missing else v for v in values]
    return differing


def unique_names(runs):
    """Directory names, or parent/name where two runs share a name."""
    names = [r.name for r in runs]
    if len(set(names)) == len(names):
        return names
    return [f"{r.path.parent.name}/{r.name}" for r in runs]


def compare_text(runs, names):
    differing = config_differences(runs)
    lines = []
    if differing:
        rows = [["config"] + names]
        rows += [[key] + ["-" if v is None else repr(v) for v in values] for key, values in differing.items()]
        lines.append(aligned(rows))
    else:
        lines.append("config: identical")
    rows = [["final"] + names]
    rows.append(["status"] + [status_module.label(r.status) for r in runs])
    rows.append(["epochs"] + [str(r.epochs_done) for r in runs])
    for metric in FINAL:
        if any(r.history and metric in r.history[-1] for r in runs):
            rows.append([metric] + [number(r.history[-1].get(metric)) if r.history else "-" for r in runs])
    rows.append(["best"] + [f"{r.monitor} {number(r.best[0])}" if r.best[0] is not None else "-" for r in runs])
    tests = sorted({k for r in runs for k in r.final if k.startswith("test_")})
    for metric in tests:
        rows.append([metric] + [number(r.final.get(metric)) for r in runs])
    lines.append(aligned(rows))
    return "\n\n".join(lines)


def compare_runs(paths, output="compare.png"):
    """Read ``paths`` (run directories, or folders of them such as a sweep's), plot them
    into ``output``; returns (text, output path)."""
    if not paths:
        raise RabbitError("compare: give at least one run directory")
    runs = []
    for path in paths:
        path = pathlib.Path(path)
        if not path.is_dir():
            raise RabbitError(f"{path}: run directory not found")
        inside = [] if (path / "config.toml").is_file() else find_runs(path)
        # A folder of runs (a sweep's, runs/) stands for the runs in it; any other
        # folder is read as one run, and read_run says what it lacks.
        if inside:
            runs.extend(read_run(info.path) for info in inside)
        else:
            runs.append(read_run(path))
    empty = [str(r.path) for r in runs if not r.history]
    if len(empty) == len(runs):
        raise RabbitError(f"{', '.join(empty)}: no epoch finished yet (metrics.csv is empty or missing)")
    names = unique_names(runs)
    from ..viz.compare import plot_comparison

    written = plot_comparison(runs, pathlib.Path(output), names)
    return compare_text(runs, names), written
