"""The ``rabbit`` command: argument parsing only; every command calls the Python API.

User errors (:class:`~rabbitkit.errors.RabbitError`) print as one line on stderr
and exit with status 2; interrupted runs exit with 130.
"""
import pathlib
import sys

import click

from . import __version__
from .errors import RabbitError


class RabbitGroup(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except RabbitError as err:
            click.echo(f"error: {err}", err=True)
            ctx.exit(2)


def _manager(ctx):
    from .plugins import get_manager

    manager = get_manager()
    for module in ctx.obj.get("plugins", ()):
        manager.load(module)
    return manager


def version_lines():
    """``rabbit --version``: the version, and what the kernels run on here (what a
    speed figure or a bug report needs: processor, BLAS and its kernel, threads)."""
    import numba
    import numpy

    from .backend import tuning

    machine = (f"CPU: {tuning.cpu_model()}; kernel BLAS: {tuning.blas_description()}; "
               f"numba {numba.__version__} ({numba.get_num_threads()} threads); numpy {numpy.__version__}")
    return [f"rabbit, version {__version__}", machine]


def _print_version(ctx, _param, value):
    if value and not ctx.resilient_parsing:
        click.echo("\n".join(version_lines()))
        ctx.exit()


@click.group(cls=RabbitGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version,
              help="Show the version and the processor, BLAS and threads the kernels use, and exit.")
@click.option("-p", "plugins", multiple=True, metavar="MODULE", help="Load a plugin module by import path (repeatable).")
@click.pass_context
def main(ctx, plugins):
    """rabbitkit: deep learning down the rabbit hole, with hand-written Numba kernels."""
    ctx.ensure_object(dict)
    ctx.obj["plugins"] = plugins


@main.command()
@click.pass_context
def plugins(ctx):
    """List every registered name by kind, with the plugin providing it."""
    from .plugins import KINDS

    manager = _manager(ctx)
    for kind in KINDS:
        registry = manager.registry(kind)
        click.echo(f"{kind}:")
        for name, _, provider in registry.items():
            click.echo(f"  {name:<28} {provider}")


def _experiment_path(path):
    path = pathlib.Path(path)
    if not path.is_file():
        raise RabbitError(f"{path}: experiment file not found")
    return path


@main.command()
@click.argument("experiment", type=click.Path(dir_okay=False))
@click.option("--device", type=click.Choice(["cpu", "cuda"]), help="Override experiment.device.")
@click.option("--seed", type=int, help="Override experiment.seed.")
@click.option("--out", type=click.Path(file_okay=False), help="Folder for the run directory (output.dir).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a dotted key, e.g. train.lr=0.01.")
@click.option("--dry-run", is_flag=True, help="Print the resolved configuration and model summary, then exit.")
@click.pass_context
def run(ctx, experiment, device, seed, out, sets, dry_run):
    """Train the model an EXPERIMENT.toml describes."""
    from .train import config as config_module

    path = _experiment_path(experiment)
    overrides = [config_module.parse_override(s) for s in sets]
    overrides = {".".join(k): v for k, v in overrides}
    if device:
        overrides["experiment.device"] = device
    if seed is not None:
        overrides["experiment.seed"] = seed
    if out:
        overrides["output.dir"] = out
    manager = _manager(ctx)
    if dry_run:
        from .train.dryrun import describe

        click.echo(describe(config_module.load(path, overrides), manager))
        return
    from .train.api import run as run_experiment

    result = run_experiment(path, overrides)
    _finish(ctx, result)


def _finish(ctx, result):
    if result.stopped == "interrupted":
        ctx.exit(130)
    click.echo(f"run directory: {result.run_dir}")


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--epochs", type=int, help="Train up to this many epochs in total (extends a finished run).")
@click.pass_context
def resume(ctx, run_dir, epochs):
    """Continue the run in RUN_DIR from its last checkpoint."""
    from .train.api import resume as resume_run

    _manager(ctx)
    _finish(ctx, resume_run(run_dir, epochs=epochs))


@main.command(name="eval")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--split", default="test", show_default=True, help="Split to evaluate.")
@click.option("--checkpoint", "which", type=click.Choice(["best", "last"]),
              help="Checkpoint to evaluate (default: the one the run tests with, train.test_checkpoint).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), help="Evaluate on this device (default: the run's).")
@click.option("--tta", metavar="PRESET", help="Test-time augmentation: none, shifts, standard or dense (averaged softmax).")
@click.option("--committee", is_flag=True, help="Average the runs' probabilities (a multi-column committee).")
@click.option("--worst", default=20, show_default=True, type=click.IntRange(min=0),
              help="Draw this many worst-classified images (worst_<split>.png; 0: none).")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Folder for the confusion matrix, worst images (and a committee's summary); default: the run "
                   "directory, for a committee a 'committee' folder next to the first run.")
@click.pass_context
def evaluate(ctx, run_dirs, split, which, device, tta, committee, worst, out):
    """Accuracy, per-class accuracy, confusion matrix (CSV and PNG) and worst-classified
    images of a trained run; with --committee, of several runs together."""
    from .errors import ConfigError
    from .train.evaluate import evaluate_committee, evaluate_run

    _manager(ctx)
    if committee:
        click.echo(evaluate_committee(list(run_dirs), split=split, which=which, device=device, tta=tta, worst=worst,
                                      out=out).text)
        return
    if len(run_dirs) > 1:
        raise ConfigError(f"{len(run_dirs)} runs given: pass --committee to evaluate them together")
    report = evaluate_run(run_dirs[0], split=split, which=which, device=device, tta=tta, worst=worst, out=out)
    click.echo(report.text)


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--length", default=500, show_default=True, type=click.IntRange(min=1))
@click.option("--temperature", default=0.8, show_default=True, type=click.FloatRange(min=0.0))
@click.option("--prime", default="", help="Text to start from.")
@click.option("--prime-file", type=click.Path(dir_okay=False, exists=True), help="Read the prime from a file.")
@click.option("--seed", type=int, default=None, help="Seed for sampling (default: random).")
@click.option("--checkpoint", "which", type=click.Choice(["best", "last"]), default="best", show_default=True)
@click.pass_context
def sample(ctx, run_dir, length, temperature, prime, prime_file, seed, which):
    """Generate text from a trained character model."""
    from .train.sampling import sample_run

    _manager(ctx)
    if prime_file:
        prime = pathlib.Path(prime_file).read_text()
    click.echo(sample_run(run_dir, length=length, temperature=temperature, prime=prime, seed=seed, which=which))


@main.command()
@click.argument("experiment", type=click.Path(dir_okay=False))
@click.option("--grid", "grids", multiple=True, metavar="KEY=V1,V2,...", required=True,
              help="A dotted key and the values to try (repeatable: the product is run).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a dotted key for every run.")
@click.option("--out", type=click.Path(file_okay=False), help="Folder for the run directories.")
@click.option("--dask", "scheduler", metavar="ADDRESS",
              help="Run on a dask.distributed cluster (scheduler address, or 'local' for a local cluster).")
@click.pass_context
def sweep(ctx, experiment, grids, sets, out, scheduler):
    """Run EXPERIMENT once per combination of --grid values; print a table, write sweep.csv and sweep.png."""
    from .train import config as config_module
    from .train.api import sweep as run_sweep

    path = _experiment_path(experiment)
    from .train.sweeps import dask_client, format_table, parse_grid

    grid = dict(parse_grid(text) for text in grids)
    base = {".".join(k): v for k, v in (config_module.parse_override(s) for s in sets)}
    _manager(ctx)
    with dask_client(scheduler) as client:
        results = run_sweep(path, grid, base_overrides=base, out=out, client=client)

    click.echo(format_table(results))
    click.echo(f"wrote {results.csv}" + (f", {results.png}" if results.png else ""))


@main.command()
@click.argument("experiment", type=click.Path(dir_okay=False))
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override a dotted key, e.g. train.batch_size=128.")
@click.option("--again", is_flag=True, help="Measure every shape afresh instead of keeping stored choices.")
@click.pass_context
def tune(ctx, experiment, sets, again):
    """Time the kernel variants of EXPERIMENT's shapes on this machine and print the choices."""
    from .train import config as config_module
    from .train.tune import format_choices, tune_experiment

    path = _experiment_path(experiment)
    overrides = {".".join(k): v for k, v in (config_module.parse_override(s) for s in sets)}
    _manager(ctx)
    click.echo(format_choices(*tune_experiment(path, overrides, measure_again=again)))


@main.command()
@click.argument("committee_file", type=click.Path(dir_okay=False))
@click.option("--out", type=click.Path(file_okay=False), help="Folder for the members' run directories.")
@click.option("--dask", "scheduler", metavar="ADDRESS",
              help="Train the members on a dask.distributed cluster (scheduler address, or 'local').")
@click.option("--replay", type=click.Path(file_okay=False), metavar="FOLDER",
              help="Give each member the kernel variants its latest run in FOLDER chose (an earlier training of "
                   "this committee): that training again, bit for bit on the same machine.")
@click.pass_context
def committee(ctx, committee_file, out, scheduler, replay):
    """Train the members a COMMITTEE_FILE lists and report each one's and the committee's accuracy."""
    from .train.committee import train_committee
    from .train.sweeps import dask_client

    path = _experiment_path(committee_file)
    _manager(ctx)
    with dask_client(scheduler) as client:
        run_dirs, report = train_committee(path, client=client, out=out, replay=replay)
    click.echo(report.text)


def _mount_data_commands():
    from .data.cli import data_group

    main.add_command(data_group)


def _mount_pretrained_commands():
    from .pretrained_cli import predict, weights_group

    main.add_command(weights_group)
    main.add_command(predict)


_mount_data_commands()
_mount_pretrained_commands()


def _mount_visualize_commands():
    from .visualize.cli import mount

    mount(main)


_mount_visualize_commands()

from .train.runs_cli import mount as _mount_run_commands  # noqa: E402

_mount_run_commands(main)


def _mount_style_command():
    from .visualize.style_cli import mount
    mount(main)


_mount_style_command()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
