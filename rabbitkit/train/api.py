"""The Python face of experiment runs, for scripted research: ``rabbitkit.run`` and sweeps."""
import itertools
import pathlib

from ..plugins import get_manager
from . import config as config_module
from .rundir import new_run_directory
from .trainer import Run


def _resolve(config_or_path, overrides):
    if isinstance(config_or_path, (str, pathlib.Path)):
        return config_module.load(config_or_path, overrides=overrides)
    if isinstance(config_or_path, dict) and "source" in config_or_path and "options" in config_or_path.get("model", {}):
        resolved = config_or_path  # already resolved
        return config_module.resolve(_unresolve(resolved), resolved["source"], overrides) if overrides else resolved
    return config_module.resolve(config_or_path, "<dict>", overrides)


def _unresolve(config):
    raw = {}
    for section, table in config.items():
        if isinstance(table, dict):
            flat = {k: v for k, v in table.items() if k != "options" and v is not None}
            flat.update(table.get("options", {}))
            raw[section] = flat
    return raw


def run(config_or_path, overrides=None, *, out=None, device=None, seed=None, plugins=(), progress=None,
        quiet=False):
    """Run one experiment; returns a :class:`~rabbitkit.train.trainer.Result`.

    ``config_or_path``: a TOML path or a dict shaped like one; ``overrides``:
    ``{"train.lr": 0.01}`` (dotted keys, as ``--set``).  A sweep is a plain loop::

        for lr in (0.1, 0.03, 0.01):
            result = rabbitkit.run("experiments/sine.toml", {"train.lr": lr})
            print(lr, result.metrics["val_loss"])
    """
    overrides = dict(overrides or {})
    if device is not None:
        overrides["experiment.device"] = device
    if seed is not None:
        overrides["experiment.seed"] = seed
    if out is not None:
        overrides["output.dir"] = str(out)
    config = _resolve(config_or_path, overrides)
    manager = get_manager()
    for module in plugins:
        manager.load(module)
    run_dir = new_run_directory(config["output"]["dir"], config["experiment"]["name"])
    try:
        live = Run(config, run_dir, manager=manager, progress=progress, log_to_stdout=not quiet)
    except BaseException:
        _remove_if_untouched(run_dir)  # a config or data error leaves no empty run behind
        raise
    return live.train()


def _remove_if_untouched(run_dir):
    checkpoints = run_dir / "checkpoints"
    if checkpoints.is_dir() and not any(checkpoints.iterdir()):
        checkpoints.rmdir()
    if run_dir.is_dir() and not any(run_dir.iterdir()):
        run_dir.rmdir()


def resume(run_dir, *, progress=None, quiet=False, epochs=None):
    """Continue a run from its last checkpoint (in the same run directory)."""
    from ..errors import CheckpointError
    from .trainer import LAST

    run_dir = pathlib.Path(run_dir)
    config_path = run_dir / "config.toml"
    if not config_path.is_file():
        raise CheckpointError(f"{run_dir}: not a run directory (no config.toml)")
    overrides = {"train.epochs": epochs} if epochs else None
    config = config_module.load(config_path, overrides=overrides)
    # The run's own choices come from its checkpoint (Run.restore); the run it replayed
    # may be gone by now.  (A resumed run does not rewrite config.toml, which keeps the key.)
    config["experiment"]["kernel_choices"] = None
    last = run_dir / "checkpoints" / LAST
    if not last.is_file():
        raise CheckpointError(f"{last}: no checkpoint to resume from (the run stopped before its first one)")
    live = Run(config, run_dir, progress=progress, log_to_stdout=not quiet)
    return live.train(resume_from=last)


def grid_points(grid):
    """Every combination of ``{"train.lr": [0.1, 0.01], "train.l2": [0, 1e-3]}`` as override dicts."""
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def _sweep_point(config, overrides, run_options):
    """One sweep run (module level, so a dask worker can unpickle it); a diverged run is a result too."""
    from .trainer import DivergenceError, Result

    try:
        return run(config, overrides, quiet=True, **run_options)
    except DivergenceError as err:
        if err.run_dir is None:
            raise
        return Result(err.run_dir, dict(err.history[-1]) if err.history else {}, err.history, "diverged")


class SweepResults(list):
    """``[(swept values, Result)]`` in grid order, plus where the sweep wrote its files.

    ``folder``: the sweep's folder (holding its run directories), ``csv``: sweep.csv,
    ``png``: sweep.png (None when there was nothing to plot).
    """

    folder = csv = png = None


def sweep(config_or_path, grid, *, base_overrides=None, client=None, progress=None, **run_options):
    """Run every combination of ``grid``; returns :class:`SweepResults` in grid order.

    The runs go into a fresh folder ``<out>/sweep-<name>-<time>/`` (``out``, else
    ``output.dir``) that also receives ``sweep.csv`` (one row per combination: the
    swept values, final and best metrics, status and run directory) and
    ``sweep.png`` (the monitored metric against each swept key).  A run that
    diverges is recorded as such and the sweep goes on.

    Runs one after another by default.  With ``client`` (a ``dask.distributed.Client``,
    optional extra ``dask``) every run is submitted to the cluster and they run in
    parallel on its workers; run directories are written where the workers run
    (use a shared file system); the sweep files are written here, from the results.
    """
    from .sweeps import write_sweep_files

    config = _resolve(config_or_path, base_overrides or {})
    points = grid_points(grid)
    for point in points:  # validate every point before any folder or run is made
        _resolve(config, point)
    parent = pathlib.Path(run_options.pop("out", None) or config["output"]["dir"])
    folder = new_run_directory(parent, f"sweep-{config['experiment']['name']}").resolve()
    outcomes = run_points(config, points, client=client, progress=progress, out=str(folder), **run_options)
    results = SweepResults(outcomes)
    results.folder = folder
    results.csv, results.png = write_sweep_files(results, folder)
    return results


def run_points(config_or_path, points, *, client=None, progress=None, desc="sweep", **run_options):
    """Run the experiment once per override dict in ``points``; ``[(point, Result)]`` in order.

    Every point is validated before any work starts; with a dask ``client`` the
    runs are submitted to the cluster (see :func:`sweep`).  One progress bar counts
    the runs done (the runs themselves show none).
    """
    from ..progress import bar

    config = _resolve(config_or_path, {})
    for point in points:
        _resolve(config, point)
    run_options["progress"] = False
    with bar(len(points), desc, progress, unit="run") as runs_done:
        if client is None:
            outcomes = []
            for point in points:
                outcomes.append(_sweep_point(config, point, run_options))
                runs_done.update(1)
        else:
            from distributed import as_completed

            futures = [client.submit(_sweep_point, config, point, run_options, pure=False) for point in points]
            for _ in as_completed(futures):
                runs_done.update(1)
            outcomes = client.gather(futures)
    return list(zip(points, outcomes))
