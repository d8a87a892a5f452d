"""Experiment files: TOML in, a validated and fully resolved config dict out.

Every key of the fixed sections is declared in :data:`SCHEMA` (its type, default,
range and help text; docs/experiments.md is written from it).  Options handed to
plugins (dataset, architecture, layers, optimizer, ...) are validated against
the plugin factory's own signature, so a plugin gets checking for free.

All errors are :class:`~rabbitkit.errors.ConfigError` with one line naming the
file, the dotted key path and what was expected.
"""
import copy
import hashlib
import inspect
import json
import math
import pathlib
import types
import typing

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

from ..errors import ConfigError, did_you_mean

ANY = object()


class Key:
    """One schema entry: accepted types, default, numeric range, allowed choices, help.

    ``values``: for a table whose keys are free (patterns), the :class:`Key` every value is checked against.
    """

    def __init__(self, types_, default=None, *, required=False, minimum=None, exclusive_minimum=None,
                 maximum=None, choices=None, values=None, help=""):
        self.types = types_ if isinstance(types_, tuple) else (types_,)
        self.default = default
        self.required = required
        self.minimum = minimum
        self.exclusive_minimum = exclusive_minimum
        self.maximum = maximum
        self.choices = choices
        self.values = values
        self.help = help

    def describe(self):
        if self.values is not None:
            return f"a table, each value {self.values.describe()}"
        names = " or ".join(_type_name(t) for t in self.types)
        if self.choices:
            names = "one of " + ", ".join(repr(c) for c in self.choices)
        if self.exclusive_minimum is not None:
            names += f" > {self.exclusive_minimum}"
        elif self.minimum is not None:
            names += f" >= {self.minimum}"
        if self.maximum is not None:
            names += f" <= {self.maximum}"
        return names


def _type_name(t):
    return {str: "a string", int: "an integer", float: "a number", bool: "true/false", list: "a list",
            dict: "a table", type(None): "nothing"}.get(t, getattr(t, "__name__", str(t)))


# Sections whose extra keys are options of a plugin (validated against its signature).
OPEN_SECTIONS = {"data": "dataset", "model": "architecture"}

