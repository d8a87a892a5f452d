"""From a resolved config to live objects: dataset, model, loss, optimizer, ...

Every name is resolved through the plugin registries, and every option is
checked against the plugin's signature before anything heavy runs.
"""
import collections
import contextlib
import inspect

import numpy as np

from ..errors import CheckpointError, ConfigError, WeightsError
from ..plugins import get_manager
from .config import check_plugin_options, factory_parameters, named_spec
from .schedules import get_schedule

# First constructor arguments that the builder fills from the incoming shape.
SHAPE_ARGUMENTS = {
    "in_features": lambda shape: shape[-1],
    "input_size": lambda shape: shape[-1],
    "in_channels": lambda shape: shape[0],
    "num_features": lambda shape: shape[0],
    "num_channels": lambda shape: shape[0],
}


@contextlib.contextmanager
def blame(config, where):
    """Re-raise a plugin's ConfigError or ValueError as one line naming the file and section."""
    path = str(config["source"])
    try:
        yield
    except ConfigError as err:
        if str(err).startswith(path):
            raise
        raise ConfigError(f"{path}: {where}: {err}") from None
    except ValueError as err:
        raise ConfigError(f"{path}: {where}: {err}") from None


def build_dataset(config, manager=None):
    manager = manager or get_manager()
    path = config["source"]
    data = config["data"]
    factory = manager.registry("datasets").get(data["dataset"])
    options = dict(data["options"])
    check_plugin_options(factory, options, "data", path, data["dataset"])
    params, _ = factory_parameters(factory)
    if "seed" in params and "seed" not in options:
        options["seed"] = config["experiment"]["seed"]
    with blame(config, "data"):
        return factory(**options)


def build_model(config, input_shape, num_outputs, manager=None):
    """The architecture (with its options) or the explicit layer list, unplaced (CPU)."""
    manager = manager or get_manager()
    path = config["source"]
    model_cfg = config["model"]
    dtype = np.dtype(config["experiment"]["dtype"])
    if model_cfg["architecture"] is not None:
        name = model_cfg["architecture"]
        factory = manager.registry("architectures").get(name)
        check_plugin_options(factory, model_cfg["options"], "model", path, name)
        with blame(config, "model"):
            model = factory(tuple(input_shape), num_outputs, dtype=dtype, **model_cfg["options"])
    else:
        model = build_layers(model_cfg["layers"], input_shape, dtype, path, manager)
    from ..layers.sequential import Sequential

    if not isinstance(model, Sequential):
        model = Sequential([model], dtype=dtype)
    return model


def build_layers(specs, input_shape, dtype, path, manager):
    from ..layers.sequential import Sequential

    registry = manager.registry("layers")
    layers = []
    shape = tuple(input_shape)
    for index, spec in enumerate(specs):
        where = f"model.layers[{index}]"
        options = {k: v for k, v in spec.items() if k != "type"}
        cls = registry.get(spec["type"])
        params, _ = factory_parameters(cls)
        first = next(iter(params), None)
        if first in SHAPE_ARGUMENTS and first not in options:
            options[first] = int(SHAPE_ARGUMENTS[first](shape))
        check_plugin_options(cls, options, where, path, spec["type"])
        try:
            layer = cls(**options, dtype=dtype) if "dtype" in inspect.signature(cls).parameters else cls(**options)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{path}: {where} ({spec['type']}): {err}") from None
        try:
            shape = layer.output_shape(shape)
        except Exception as err:  # the layer cannot take the incoming shape
            raise ConfigError(f"{path}: {where} ({spec['type']}) cannot take input of shape {shape}: {err}") from None
        layers.append(layer)
    return Sequential(layers, dtype=dtype)


def build_loss(config, task, manager=None):
    """``train.loss``: a name or ``{name = ..., options}``; unset picks the task's usual loss."""
    manager = manager or get_manager()
    default = "squared_error" if task == "regression" else "softmax_cross_entropy"
    name, options = named_spec(config["train"]["loss"] or default, "train.loss", config["source"])
    cls = manager.registry("losses").get(name)
    check_plugin_options(cls, options, "train.loss", config["source"], name)
    with blame(config, "train.loss"):
        return cls(**options)


# Optimizer arguments that come from [train] keys of the same name, never from train.optimizer's table.
OPTIMIZER_TRAIN_KEYS = ("lr", "weight_decay", "lr_mult", "decay_mult")
MULTIPLIER_KEYS = ("lr_mult", "decay_mult")


