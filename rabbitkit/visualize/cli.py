"""``rabbit layers``, ``rabbit dream`` and ``rabbit visualize``: argument parsing only;
each calls the Python API of :mod:`rabbitkit.visualize` and writes through
:mod:`rabbitkit.visualize.common` (PNG and per-step CSV, atomically, after the
work is done, so an error leaves nothing half-written)."""
import json
import pathlib

import click

from ..errors import ConfigError, DataError


def model_options(command):
    command = click.option("--which", type=click.Choice(["best", "last"]), default="best", show_default=True,
                           help="Checkpoint of a run directory.")(command)
    return click.option("--arch", help="Architecture of a weights file (zoo net name).")(command)


def device_option(command):
    return click.option("--device", default="cpu", show_default=True,
                        help="cpu or cuda: where the model runs (the image steps stay on the host).")(command)


def place(loaded, device):
    """Move a LoadedModel's net to ``device`` ("cpu" or "cuda"); a bad name is one line."""
    from ..backend import DEVICES

    if device not in DEVICES:
        raise ConfigError(f"--device '{device}': expected one of {', '.join(DEVICES)}")
    if device != "cpu":
        loaded.model.to(device)
    return loaded


def open_model(spec, arch, which, device="cpu"):
    from ..pretrained import open_model as resolve

    load_plugins()
    return place(resolve(spec, arch=arch, which=which), device)


def load_plugins():
    """Load the ``-p`` plugin modules of the current ``rabbit`` invocation (objectives, regularisers)."""
    context = click.get_current_context(silent=True)
    if context is not None and context.find_root().obj:
        from ..cli import _manager

        _manager(context.find_root())


def output_path(out, suffix=".png"):
    """The output file, checked before any work: a .png in an existing folder."""
    out = pathlib.Path(out)
    if out.suffix.lower() != suffix:
        raise ConfigError(f"output '{out}' must end in {suffix}")
    if not out.parent.is_dir():
        raise DataError(f"output folder '{out.parent}' does not exist")
    return out


def parse_number_list(text, what, kind=float):
    try:
        return [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"{what} '{text}': expected comma-separated numbers") from None


def parse_options(pairs):
    """``key=value`` pairs; values read as JSON where they parse (numbers, lists, true), else strings."""
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"option '{pair}': expected KEY=VALUE")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


@click.command("layers")
@click.argument("model")
@model_options
def layers_command(model, arch, which):
    """Print every layer of MODEL: dotted name (what --layer takes), type, output shape, parameters.

    MODEL: a run directory (its best checkpoint), a rabbitkit checkpoint, or a weights file with --arch.
    """
    from .layer_table import format_rows, layer_rows

    loaded = open_model(model, arch, which)
    click.echo(format_rows(layer_rows(loaded.model, loaded.input_shape)))


def build_objective(layers, layer_weights, channel, unit, class_index, objective_name, options, minimise):
    """The objective the dream options describe."""
    from .deepdream import resolve_objective
    from .objectives import Channel, ClassLogit, Unit, WeightedSum, build

    chosen = [flag for flag, value in (("--channel", channel), ("--unit", unit), ("--class", class_index),
                                       ("--objective", objective_name)) if value is not None]
    if len(chosen) > 1:
        raise ConfigError(f"{' and '.join(chosen)} exclude each other; pick one objective")
    single = layers[0] if len(layers) == 1 else None
    if (channel is not None or unit is not None) and single is None:
        raise ConfigError(f"{chosen[0]} needs exactly one --layer, got {len(layers)}")
    if channel is not None:
        objective = Channel(single, channel)
    elif unit is not None:
        parts = parse_number_list(unit, "--unit", int)
        if len(parts) not in (1, 3):
            raise ConfigError(f"--unit '{unit}': expected CHANNEL or CHANNEL,ROW,COLUMN")
        objective = Unit(single, parts[0], parts[1:] or None)
    elif class_index is not None:
        objective = ClassLogit(class_index, layer=single or "")
    elif objective_name is not None:
        objective = build(objective_name, **({"layer": single, **options} if single is not None else options))
    elif layers:
        weights = parse_number_list(layer_weights, "--layer-weights") if layer_weights else None
        objective = resolve_objective(None, layers if len(layers) > 1 else layers[0], weights)
    else:
        raise ConfigError("give --layer NAME (see `rabbit layers MODEL`), --class K or --objective NAME")
    return WeightedSum([(-1.0, objective)]) if minimise else objective


