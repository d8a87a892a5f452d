"""``rabbit runs`` and ``rabbit compare``: living with many run directories."""
import click

from .runs import SORT_KEYS


@click.command(name="runs")
@click.argument("folder", default="runs", type=click.Path(file_okay=False))
@click.option("--sort", "sort_key", default="started", show_default=True, metavar="KEY",
              help=f"One of {', '.join(SORT_KEYS)} (newest / best first), or any resolved config key.")
@click.option("--filter", "filters", multiple=True, metavar="KEY=VALUE",
              help="Only runs whose resolved config has this value, e.g. train.lr=0.01 (repeatable: all must hold).")
@click.option("--csv", "as_csv", is_flag=True, help="Print CSV (every column, full precision) instead of a table.")
def runs_command(folder, sort_key, filters, as_csv):
    """One line per run directory under FOLDER (default: runs): start, status, epochs, best and test metric."""
    from .runs import apply_filters, find_runs, format_runs, runs_csv, sort_runs

    found = sort_runs(apply_filters(find_runs(folder), filters), sort_key)
    if as_csv:
        click.echo(runs_csv(found), nl=False)
    elif not found:
        click.echo(f"no run directories under {folder}" + (" match the filters" if filters else ""))
    else:
        click.echo(format_runs(found))


@click.command(name="compare")
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("-o", "--output", default="compare.png", show_default=True, type=click.Path(dir_okay=False),
              help="PNG to write the overlaid learning curves to.")
def compare_command(run_dirs, output):
    """Overlay the learning curves of RUN_DIRS; print their config differences and final metrics."""
    from .compare import compare_runs

    text, written = compare_runs(run_dirs, output)
    click.echo(text)
    click.echo(f"wrote {written}")


def mount(group):
    """Add the commands to the ``rabbit`` group."""
    group.add_command(runs_command)
    group.add_command(compare_command)