SCHEMA = {
    "experiment": {
        "name": Key(str, "experiment", help="Name of the run; the run directory starts with it."),
        "seed": Key(int, 0, minimum=0, help="Seed for initialisation, shuffling, augmentation and dropout."),
        "device": Key(str, "cpu", choices=("cpu", "cuda"), help="Backend the model runs on."),
        "threads": Key(int, 0, minimum=0, help="Threads for Numba kernels (0 = all cores); BLAS keeps its own setting."),
        "dtype": Key(str, "float32", choices=("float32", "float64"), help="Floating-point type of the model."),
        "tune": Key(bool, True, help="Time kernel variants on first use of a shape and keep the fastest (cached per machine); false: built-in defaults, bit-reproducible runs (RABBIT_TUNE=0 does the same)."),
        "kernel_choices": Key(str, None, help="Take the kernel variants another run chose: its folder (or its kernel_choices.json), relative to the working directory; with the same seed on the same machine the run repeats it bit for bit. Shapes it does not name are tuned as usual."),
    },
    "data": {
        "dataset": Key(str, required=True, help="Dataset plugin name (`rabbit plugins`); its options go in this table too."),
        "preprocess": Key(list, [], help="Preprocessing steps fitted on training data, e.g. [\"scale\", \"standardize\"]."),
        "augment": Key(dict, {}, help="Training-time augmentation options (see docs/data.md)."),
    },
    "model": {
        "architecture": Key(str, None, help="Architecture plugin name; its options go in this table too."),
        "layers": Key(list, None, help="Explicit layer list instead of an architecture: [[model.layers]] type = \"Dense\" ..."),
        "weights": Key(str, None, help="Start from these weights: a weights file (safetensors, PyTorch, Caffe) or a rabbitkit checkpoint, relative to the working directory (docs/pretrained.md)."),
        "strict": Key(bool, True, help="With `weights`: every parameter must come from the file and every tensor in it be used (a head of another size is re-initialised either way)."),
    },
    "init": {
        "default": Key((str, dict), None, help="Initializer for every weight (name or {name=..., options}); unset keeps each layer's own."),
        "bias": Key(float, 0.0, help="Constant every bias starts at when `default` is set."),
        "overrides": Key(dict, {}, help="Parameter-name patterns to initializers, e.g. {\"0.weight\" = \"xavier_uniform\"}."),
    },
    "train": {
        "epochs": Key(int, 10, minimum=1, help="Number of passes over the training set."),
        "batch_size": Key(int, 64, minimum=1, help="Samples per step (streams per step for language models)."),
        "eval_batch_size": Key(int, 256, minimum=1, help="Samples per step when evaluating."),
        "loss": Key((str, dict), None, help="Loss plugin name or {name=..., options} (e.g. ignore_index); "
                                            "default by task (softmax_cross_entropy or squared_error)."),
        "optimizer": Key((str, dict), "sgd", help="Optimizer name or {name=..., options} (e.g. momentum, nesterov, betas)."),
        "lr": Key(float, 0.01, exclusive_minimum=0.0, help="Learning rate."),
        "weight_decay": Key(float, 0.0, minimum=0.0, help="Optimizer weight decay on weights (not biases)."),
        "schedule": Key((str, dict), None, help="Learning-rate schedule: step, cosine or plateau, with options."),
        "regularizers": Key(list, [], help="Regularizers: [{name=\"l2\", strength=1e-4}, ...]."),
        "l2": Key(float, 0.0, minimum=0.0, help="Shorthand for an L2 regularizer of this strength (lambda/2 ||w||^2)."),
        "l1": Key(float, 0.0, minimum=0.0, help="Shorthand for an L1 regularizer of this strength."),
        "clip_grad_norm": Key(float, None, exclusive_minimum=0.0, help="Clip gradients to this global norm."),
        "divergence_factor": Key(float, 1000.0, minimum=0.0,
                                 help="Stop as diverged when an epoch's training loss exceeds this multiple (> 1) of "
                                      "the first step's loss (char-rnn's rule); 0 turns it off. NaN/inf always stop."),
        "early_stopping": Key(dict, None, help="{patience = N, metric = \"val_loss\", min_delta = 0.0}."),
        "seq_len": Key(int, 50, minimum=1, help="Truncated-BPTT length for language models."),
        "max_steps_per_epoch": Key(int, 0, minimum=0, help="Cap on steps per epoch (0 = whole training set)."),
        "monitor": Key(str, None, help="Metric that picks the best checkpoint (default: val_accuracy or val_loss)."),
        "test_checkpoint": Key(str, "best", choices=("best", "last"), help="Checkpoint tested at the end of the run (and by `rabbit eval` by default): the best by `monitor`, or the last epoch's (the natural choice after a schedule that anneals to zero, when the validation split is small)."),
        "freeze": Key(list, [], help="Layer-name patterns to keep fixed, e.g. [\"features.*\"]: frozen layers compute no weight gradients."),
        "lr_mult": Key(dict, {}, values=Key(float, minimum=0.0),
                       help="Per-parameter learning-rate factors (Caffe's lr_mult): layer- or parameter-name patterns to "
                            "a factor on the scheduled lr, e.g. {\"0.0\" = 0.1}; the first matching pattern wins, 1 elsewhere."),
        "decay_mult": Key(dict, {}, values=Key(float, minimum=0.0),
                          help="Per-parameter factors on `weight_decay` (Caffe's decay_mult), patterns as `lr_mult`; "
                               "weight decay acts on weights only."),
    },
    "eval": {
        "tta": Key((str, list), "none", help="Test-time augmentation at the end of a run: \"none\", \"shifts\", \"standard\", \"dense\" or a list of {shift=[dx, dy], scale, rotate} views (averaged softmax)."),
    },
    "output": {
        "dir": Key(str, "runs", help="Folder that receives run directories (relative to the working directory)."),
        "checkpoint_every": Key(int, 1, minimum=1, help="Write a checkpoint every N epochs (the last and best are kept)."),
        "visualizers": Key(list, ["curves", "filters"], help="Visualizer plugins run at the end of the run."),
        "progress": Key(bool, True, help="Show a progress bar when on a terminal."),
        "tensorboard": Key(bool, False, help="Also write TensorBoard event files into the run directory "
                                             "(needs the optional extra: pip install 'rabbitkit[tensorboard]')."),
    },
}

SUB_SCHEMAS = {
    ("train", "early_stopping"): {
        "patience": Key(int, 10, minimum=1, help="Epochs without improvement before stopping."),
        "metric": Key(str, None, help="Metric to watch (default: the monitor metric)."),
        "min_delta": Key(float, 0.0, minimum=0.0, help="Smallest change that counts as improvement."),
    },
}


def load_toml(path):
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: experiment file not found")
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML: {err}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None


