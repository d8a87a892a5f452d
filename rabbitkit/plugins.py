"""The plugin manager: built-ins, entry points and ``-p`` modules, one registry per kind.

Built-in plugins are plain modules registered through the very same hooks as
third-party ones (as pytest does with its own plugins).  Every module inside the
built-in packages below is registered, so adding a layer, an architecture or a
dataset is one new file and no list to edit.
"""
import importlib
import pkgutil

import pluggy

from . import hookspecs
from .errors import PluginError, did_you_mean

ENTRY_POINT_GROUP = "rabbitkit"

# Packages whose every module is a built-in plugin.
BUILTIN_PACKAGES = (
    "rabbitkit.layers",
    "rabbitkit.models",
    "rabbitkit.data.datasets",
    "rabbitkit.viz",
)
# Single modules that are built-in plugins.
BUILTIN_MODULES = (
    "rabbitkit.initializers",
    "rabbitkit.regularizers",
    "rabbitkit.optim",
    "rabbitkit.losses",
    "rabbitkit.visualize.objectives",
    "rabbitkit.visualize.regularizers",
)

# registry kind -> hook name
KINDS = {
    "layers": "rabbit_layers",
    "architectures": "rabbit_architectures",
    "initializers": "rabbit_initializers",
    "regularizers": "rabbit_regularizers",
    "optimizers": "rabbit_optimizers",
    "losses": "rabbit_losses",
    "datasets": "rabbit_datasets",
    "visualizers": "rabbit_visualizers",
    "objectives": "rabbit_objectives",
    "image_regularizers": "rabbit_image_regularizers",
}


def _builtin_module_names():
    names = list(BUILTIN_MODULES)
    for package_name in BUILTIN_PACKAGES:
        try:
            package = importlib.import_module(package_name)
        except ModuleNotFoundError:
            continue
        for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
            if not info.name.startswith("_"):
                names.append(f"{package_name}.{info.name}")
    return names


class Registry:
    """Names of one kind (e.g. layers) mapped to their factories and providers."""

    def __init__(self, kind, entries):
        self.kind = kind
        self._entries = entries  # name -> (factory, plugin name)

    def __contains__(self, name):
        return name in self._entries

    def __iter__(self):
        return iter(sorted(self._entries))

    def names(self):
        return sorted(self._entries)

    def get(self, name):
        try:
            return self._entries[name][0]
        except KeyError:
            known = ", ".join(self.names()) or "none"
            singular = self.kind[:-1] if self.kind.endswith("s") else self.kind
            raise PluginError(
                f"unknown {singular} '{name}'{did_you_mean(name, self._entries)}; known: {known}"
            ) from None

    def provider(self, name):
        return self._entries[name][1]

    def items(self):
        return [(name, self._entries[name][0], self._entries[name][1]) for name in self.names()]


class PluginManager:
    """Holds the pluggy manager and builds a :class:`Registry` per kind on demand."""

    def __init__(self, builtins=True, entry_points=True, modules=()):
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self._registries = {}
        if builtins:
            for name in _builtin_module_names():
                self._register_module(name, plugin_name=name)
        if entry_points:
            try:
                self.pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
            except Exception as err:  # a broken third-party package
                raise PluginError(f"loading plugins of entry-point group '{ENTRY_POINT_GROUP}' failed: {err}") from err
        for name in modules:
            self.load(name)

    @property
    def hook(self):
        return self.pm.hook

    def _register_module(self, module_name, plugin_name):
        module = importlib.import_module(module_name)
        if self.pm.is_registered(module):
            return module
        self.pm.register(module, name=plugin_name)
        return module

    def load(self, module_name):
        """Load a plugin module by import path (the CLI's ``-p``)."""
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise PluginError(f"cannot import plugin module '{module_name}': {err}") from None
        if not self.pm.is_registered(module):
            self.pm.register(module, name=module_name)
        self._registries.clear()
        return module

    def register(self, plugin, name=None):
        """Register a plugin object (a module or any object with hookimpls)."""
        name = self.pm.register(plugin, name=name)
        self._registries.clear()
        return name

    def unregister(self, plugin=None, name=None):
        self.pm.unregister(plugin=plugin, name=name)
        self._registries.clear()

    def registry(self, kind):
        if kind not in KINDS:
            raise PluginError(f"unknown plugin kind '{kind}'; known: {', '.join(KINDS)}")
        if kind not in self._registries:
            self._registries[kind] = self._collect(kind)
        return self._registries[kind]

    def _collect(self, kind):
        hook = getattr(self.pm.hook, KINDS[kind])
        entries = {}
        # Call each implementation on its own, so every name knows its provider.
        for impl in hook.get_hookimpls():  # registration order: the first claimant is named first
            provided = impl.function()
            if provided is None:
                continue
            if not isinstance(provided, dict):
                raise PluginError(f"plugin '{impl.plugin_name}': {KINDS[kind]} must return a dict, got {type(provided).__name__}")
            for name, factory in provided.items():
                if name in entries:
                    other = entries[name][1]
                    raise PluginError(
                        f"{kind[:-1]} name '{name}' is claimed by two plugins: '{other}' and '{impl.plugin_name}'"
                    )
                entries[name] = (factory, impl.plugin_name)
        return Registry(kind, entries)

    def __getattr__(self, kind):
        if kind in KINDS:
            return self.registry(kind)
        raise AttributeError(kind)


_default = None


def get_manager():
    """The process-wide plugin manager (built-ins + entry points), created on first use."""
    global _default
    if _default is None:
        _default = PluginManager()
    return _default


def registry(kind):
    """Shortcut: ``registry("layers").get("Dense")``."""
    return get_manager().registry(kind)


def reset_manager():
    """Forget the process-wide manager (tests, or after installing a plugin)."""
    global _default
    _default = None
