"""Validation of option tables (preprocessing steps, augmentation) against a signature."""
import inspect
import types
import typing

from ..errors import ConfigError, did_you_mean


def _allowed(annotation):
    if annotation is inspect.Parameter.empty:
        return None
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return tuple(a for arg in typing.get_args(annotation) for a in _allowed(arg) or ())
    origin = typing.get_origin(annotation) or annotation
    return (origin,)


def type_ok(value, annotation):
    """Does ``value`` (from TOML) fit ``annotation``?  ints are accepted for floats, bools are not ints."""
    allowed = _allowed(annotation)
    if allowed is None:
        return True
    if value is None:
        return type(None) in allowed
    if isinstance(value, bool):
        return bool in allowed
    if isinstance(value, int) and (int in allowed or float in allowed):
        return True
    return isinstance(value, tuple(a for a in allowed if isinstance(a, type)))


def type_name(annotation):
    allowed = _allowed(annotation) or ()
    return " or ".join("none" if a is type(None) else getattr(a, "__name__", str(a)) for a in allowed) or "any"


def check_options(owner, func, options):
    """Raise ConfigError (one line, did-you-mean) for an unknown option or a wrong type."""
    params = {k: p for k, p in inspect.signature(func).parameters.items() if k != "self"}
    for key, value in options.items():
        if key not in params:
            hint = did_you_mean(key, params) or (f"; options: {', '.join(params)}" if params else "; it has no options")
            raise ConfigError(f"{owner}: unknown option '{key}'{hint}")
        if not type_ok(value, params[key].annotation):
            raise ConfigError(f"{owner}: option '{key}' must be {type_name(params[key].annotation)}, got {value!r}")
