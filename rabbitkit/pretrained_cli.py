"""``rabbit weights inspect|convert|export`` and ``rabbit predict``: pretrained weights
from the command line (see docs/pretrained.md).

Mounted in the main CLI by ``_mount_pretrained_commands``; every command calls
:mod:`rabbitkit.pretrained`.
"""
import click


def _options(pairs):
    """``("aux_logits=true",)`` -> ``{"aux_logits": True}`` (values are TOML, as ``--set``)."""
    from .train.config import parse_override

    options = {}
    for text in pairs:
        keys, value = parse_override(text)
        options[".".join(keys)] = value
    return options


OPTION = click.option("--option", "options", multiple=True, metavar="KEY=VALUE",
                      help="An architecture option, e.g. aux_logits=true (repeatable).")


@click.group("weights")
def weights_group():
    """Inspect, convert and export pretrained weights (safetensors, PyTorch, Caffe)."""


@weights_group.command("inspect")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--no-match", is_flag=True, help="Skip looking for the zoo architecture the file fits.")
def inspect_command(file, no_match):
    """Format, tensors (shapes, dtypes), parameter count, and the architecture FILE fits."""
    import numpy as np

    from .pretrained import match_architecture
    from .weights import read_weights

    weights = read_weights(file)
    total = sum(int(np.prod(a.shape)) for a in weights.tensors.values())
    click.echo(f"{file}: {weights.format}, {len(weights.tensors)} tensors, {total:,} values")
    width = max((len(n) for n in weights.tensors), default=0)
    for name, array in weights.tensors.items():
        click.echo(f"  {name:<{width}}  {str(array.dtype):<8} {'x'.join(map(str, array.shape)) or 'scalar'}")
    if no_match:
        return
    match = match_architecture(weights)
    if match is None:
        click.echo("architecture: matches no zoo net (load it with --arch and strict = false to see what differs)")
    else:
        arch, options, outputs = match
        extra = "".join(f" --option {k}={str(v).lower()}" for k, v in options.items())
        click.echo(f"architecture: {arch} ({outputs} outputs){extra}")


@weights_group.command("convert")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--arch", required=True, help="Architecture the weights belong to (e.g. vgg16, bvlc_googlenet).")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="The rabbitkit checkpoint to write.")
@click.option("--no-strict", is_flag=True, help="Allow missing and unused tensors (listed).")
@OPTION
def convert_command(file, arch, output, no_strict, options):
    """Write FILE's weights as a standalone rabbitkit checkpoint (arch, preprocessing, classes inside)."""
    from .pretrained import load_weights, save_model

    loaded, report = load_weights(file, arch, strict=not no_strict, **_options(options))
    save_model(output, loaded, source=file)
    click.echo(f"{report.summary()}; wrote {output} ({arch}, {loaded.model.num_parameters():,} parameters)")


@weights_group.command("export")
@click.argument("model")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="The safetensors file to write.")
@click.option("--names", type=click.Choice(["torch", "rabbitkit"]), default="torch", show_default=True,
              help="torch: names and layouts torch.nn's load_state_dict accepts; rabbitkit: the state dict as is.")
@click.option("--arch", default=None, help="Architecture, when MODEL is a weights file.")
@click.option("--checkpoint", "which", type=click.Choice(["best", "last"]), default="best", show_default=True)
def export_command(model, output, names, arch, which):
    """Export MODEL's weights (run directory, checkpoint, or weights with --arch) as plain safetensors."""
    from .export import save_safetensors, torch_state_dict
    from .pretrained import open_model

    loaded = open_model(model, arch=arch, which=which)
    tensors = torch_state_dict(loaded.model) if names == "torch" else loaded.model.state_dict()
    save_safetensors(output, tensors, {"arch": loaded.arch or "", "exported_from": model, "names": names})
    click.echo(f"wrote {output}: {len(tensors)} tensors ({names} names)")


@click.command("predict")
@click.argument("model")
@click.argument("images", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--top", default=5, show_default=True, type=click.IntRange(min=1), help="Classes to list per image.")
@click.option("--arch", default=None, help="Architecture, when MODEL is a weights file.")
@click.option("--checkpoint", "which", type=click.Choice(["best", "last"]), default="best", show_default=True)
@OPTION
def predict(model, images, top, arch, which, options):
    """Class names and probabilities for each IMAGE under MODEL (run directory, checkpoint, or weights + --arch)."""
    from .pretrained import open_model

    loaded = open_model(model, arch=arch, which=which, **_options(options))
    for path in images:
        click.echo(f"{path}:")
        for name, probability in loaded.predict([path], top=top)[0]:
            click.echo(f"  {probability:8.4f}  {name}")