def build_optimizer(config, params, manager=None):
    manager = manager or get_manager()
    path = config["source"]
    train = config["train"]
    name, options = named_spec(train["optimizer"], "train.optimizer", path)
    cls = manager.registry("optimizers").get(name)
    for key in OPTIMIZER_TRAIN_KEYS:
        if key in options:
            raise ConfigError(f"{path}: train.optimizer.{key}: set it as train.{key} (the optimizer is given it from there)")
    check_plugin_options(cls, options, "train.optimizer", path, name, skip=("params", *OPTIMIZER_TRAIN_KEYS))
    multipliers = {key: train[key] for key in MULTIPLIER_KEYS if train[key]}
    if multipliers:
        accepted, any_keyword = factory_parameters(cls)
        for key in multipliers:
            if key not in accepted and not any_keyword:
                raise ConfigError(f"{path}: train.{key}: optimizer '{name}' takes no per-parameter multipliers")
        from ..optim import resolve_multipliers

        # Checked here as well as in the optimizer, so that a pattern's error is said under [train]
        # (where the user wrote it) rather than under train.optimizer.
        with blame(config, "train"):
            resolve_multipliers(params, train["lr_mult"], train["decay_mult"])
    with blame(config, "train.optimizer"):
        return cls(params, lr=train["lr"], weight_decay=train["weight_decay"], **multipliers, **options)


def multiplier_summary(optimizer):
    """The log line saying how many parameters each lr_mult / decay_mult factor other than 1
    reached (None when none did): a pattern that caught more or less than meant shows here."""
    params = optimizer.params
    weight_factors = [f for f, param in zip(getattr(optimizer, "decay_factors", ()), params) if param.role == "weight"]
    parts = []
    for label, factors, what in (("lr_mult", getattr(optimizer, "lr_factors", ()), "parameters"),
                                 ("decay_mult", weight_factors, "weights")):
        counts = collections.Counter(factor for factor in factors if factor != 1.0)
        if counts:
            parts.append(f"{label} " + ", ".join(f"{factor:g} on {count} of {len(factors)} {what}"
                                                 for factor, count in counts.items()))
    return "; ".join(parts) or None


def build_regularizers(config, manager=None):
    manager = manager or get_manager()
    path = config["source"]
    train = config["train"]
    registry = manager.registry("regularizers")
    specs = list(train["regularizers"])
    for shorthand in ("l2", "l1"):
        if train[shorthand] > 0:
            specs.append({"name": shorthand, "strength": train[shorthand]})
    regularizers = []
    for index, spec in enumerate(specs):
        where = f"train.regularizers[{index}]"
        name, options = named_spec(spec, where, path)
        cls = registry.get(name)
        check_plugin_options(cls, options, where, path, name)
        with blame(config, where):
            regularizers.append(cls(**options))
    return regularizers


def build_schedule(config):
    path = config["source"]
    train = config["train"]
    name, options = named_spec(train["schedule"] or "constant", "train.schedule", path)
    cls = get_schedule(name)
    check_plugin_options(cls, options, "train.schedule", path, name, skip=("base_lr", "epochs"))
    with blame(config, "train.schedule"):
        return cls(train["lr"], train["epochs"], **options)


def initialize(config, model, rng):
    """Apply [init] (a default initializer and per-parameter overrides), if set."""
    init = config["init"]
    if init["default"] is None and not init["overrides"]:
        return
    from ..initializers import initialize as apply_initializers

    with blame(config, "init"):
        apply_initializers(model, default=init["default"], overrides=init["overrides"], rng=rng, bias=init["bias"])


def head_name(config, model, manager=None):
    """The output layer a new number of classes replaces: the architecture's pretrained
    head, else the last layer holding parameters."""
    name = config["model"]["architecture"]
    if name is not None:
        layout = getattr((manager or get_manager()).registry("architectures").get(name), "pretrained", None)
        if layout is not None:
            return layout.head
    holders = [path for path, layer in model.named_layers() if layer.params]
    return holders[-1] if holders else None


def load_pretrained(config, model, manager=None):
    """Copy ``[model] weights`` into the model; returns the log line (None without weights)."""
    from ..loading import load_into
    from ..pretrained import read_state

    model_cfg = config["model"]
    path = model_cfg["weights"]
    if path is None:
        return None
    label = model_cfg["architecture"] or "the model"
    try:
        with blame(config, "model.weights"):
            state = read_state(path, model, label)
            report = load_into(model, state, path, label, model_cfg["strict"], head=head_name(config, model, manager))
    except (CheckpointError, WeightsError) as err:  # the file's own one line, said where it came from
        raise type(err)(f"{config['source']}: model.weights: {err}") from None
    return f"pretrained weights {path}: {report.summary()}"


def freeze_layers(config, model):
    """Freeze ``[train] freeze`` patterns; returns the log line (None when nothing is frozen)."""
    patterns = config["train"]["freeze"]
    if not patterns:
        return None
    from ..layers.base import freeze

    with blame(config, "train.freeze"):
        names = freeze(model, [str(p) for p in patterns])
    return f"frozen: {len(names)} layers matching {', '.join(map(str, patterns))}"


def build_visualizers(config, manager=None):
    manager = manager or get_manager()
    registry = manager.registry("visualizers")
    return [(name, registry.get(name)) for name in config["output"]["visualizers"]]
