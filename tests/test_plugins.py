"""The plugin manager: built-ins through the same hooks, -p modules, name conflicts."""
import sys
import types

import pytest

import rabbitkit
from rabbitkit.errors import PluginError
from rabbitkit.plugins import KINDS, PluginManager


def make_module(name, **hooks):
    module = types.ModuleType(name)
    for hook_name, function in hooks.items():
        setattr(module, hook_name, rabbitkit.hookimpl(function))
    sys.modules[name] = module
    return module


def test_builtins_register_through_the_hooks():
    manager = PluginManager(entry_points=False)
    assert manager.registry("layers").provider("Dense") == "rabbitkit.layers.dense"
    assert manager.registry("optimizers").provider("adam") == "rabbitkit.optim"
    assert manager.registry("datasets").provider("gtsrb") == "rabbitkit.data.datasets.gtsrb"
    for kind in KINDS:
        assert manager.registry(kind).names(), kind


def test_two_plugins_claiming_one_name_is_an_error_naming_both():
    make_module("lab_a_plugin", rabbit_layers=lambda: {"Fancy": object})
    make_module("lab_b_plugin", rabbit_layers=lambda: {"Fancy": object})
    manager = PluginManager(entry_points=False, modules=["lab_a_plugin", "lab_b_plugin"])
    with pytest.raises(PluginError, match="'Fancy' is claimed by two plugins: 'lab_a_plugin' and 'lab_b_plugin'"):
        manager.registry("layers")


def test_a_plugin_may_not_shadow_a_builtin():
    make_module("shadow_plugin", rabbit_optimizers=lambda: {"adam": object})
    manager = PluginManager(entry_points=False, modules=["shadow_plugin"])
    with pytest.raises(PluginError, match="'adam' is claimed by two plugins: 'rabbitkit.optim' and 'shadow_plugin'"):
        manager.registry("optimizers")


def test_unknown_names_list_the_known_ones_with_a_suggestion():
    manager = PluginManager(entry_points=False)
    with pytest.raises(PluginError, match=r"unknown layer 'Conv2d' \(did you mean 'Conv2D'\?\); known: .*Dense"):
        manager.registry("layers").get("Conv2d")


def test_hooks_must_return_dicts():
    make_module("bad_plugin", rabbit_losses=lambda: ["not", "a", "dict"])
    manager = PluginManager(entry_points=False, modules=["bad_plugin"])
    with pytest.raises(PluginError, match="bad_plugin.*must return a dict"):
        manager.registry("losses")


def test_layers_attribute_resolves_plugin_layers_by_name():
    from rabbitkit import layers

    assert layers.Conv2D is PluginManager(entry_points=False).registry("layers").get("Conv2D")
    with pytest.raises(AttributeError, match="no layer 'Nope'"):
        getattr(layers, "Nope")
