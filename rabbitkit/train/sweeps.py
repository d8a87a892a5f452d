"""Sweep helpers: the dask client for cluster sweeps and the result table
(the runs themselves are :func:`rabbitkit.train.api.sweep`)."""
import contextlib
import os
import pathlib

from ..errors import RabbitError
from .tables import aligned, csv_text, number

SHOWN = ("train_loss", "val_loss", "val_accuracy", "test_loss", "test_accuracy", "test_bpc")


def parse_grid(text):
    """``"train.lr=0.1,0.01"`` -> ("train.lr", [0.1, 0.01]) (values as ``--set`` reads them)."""
    from ..errors import ConfigError
    from .config import parse_override

    key, _, raw = text.partition("=")
    if not _ or not key.strip() or not raw.strip() or any(not part.strip() for part in key.split(".")):
        raise ConfigError(f"--grid {text!r}: expected KEY=V1,V2,... with a dotted key, e.g. train.lr=0.1,0.01")
    values = [parse_override(f"x={v}")[1] for v in raw.split(",")]
    if any(v == "" for v in values):
        raise ConfigError(f"--grid {text!r}: an empty value between commas; expected KEY=V1,V2,...")
    return key.strip(), values


def sweep_monitor(results):
    """The metric the sweep's runs picked their best checkpoint by (from ``best_<metric>``), or None."""
    for _, result in results:
        for key in result.metrics:
            if key.startswith("best_") and key != "best_epoch":
                return key[len("best_"):]
    return None


def best_value(result, monitor):
    """The run's best ``monitor`` value: recorded at the end, else the best epoch of its history."""
    if monitor is None:
        return None
    if f"best_{monitor}" in result.metrics:
        return result.metrics[f"best_{monitor}"]
    values = [h[monitor] for h in result.history if isinstance(h.get(monitor), (int, float))]
    if not values:
        return None
    return max(values) if "accuracy" in monitor else min(values)


def sweep_records(results):
    """(header, one dict per combination) of sweep.csv."""
    keys = list(results[0][0]) if results else []
    monitor = sweep_monitor(results)
    metrics = [m for m in SHOWN if any(m in r.metrics for _, r in results)]
    best = [f"best_{monitor}", "best_epoch"] if monitor else []
    header = keys + metrics + best + ["status", "epochs", "run_dir"]
    records = []
    for values, result in results:
        record = dict(values, status=result.stopped, epochs=len(result.history), run_dir=str(result.run_dir))
        record.update({m: result.metrics.get(m) for m in metrics})
        if monitor:
            record[f"best_{monitor}"] = best_value(result, monitor)
            record["best_epoch"] = result.metrics.get("best_epoch")
        records.append(record)
    return header, records


def write_sweep_files(results, folder):
    """sweep.csv and sweep.png in ``folder``; returns their paths (png None without a monitored metric)."""
    from ..viz.compare import plot_sweep
    from .rundir import atomic_write_text

    header, records = sweep_records(results)
    csv_path = pathlib.Path(folder) / "sweep.csv"
    atomic_write_text(csv_path, csv_text(header, records))
    monitor = sweep_monitor(results)
    png_path = None
    if monitor and results:
        points = [values for values, _ in results]
        png_path = plot_sweep(points, [r[f"best_{monitor}"] for r in records], f"best {monitor}",
                              pathlib.Path(folder) / "sweep.png")
    return csv_path, png_path


def format_table(results):
    """One row per run: the swept values, the headline metrics, status and the run directory."""
    if not results:
        return "no runs"
    header, records = sweep_records(results)
    keys = list(results[0][0])
    rows = [[h if h != "run_dir" else "run directory" for h in header]]
    for record in records:
        rows.append([repr(record[h]) if h in keys else number(record[h]) for h in header])
    return aligned(rows)


@contextlib.contextmanager
def dask_client(address):
    """A dask.distributed client for ``address`` ("local" starts a local cluster), or None."""
    if not address:
        yield None
        return
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise RabbitError("--dask needs the optional extra: pip install 'rabbitkit[dask]'") from None
    if address == "local":
        # One single-threaded worker per core: each run already uses the cores it has.
        with LocalCluster(n_workers=max(1, (os.cpu_count() or 2) // 2), threads_per_worker=1,
                          processes=True, dashboard_address=None) as cluster, Client(cluster) as client:
            yield client
        return
    try:
        client = Client(address, timeout="10s")
    except OSError as err:
        raise RabbitError(f"cannot reach the dask scheduler at {address}: {err}") from None
    with client:
        yield client