@click.command("dream")
@click.argument("model")
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="Output PNG (CSV beside it).")
@click.option("--layer", "layers", multiple=True, help="Layer to dream on (repeat to sum several).")
@click.option("--layer-weights", help="Weights of the --layer terms, e.g. 1,0.5.")
@click.option("--channel", type=int, help="Maximise one channel of the layer.")
@click.option("--unit", help="Maximise one unit: CHANNEL or CHANNEL,ROW,COLUMN.")
@click.option("--class", "class_index", type=int, help="Maximise a class logit (at the model's input size).")
@click.option("--objective", "objective_name", help="A registered objective (e.g. a plugin's) by name.")
@click.option("--option", "objective_options", multiple=True, metavar="KEY=VALUE", help="Option of --objective.")
@click.option("--minimise", is_flag=True, help="Minimise the objective instead.")
@click.option("--guide", type=click.Path(dir_okay=False), help="Guide image (the notebook's objective_guide).")
@click.option("--octaves", type=int, default=None, help="Number of octaves [4; 1 with --class].")
@click.option("--octave-scale", type=float, default=1.4, show_default=True)
@click.option("--steps", type=int, default=10, show_default=True, help="Steps per octave.")
@click.option("--step-size", type=float, default=1.5, show_default=True, help="Step / mean |gradient|, in 0..255 pixel levels.")
@click.option("--jitter", type=int, default=32, show_default=True, help="Random roll, pixels.")
@click.option("--no-clip", is_flag=True, help="Do not clip pixels to the model's input range.")
@click.option("--tile-size", type=int, help="Gradients in tiles of this many pixels (bounded memory).")
@click.option("--size", type=int, help="Resize the image's shorter side first.")
@click.option("--frames", type=int, default=1, show_default=True, help="Zoom loop: frames to write.")
@click.option("--zoom", type=float, default=0.05, show_default=True, help="Zoom per frame.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the jitter and tile shifts.")
@device_option
@model_options
def dream_command(model, image, out, layers, layer_weights, channel, unit, class_index, objective_name,
                  objective_options, minimise, guide, octaves, octave_scale, steps, step_size, jitter, no_clip,
                  tile_size, size, frames, zoom, seed, device, arch, which):
    """Deep Dream IMAGE with MODEL (google/deepdream's algorithm) into OUT (PNG) and its CSV log.

    MODEL: a run directory (its best checkpoint), a rabbitkit checkpoint, or a weights file with --arch.
    """
    from . import common
    from .deepdream import dream_frames
    from .subject import Subject

    out = output_path(out)
    pixels = common.load_image(image, size=size)
    guide_pixels = common.load_image(guide, size=size) if guide else None
    loaded = open_model(model, arch, which, device)
    options = dict(clip=not no_clip, tile_size=tile_size, seed=seed, log=common.StepLog(),
                   octaves=4 if octaves is None else octaves, octave_scale=octave_scale, steps=steps,
                   step_size=step_size, jitter=jitter)
    if guide_pixels is not None:
        if len(layers) != 1 or any(v is not None for v in (layer_weights, channel, unit, class_index, objective_name)):
            raise ConfigError("--guide takes exactly one --layer and no other objective option")
        images = dream_frames(loaded, pixels, frames, zoom, layers[0], guide=guide_pixels, minimise=minimise,
                              **options)
    else:
        objective = build_objective(list(layers), layer_weights, channel, unit, class_index, objective_name,
                                    parse_options(objective_options), minimise)
        if class_index is not None:
            if octaves not in (None, 1):
                raise ConfigError("--class dreams at the model's input size: use --octaves 1")
            options["octaves"] = 1
            subject = Subject(loaded)
            pixels = subject.to_output(subject.to_input(pixels, model_size=True))
        images = dream_frames(loaded, pixels, frames, zoom, objective=objective, **options)
    log = options["log"]
    if frames == 1:
        written = common.save_image_and_log(out, images[0], log)
    else:
        for index, frame in enumerate(images):
            common.write_png(out.with_name(f"{out.stem}_{index:04d}.png"), frame)
        written = (out.with_name(f"{out.stem}_{{0000..{frames - 1:04d}}}.png"), log.write(common.csv_path_for(out)))
    click.echo(f"wrote {written[0]} and {written[1]}")


@click.command("visualize")
@click.argument("model", metavar="RUN")
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False), help="Output PNG (CSV beside it).")
@click.option("--classes", default="all", show_default=True, help="'all' or class indices, e.g. 0,14,3.")
@click.option("--preset", type=click.IntRange(1, 4), default=3, show_default=True,
              help="Yosinski et al. 2015 Table 1 regulariser set.")
@click.option("--steps", type=int, help="Steps (default: the preset's).")
@click.option("--regularizer", "regularizers", multiple=True, metavar="NAME[:KEY=VALUE,...]",
              help="Image regularisers by name instead of the preset's (repeatable; plugins' too).")
@click.option("--saliency", "saliency_images", multiple=True, type=click.Path(dir_okay=False),
              help="Instead: saliency maps of these images (repeatable).")
@click.option("--batch-size", type=int, default=16, show_default=True, help="Classes optimised together.")
@click.option("--columns", type=int, help="Tiles per row of the grid.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the starting noise.")
@device_option
@model_options
def visualize_command(model, out, classes, preset, steps, regularizers, saliency_images, batch_size, columns, seed,
                      device, arch, which):
    """Class models of RUN (activation maximisation from noise, one titled tile per class)
    or, with --saliency, gradient saliency maps beside the images; PNG plus CSV.

    \b
    RUN may be any MODEL: a run directory, a rabbitkit checkpoint, or a weights file with --arch.
    """
    from . import common
    from .pictures import class_models_picture, saliency_picture

    out = output_path(out)
    if saliency_images:
        pictures = [common.load_image(path) for path in saliency_images]
        loaded = open_model(model, arch, which, device)
        grid, log = saliency_picture(loaded, pictures, [pathlib.Path(p).name for p in saliency_images], columns)
    else:
        loaded = open_model(model, arch, which, device)
        from .classes import class_models

        log = common.StepLog()
        result = class_models(loaded, classes, preset=preset, steps=steps, seed=seed, log=log, batch_size=batch_size,
                              regularizers=[regularizer_from_text(t) for t in regularizers] or None)
        grid = class_models_picture(result, columns)
    written = common.save_image_and_log(out, grid, log)
    click.echo(f"wrote {written[0]} and {written[1]}")


def regularizer_from_text(text):
    """``blur:sigma=1,every=4`` -> the registered image regulariser with those options."""
    from .regularizers import build

    name, _, rest = text.partition(":")
    return build(name, **parse_options([part for part in rest.split(",") if part]))


def mount(main):
    """Add the visualisation commands to the ``rabbit`` group."""
    for command in (layers_command, dream_command, visualize_command):
        main.add_command(command)
