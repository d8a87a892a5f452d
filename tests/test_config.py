"""Experiment files: schema validation, overrides, plugin option checking."""
import pytest

from rabbitkit.errors import ConfigError, PluginError
from rabbitkit.train import config as cfg
from rabbitkit.train.dryrun import describe
from rabbitkit.plugins import get_manager

BASE = """
[experiment]
name = "t"
[data]
dataset = "function1d"
n_train = 32
[model]
architecture = "mlp"
hidden = [8]
[train]
epochs = 2
"""


def write(tmp_path, text, name="exp.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_and_overrides(tmp_path):
    path = write(tmp_path, BASE)
    config = cfg.load(path, overrides=["train.lr=0.5", "model.dropout=0.3", "experiment.name=\"x\""])
    assert config["train"]["lr"] == 0.5
    assert config["train"]["batch_size"] == 64
    assert config["model"]["options"] == {"hidden": [8], "dropout": 0.3}
    assert config["experiment"]["name"] == "x"
    assert config["data"]["options"] == {"n_train": 32}


@pytest.mark.parametrize("override,message", [
    ("train.lrr=1", "unknown key 'train.lrr' (did you mean 'train.lr'?)"),
    ("train.lr=-1", "train.lr: expected a number > 0.0, got -1"),
    ("train.epochs=2.5", "train.epochs: expected an integer >= 1, got 2.5"),
    ("experiment.device=\"gpu\"", "experiment.device: expected one of 'cpu', 'cuda', got 'gpu'"),
    ("train.early_stopping={patience=0}", "train.early_stopping.patience: expected an integer >= 1, got 0"),
    ("output.visualizers=\"curves\"", "output.visualizers: expected a list, got 'curves'"),
    ("train.lr_mult=0.1", "train.lr_mult: expected a table, each value a number >= 0.0, got 0.1"),
    ("train.lr_mult={\"0\" = -0.1}", "train.lr_mult.\"0\": expected a number >= 0.0, got -0.1"),
    ("train.decay_mult={\"0\" = \"none\"}", "train.decay_mult.\"0\": expected a number >= 0.0, got 'none'"),
    ("train.lr_mult={0.0 = 0.1}", "train.lr_mult.\"0\": expected a number >= 0.0, got the table {'0': 0.1} "
                                 "(a key holding dots needs quotes: { \"0.0\" = 0.1 })"),
])
def test_invalid_values_name_file_key_and_expectation(tmp_path, override, message):
    path = write(tmp_path, BASE)
    with pytest.raises(ConfigError) as info:
        cfg.load(path, overrides=[override])
    text = str(info.value)
    assert text.startswith(str(path)) and message in text
    assert "\n" not in text


def test_unknown_section_and_missing_data(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown section '\[trian\]' \(did you mean 'train'\?\)"):
        cfg.load(write(tmp_path, BASE + "[trian]\nlr = 1\n"))
    with pytest.raises(ConfigError, match=r"missing section '\[data\]'"):
        cfg.load(write(tmp_path, "[model]\narchitecture = \"mlp\"\n"))


def test_model_needs_exactly_one_of_architecture_or_layers(tmp_path):
    text = BASE.replace('architecture = "mlp"\nhidden = [8]', "")
    with pytest.raises(ConfigError, match="exactly one of"):
        cfg.load(write(tmp_path, text))


def test_broken_toml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        cfg.load(write(tmp_path, "[data\n"))
    with pytest.raises(ConfigError, match="experiment file not found"):
        cfg.load(tmp_path / "nope.toml")


def test_plugin_options_checked_against_the_factory_signature(tmp_path):
    manager = get_manager()
    config = cfg.load(write(tmp_path, BASE), overrides=["model.hiden=[3]"])
    with pytest.raises(ConfigError, match=r"unknown key 'model.hiden' \(did you mean 'model.hidden'\?\); 'mlp' accepts"):
        describe(config, manager)
    config = cfg.load(write(tmp_path, BASE), overrides=["data.n_train=\"many\""])
    with pytest.raises(ConfigError, match="data.n_train: expected int, got 'many'"):
        describe(config, manager)


def test_unknown_plugin_names_suggest_the_closest(tmp_path):
    manager = get_manager()
    config = cfg.load(write(tmp_path, BASE), overrides=["data.dataset=\"function1\""])
    with pytest.raises(PluginError, match=r"unknown dataset 'function1' \(did you mean 'function1d'\?\)"):
        describe(config, manager)
    config = cfg.load(write(tmp_path, BASE), overrides=["train.optimizer=\"adma\""])
    with pytest.raises(PluginError, match=r"unknown optimizer 'adma' \(did you mean 'adam'\?\)"):
        describe(config, manager)


def test_explicit_layers_fill_input_sizes_and_summarise(tmp_path):
    text = """
[data]
dataset = "function1d"
[model]
[[model.layers]]
type = "Dense"
out_features = 16
[[model.layers]]
type = "Tanh"
[[model.layers]]
type = "Dense"
out_features = 1
"""
    config = cfg.load(write(tmp_path, text))
    summary = describe(config, get_manager())
    assert "Dense(1, 16" in summary and "Dense(16, 1" in summary
    assert "total parameters 49" in summary
    bad = text.replace("out_features = 16", "out_features = 16\nbias = \"yes\"")
    with pytest.raises(ConfigError, match=r"model.layers\[0\].bias: expected"):
        describe(cfg.load(write(tmp_path, bad)), get_manager())


def test_dump_toml_round_trips(tmp_path):
    config = cfg.load(write(tmp_path, BASE), overrides=["init.overrides={\"0.weight\"=\"zeros\"}"])
    again = cfg.load(write(tmp_path, cfg.dump_toml(config), "again.toml"))
    for section in ("experiment", "data", "model", "init", "train", "output"):
        assert again[section] == config[section]
    assert cfg.config_hash(again) == cfg.config_hash(config)


@pytest.mark.parametrize("override,message", [
    ("data.augment={scale=2.0}", "data: augment: scale must be < 1"),
    ("data.preprocess=[\"standardise\"]", "did you mean 'standardize'"),
    ("train.schedule={name=\"step\", step_size=\"x\"}", "train.schedule.step_size: expected int"),
    ("init.default=\"xavier\"", "unknown initializer 'xavier'"),
])
def test_errors_raised_inside_plugins_name_the_file(tmp_path, override, message):
    import rabbitkit

    path = write(tmp_path, BASE)
    keys, value = cfg.parse_override(override)
    with pytest.raises((ConfigError, PluginError)) as info:
        rabbitkit.run(path, {".".join(keys): value}, out=tmp_path, quiet=True)
    assert message in str(info.value)
    if isinstance(info.value, ConfigError):
        assert str(info.value).startswith(str(path))
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]  # no empty run directory left behind


def test_loss_options_in_toml(tmp_path):
    from rabbitkit.train import builder

    path = write(tmp_path, BASE + 'loss = { name = "softmax_cross_entropy", ignore_index = 2 }\n')
    loss = builder.build_loss(cfg.load(path), "classification")
    assert type(loss).__name__ == "SoftmaxCrossEntropy" and loss.ignore_index == 2
    named = builder.build_loss(cfg.load(path, overrides={"train.loss": "squared_error"}), "classification")
    assert type(named).__name__ == "SquaredError"
    with pytest.raises(ConfigError, match="exp.toml: unknown key 'train.loss.ignore_indx' \\(did you mean "
                                          "'train.loss.ignore_index'\\?\\); 'softmax_cross_entropy' accepts: ignore_index"):
        builder.build_loss(cfg.load(path, overrides={"train.loss": {"name": "softmax_cross_entropy",
                                                                     "ignore_indx": 2}}), "classification")
    with pytest.raises(ConfigError, match="train.loss: expected a name or a table with a 'name' key"):
        builder.build_loss(cfg.load(path, overrides={"train.loss": {"ignore_index": 2}}), "classification")


def test_multiplier_patterns_are_checked_against_the_model_before_a_run(tmp_path):
    path = write(tmp_path, BASE)  # mlp hidden [8]: parameters 0.weight, 0.bias, 2.weight, 2.bias
    summary = describe(cfg.load(path, overrides=['train.lr_mult={"0" = 0.1}', "train.weight_decay=0.01",
                                                 'train.decay_mult={"*" = 0}']), get_manager())
    assert summary.endswith("# lr_mult 0.1 on 2 of 4 parameters; decay_mult 0 on 2 of 2 weights")
    with pytest.raises(ConfigError) as info:
        describe(cfg.load(path, overrides=['train.lr_mult={"2.wieght" = 0.1}']), get_manager())
    assert str(info.value) == (f"{path}: train: lr_mult pattern '2.wieght' matches no trained layer or parameter; "
                               f"nearest names: 2.weight, 0.weight")
    with pytest.raises(ConfigError, match=r"exp.toml: train.optimizer.lr: set it as train.lr"):
        describe(cfg.load(path, overrides=['train.optimizer={name = "sgd", lr = 0.1}']), get_manager())


def test_an_optimizer_plugin_without_multipliers_is_refused_by_name(tmp_path):
    import rabbitkit
    from rabbitkit.plugins import PluginManager

    class PlainSGD:
        def __init__(self, params, lr=0.01, weight_decay=0.0):
            pass

    class Plugin:
        @rabbitkit.hookimpl
        def rabbit_optimizers(self):
            return {"plain_sgd": PlainSGD}

    manager = PluginManager(entry_points=False)
    manager.register(Plugin())
    path = write(tmp_path, BASE)
    config = cfg.load(path, overrides=['train.optimizer="plain_sgd"', 'train.lr_mult={"0" = 0.1}'])
    with pytest.raises(ConfigError) as info:
        describe(config, manager)
    assert str(info.value) == f"{path}: train.lr_mult: optimizer 'plain_sgd' takes no per-parameter multipliers"