def parse_override(text):
    """``"train.lr=0.01"`` -> (["train", "lr"], 0.01); values are TOML, bare words are strings."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key.path=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: expected key.path=value")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.split("."), value


def apply_overrides(raw, overrides, source="--set"):
    """Apply {"train.lr": 0.01} or ["train.lr=0.01"] to a raw config dict (copied)."""
    config = copy.deepcopy(raw)
    items = overrides.items() if isinstance(overrides, dict) else (parse_override(o) for o in overrides)
    for key, value in items:
        parts = key.split(".") if isinstance(key, str) else list(key)
        node = config
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{source} {'.'.join(parts)}: '{'.'.join(parts[:depth + 1])}' is not a table")
            node = child
        node[parts[-1]] = value
    return config


def _check_value(key, value, where, path):
    if value is None and not key.required:
        return value
    if key.values is not None and isinstance(value, dict):
        return {name: _check_table_value(key.values, entry, f'{where}."{name}"', path) for name, entry in value.items()}
    ok = False
    for t in key.types:
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = float(value)
            ok = True
            break
        if isinstance(value, t) and not (t is int and isinstance(value, bool)):
            ok = True
            break
    if not ok:
        raise ConfigError(f"{path}: {where}: expected {key.describe()}, got {value!r}")
    if key.choices and value not in key.choices:
        raise ConfigError(f"{path}: {where}: expected {key.describe()}, got {value!r}{did_you_mean(value, key.choices)}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{path}: {where}: expected a finite number, got {value!r}")
        if key.minimum is not None and value < key.minimum:
            raise ConfigError(f"{path}: {where}: expected {key.describe()}, got {value!r}")
        if key.exclusive_minimum is not None and value <= key.exclusive_minimum:
            raise ConfigError(f"{path}: {where}: expected {key.describe()}, got {value!r}")
        if key.maximum is not None and value > key.maximum:
            raise ConfigError(f"{path}: {where}: expected {key.describe()}, got {value!r}")
    return value


def _check_table_value(key, value, where, path):
    if isinstance(value, dict):  # TOML reads an unquoted { 0.0 = 0.1 } as the nested table {"0": {"0": 0.1}}
        raise ConfigError(f"{path}: {where}: expected {key.describe()}, got the table {value!r} "
                          f"(a key holding dots needs quotes: {{ \"0.0\" = 0.1 }})")
    return _check_value(key, value, where, path)


def _resolve_table(table, schema, where, path, open_ok=False):
    """Fill defaults, check known keys; return (resolved, extra keys)."""
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: {where}: expected a table, got {table!r}")
    resolved, extra = {}, {}
    for name, value in table.items():
        if name in schema:
            sub = SUB_SCHEMAS.get((where, name))
            value = _check_value(schema[name], value, f"{where}.{name}", path)
            if sub is not None and value is not None:
                value, unknown = _resolve_table(value, sub, f"{where}.{name}", path)
                _reject_unknown(unknown, sub, f"{where}.{name}", path)
            resolved[name] = value
        elif open_ok:
            extra[name] = value
        else:
            extra[name] = value
    for name, key in schema.items():
        if name not in resolved:
            if key.required:
                raise ConfigError(f"{path}: missing key '{where}.{name}' ({key.help.split(';')[0]})")
            resolved[name] = copy.deepcopy(key.default)
    return resolved, extra


def _reject_unknown(extra, allowed, where, path):
    for name in extra:
        suggestion = did_you_mean(f"{where}.{name}", [f"{where}.{key}" for key in allowed])
        raise ConfigError(f"{path}: unknown key '{where}.{name}'{suggestion}")


# -- plugin options ----------------------------------------------------------------
FACTORY_INTERNALS = ("self", "input_shape", "num_outputs", "dtype")


def factory_parameters(factory):
    """The keyword options a plugin factory (function or class) accepts."""
    target = factory.__init__ if inspect.isclass(factory) else factory
    try:
        signature = inspect.signature(target, eval_str=True)
    except (TypeError, ValueError, NameError):
        signature = inspect.signature(target)
    params = {}
    var_keyword = False
    for name, param in signature.parameters.items():
        if param.kind is param.VAR_KEYWORD:
            var_keyword = True
        elif param.kind is not param.VAR_POSITIONAL and name not in FACTORY_INTERNALS:
            params[name] = param
    return params, var_keyword


def _annotation_accepts(annotation, value):
    """True/False when the annotation can be checked, None when it cannot."""
    if annotation is inspect.Parameter.empty or annotation is typing.Any:
        return None
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        results = [_annotation_accepts(arg, value) for arg in typing.get_args(annotation)]
        if any(r is True for r in results):
            return True
        return None if any(r is None for r in results) else False
    if annotation is type(None) or annotation is None:
        return value is None
    base = origin or annotation
    if base is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if base is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if base in (list, tuple, typing.Sequence):
        return isinstance(value, (list, tuple))
    if base in (bool, str, dict):
        return isinstance(value, base)
    return None


def check_plugin_options(factory, options, where, path, plugin_name, skip=()):
    """Reject unknown or mistyped options and missing required ones."""
    params, var_keyword = factory_parameters(factory)
    for name, value in options.items():
        if name in skip:
            continue
        if name not in params:
            if var_keyword:
                continue
            accepted = ", ".join(n for n in params if n not in skip) or "no options"
            raise ConfigError(
                f"{path}: unknown key '{where}.{name}'{did_you_mean(f'{where}.{name}', [f'{where}.{p}' for p in params])}; "
                f"'{plugin_name}' accepts: {accepted}"
            )
        param = params[name]
        verdict = _annotation_accepts(param.annotation, value)
        if verdict is None and param.default not in (inspect.Parameter.empty, None):
            default = param.default
            if isinstance(default, bool):
                verdict = isinstance(value, bool)
            elif isinstance(default, (int, float)):
                verdict = isinstance(value, (int, float)) and not isinstance(value, bool) and (
                    isinstance(default, float) or isinstance(value, int))
            elif isinstance(default, str):
                verdict = isinstance(value, str)
        if verdict is False:
            expected = _expected_text(param)
            raise ConfigError(f"{path}: {where}.{name}: expected {expected}, got {value!r}")
    for name, param in params.items():
        if param.default is inspect.Parameter.empty and name not in options and name not in skip:
            raise ConfigError(f"{path}: missing key '{where}.{name}' required by '{plugin_name}'")


def _expected_text(param):
    if param.annotation is not inspect.Parameter.empty:
        text = getattr(param.annotation, "__name__", None) or str(param.annotation)
        return text.replace("typing.", "")
    return type(param.default).__name__


# -- the whole experiment -------------------------------------------------------------
def resolve(raw, path="<config>", overrides=None):
    """Validate a raw experiment dict (plus overrides) into a resolved config.

    Structure and types of the fixed sections are checked here; plugin names and
    options are checked by :func:`check_plugins` once the plugin manager exists.
    """
    if overrides:
        raw = apply_overrides(raw, overrides)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a TOML document")
    for section in raw:
        if section not in SCHEMA:
            raise ConfigError(f"{path}: unknown section '[{section}]'{did_you_mean(section, SCHEMA)}; "
                              f"known: {', '.join(SCHEMA)}")
    config = {}
    for section, schema in SCHEMA.items():
        table = raw.get(section, {})
        if section == "data" and section not in raw:
            raise ConfigError(f"{path}: missing section '[data]' (which dataset to train on)")
        resolved, extra = _resolve_table(table, schema, section, path)
        if section in OPEN_SECTIONS:
            resolved["options"] = extra
        else:
            _reject_unknown(extra, schema, section, path)
        config[section] = resolved
    model = config["model"]
    if (model["architecture"] is None) == (model["layers"] is None):
        raise ConfigError(f"{path}: [model] needs exactly one of 'model.architecture' or 'model.layers'")
    if model["layers"] is not None and model["options"]:
        name = next(iter(model["options"]))
        raise ConfigError(f"{path}: unknown key 'model.{name}' (options belong to an architecture; "
                          f"with model.layers put them in each layer's table)")
    for index, layer in enumerate(model["layers"] or []):
        if not isinstance(layer, dict) or "type" not in layer or not isinstance(layer["type"], str):
            raise ConfigError(f"{path}: model.layers[{index}]: expected a table with a 'type' string, got {layer!r}")
    config["source"] = str(path)
    return config


def load(path, overrides=None):
    """Read, override and validate an experiment file."""
    return resolve(load_toml(path), path=path, overrides=overrides)


def named_spec(value, where, path):
    """'adam' or {name='adam', lr=...} -> ('adam', {options})."""
    if value is None:
        return None, {}
    if isinstance(value, str):
        return value, {}
    if isinstance(value, dict):
        if "name" not in value or not isinstance(value["name"], str):
            raise ConfigError(f"{path}: {where}: expected a name or a table with a 'name' key, got {value!r}")
        options = {k: v for k, v in value.items() if k != "name"}
        return value["name"], options
    raise ConfigError(f"{path}: {where}: expected a name or a table with a 'name' key, got {value!r}")


LATER_MODEL_KEYS = ("weights", "strict")


def config_hash(config):
    """Stable hash of the parts of a config that define the model and data."""
    relevant = {k: config[k] for k in ("data", "model", "init") if k in config}
    if "model" in relevant:  # keys added later hash as before while they keep their defaults
        relevant["model"] = {k: v for k, v in relevant["model"].items()
                             if not (k in LATER_MODEL_KEYS and v == SCHEMA["model"][k].default)}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


_TOML_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def toml_string(text):
    """A TOML basic string: quotes, backslashes and control characters escaped, the rest as is."""
    out = []
    for ch in text:
        if ch in _TOML_ESCAPES:
            out.append(_TOML_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def dump_toml(config):
    """Write a resolved config as TOML (enough for our value types: no datetimes)."""
    lines = []

    def value_text(value):
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, (int, float)):
            return repr(value)
        if isinstance(value, str):
            return toml_string(value)
        if isinstance(value, (list, tuple)):
            return "[" + ", ".join(value_text(v) for v in value) + "]"
        if isinstance(value, dict):
            return "{" + ", ".join(f"{toml_string(str(k))} = {value_text(v)}" for k, v in value.items() if v is not None) + "}"
        raise TypeError(f"cannot write {value!r} as TOML")

    for section, table in config.items():
        if not isinstance(table, dict):
            continue
        lines.append(f"[{section}]")
        flat = dict(table)
        flat.update(flat.pop("options", {}) or {})
        for key, value in flat.items():
            if value is None:
                continue
            lines.append(f"{toml_string(key) if not key.isidentifier() else key} = {value_text(value)}")
        lines.append("")
    return "\n".join(lines)


def _options_table(title, classes, skip):
    """Markdown rows ``| name | option = default, ... | first docstring line |`` for named classes."""
    lines = [f"| {title} | options (defaults) | meaning |", "|---|---|---|"]
    for name, cls in classes.items():
        params, _ = factory_parameters(cls)
        options = ", ".join(f"`{k} = {json.dumps(p.default)}`" for k, p in params.items() if k not in skip) or "none"
        own = cls.__dict__.get("__doc__") or ""
        doc = inspect.cleandoc(own).split("\n\n")[0].replace("\n", " ").replace("``", "`")
        lines.append(f"| `{name}` | {options} | {doc} |")
    return lines


def nested_markdown():
    """The options of the named tables (schedules, preprocessing steps), from their signatures."""
    from ..data.preprocess import STEPS
    from .schedules import SCHEDULES

    lines = ["### Nested options\n",
             "A key that takes a name also takes a table: `name` plus options, e.g. "
             "`schedule = { name = \"step\", step_size = 10, gamma = 0.5 }`. This holds for "
             "`train.schedule`, `train.optimizer`, `train.loss`, each entry of `train.regularizers`, "
             "`init.default`/`init.overrides` and each step of `data.preprocess`; the options are checked "
             "against the signature (`rabbit plugins` lists the optimizers, losses, regularizers and "
             "initializers, whose options are their constructors' keyword arguments).\n",
             "`train.schedule` (stepped once per epoch from `train.lr`):\n"]
    lines += _options_table("schedule", SCHEDULES, skip=("base_lr", "epochs"))
    lines += ["", "`data.preprocess` steps (fitted on the training split, applied to every split):\n"]
    lines += _options_table("step", STEPS, skip=())
    lines.append("")
    return "\n".join(lines)


def schema_markdown():
    """The key reference of docs/experiments.md, generated from :data:`SCHEMA` and the named tables."""
    lines = []
    for section, schema in SCHEMA.items():
        lines.append(f"### `[{section}]`\n")
        if section in OPEN_SECTIONS:
            lines.append(f"Any other key in `[{section}]` is an option of the chosen {OPEN_SECTIONS[section]} "
                         f"plugin, checked against its signature.\n")
        lines.append("| key | type | default | meaning |")
        lines.append("|---|---|---|---|")
        for name, key in schema.items():
            default = "required" if key.required else ("unset" if key.default is None else f"`{json.dumps(key.default)}`")
            lines.append(f"| `{section}.{name}` | {key.describe()} | {default} | {key.help} |")
            for sub_name, sub_key in SUB_SCHEMAS.get((section, name), {}).items():
                sub_default = "unset" if sub_key.default is None else f"`{json.dumps(sub_key.default)}`"
                lines.append(f"| `{section}.{name}.{sub_name}` | {sub_key.describe()} | {sub_default} | {sub_key.help} |")
        lines.append("")
    return "\n".join(lines) + "\n" + nested_markdown()
