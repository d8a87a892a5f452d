"""User-facing errors.

Anything a user can cause (a wrong TOML key, a missing file, an unknown plugin
name, a corrupt checkpoint) raises a subclass of :class:`RabbitError`.  The CLI
prints such errors as one line and exits non-zero; everything else is a bug and
keeps its traceback.
"""
import difflib


class RabbitError(Exception):
    """An error caused by user input; its message is one self-contained line."""


class ConfigError(RabbitError):
    """An experiment file or override is invalid."""


class PluginError(RabbitError):
    """A plugin name is unknown, claimed twice, or a plugin failed to load."""


class BackendError(RabbitError):
    """A layer or operation is not available on the requested device."""


class DataError(RabbitError):
    """A dataset is missing, corrupt or in an unexpected format."""


class CheckpointError(RabbitError):
    """A checkpoint is missing, corrupt or does not match the model."""


class WeightsError(RabbitError):
    """A pretrained weight file is missing, corrupt, hostile or in a format rabbitkit does not read."""


def did_you_mean(name, known):
    """Return ' (did you mean 'x'?)' for the closest known name, or ''."""
    close = difflib.get_close_matches(str(name), [str(k) for k in known], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""
