"""``rabbit style``: neural style transfer from the command line (argument parsing only;
the work is :func:`rabbitkit.visualize.style.style_transfer`)."""
import click

from ..errors import ConfigError
from .cli import device_option, place
from .style import DEFAULT_CONTENT_LAYERS, DEFAULT_STYLE_LAYERS


def _numbers(text, what, kind=float):
    try:
        values = [kind(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"{what} '{text}': expected comma-separated {'integers' if kind is int else 'numbers'}") from None
    if not values:
        raise ConfigError(f"{what} '{text}': expected at least one value")
    return values


@click.command("style")
@click.argument("model")
@click.option("--arch", help="Architecture of a weights file (e.g. vgg19).")
@click.option("--content", required=True, metavar="IMAGE", help="The content image.")
@click.option("--style", "styles", multiple=True, required=True, metavar="IMAGE",
              help="A style image (repeatable; several are blended).")
@click.option("--style-blend", metavar="W1,W2,...", help="One weight per style image, normalised to sum 1 (default equal).")
@click.option("-o", "--output", required=True, metavar="OUT.png", help="Output PNG; the per-step CSV goes beside it.")
@click.option("--content-layers", default=",".join(DEFAULT_CONTENT_LAYERS), show_default=True,
              help="Comma-separated layer names (dotted names, aliases, or neural-style's VGG-19 names).")
@click.option("--style-layers", default=",".join(DEFAULT_STYLE_LAYERS), show_default=True)
@click.option("--content-weight", default=5.0, show_default=True, type=float)
@click.option("--style-weight", default=100.0, show_default=True, type=float)
@click.option("--tv-weight", default=1e-3, show_default=True, type=float)
@click.option("--iterations", default=1000, show_default=True, type=int, help="Optimiser iterations per scale.")
@click.option("--optimizer", default="lbfgs", show_default=True, help="lbfgs (scipy's L-BFGS-B) or adam.")
@click.option("--learning-rate", default=10.0, show_default=True, type=float, help="Adam's step, in 0-255 pixel units.")
@click.option("--lbfgs-memory", default=10, show_default=True, type=int, help="L-BFGS correction pairs.")
@click.option("--init", default="content", show_default=True, metavar="content|noise|IMAGE")
@click.option("--original-colors", is_flag=True, help="Keep the content image's colours (luminance-only transfer).")
@click.option("--style-scale", default=1.0, show_default=True, type=float, help="Style image size relative to the output.")
@click.option("--image-size", default=512, show_default=True, type=int, help="Longest side of the output.")
@click.option("--scales", metavar="S1,S2,...", help="Coarse-to-fine longest sides, e.g. 256,512 (overrides --image-size).")
@click.option("--pooling", default="max", show_default=True, help="max, or avg (max pooling swapped for average).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the noise initialisation.")
@device_option
@click.option("--quiet", is_flag=True, help="No progress bar.")
def style(model, arch, content, styles, style_blend, output, content_layers, style_layers, content_weight,
          style_weight, tv_weight, iterations, optimizer, learning_rate, lbfgs_memory, init, original_colors,
          style_scale, image_size, scales, pooling, seed, device, quiet):
    """Neural style transfer: paint the --content image in the manner of the --style images.

    MODEL is a run directory, a rabbitkit checkpoint, or a weights file with --arch.
    """
    from ..pretrained import open_model
    from .style import style_transfer

    blend = _numbers(style_blend, "--style-blend") if style_blend else None
    sizes = _numbers(scales, "--scales", int) if scales else [image_size]
    loaded = place(open_model(model, arch=arch), device)
    result = style_transfer(
        loaded, content, list(styles), output=output, content_layers=content_layers, style_layers=style_layers,
        style_blend=blend, content_weight=content_weight, style_weight=style_weight, tv_weight=tv_weight,
        iterations=iterations, optimizer=optimizer, learning_rate=learning_rate, lbfgs_memory=lbfgs_memory,
        init=init, style_scale=style_scale, original_colors=original_colors, scales=sizes, pooling=pooling,
        seed=seed, progress=False if quiet else None)
    terms = result.losses
    click.echo(f"content {terms['content']:.6g}  style {terms['style']:.6g}  tv {terms['tv']:.6g}  "
               f"total {terms['total']:.6g}")
    for path in result.files:
        click.echo(f"wrote {path}")


def mount(group):
    """Add ``rabbit style`` to the ``rabbit`` command group."""
    group.add_command(style)
