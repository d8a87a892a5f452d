"""``rabbit data``: fetch datasets and inspect them.

Mounted in the main CLI with ``main.add_command(data_group)``.
"""
import inspect

import click

from ..errors import RabbitError


def _fail(err):
    raise click.ClickException(str(err))


@click.group("data")
def data_group():
    """Download datasets and show what a dataset holds."""


@data_group.command("list")
def list_command():
    """List the registered datasets (built-in and plugins)."""
    from ..plugins import registry

    reg = registry("datasets")
    for name in reg.names():
        click.echo(f"{name}  ({reg.provider(name)})")


@data_group.command("fetch")
@click.argument("name")
@click.option("--dest", type=click.Path(file_okay=False), default=None,
              help="Folder to download into (default: the per-user data folder).")
def fetch_command(name, dest):
    """Download the official archives of dataset NAME (gtsrb, cifar10), verified, resumable."""
    from .fetch import fetch_dataset

    try:
        folder = fetch_dataset(name, dest)
    except RabbitError as err:
        _fail(err)
    click.echo(f"{name}: archives verified in {folder}")


@data_group.command("info")
@click.argument("name")
@click.option("--path", "path", default=None, help="The dataset's file or folder (its 'path' option).")
def info_command(name, path):
    """Print the splits of dataset NAME with counts per class."""
    from ..plugins import registry

    try:
        factory = registry("datasets").get(name)
        options = {"path": path} if path is not None else {}
        if "download" in inspect.signature(factory).parameters:
            options["download"] = False  # 'info' only looks: say how to provide a missing dataset
        dataset = factory(**options)
    except RabbitError as err:
        _fail(err)
    click.echo(dataset.summary())
