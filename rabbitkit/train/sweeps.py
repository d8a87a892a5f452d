"""Sweep helpers: the dask client for cluster sweeps and the result table
(the runs themselves are :func:`rabbitkit.train.api.sweep`)."""
import contextlib
import os

from ..errors import RabbitError

SHOWN = ("train_loss", "val_loss", "val_accuracy", "test_loss", "test_accuracy", "test_bpc")


def format_table(results):
    """One row per run: the swept values, the headline metrics and the run directory."""
    if not results:
        return "no runs"
    keys = list(results[0][0])
    metrics = [m for m in SHOWN if any(m in r.metrics for _, r in results)]
    header = keys + metrics + ["run directory"]
    rows = [header]
    for values, result in results:
        row = [repr(values[k]) for k in keys]
        row += [f"{result.metrics[m]:.4f}" if m in result.metrics else "-" for m in metrics]
        row.append(str(result.run_dir))
        rows.append(row)
    widths = [max(len(r[c]) for r in rows) for c in range(len(header))]
    return "\n".join("  ".join(cell.ljust(widths[c]) for c, cell in enumerate(row)) for row in rows)


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
