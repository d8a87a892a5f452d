"""``rabbit run --dry-run``: the resolved configuration and the model summary, no training."""
from . import builder
from .config import dump_toml
from .feeders import make_feeder


def describe(config, manager):
    """Resolve every plugin name and option, build the model, and describe it."""
    dataset = builder.build_dataset(config, manager)
    with builder.blame(config, "data"):
        feeder = make_feeder(dataset, config)
    model = builder.build_model(config, feeder.input_shape, feeder.num_outputs, manager)
    builder.build_loss(config, dataset.task, manager)
    frozen = builder.freeze_layers(config, model)  # as a run does: the optimizer sees only trained parameters
    optimizer = builder.build_optimizer(config, model.parameters(), manager)
    builder.build_regularizers(config, manager)
    builder.build_schedule(config)
    builder.build_visualizers(config, manager)
    return "\n".join([
        "# resolved configuration",
        dump_toml(config),
        f"# model (input {feeder.input_shape}, {feeder.num_outputs} outputs)",
        model.summary(feeder.input_shape),
        *(f"# {line}" for line in (frozen, builder.multiplier_summary(optimizer)) if line),
    ])
