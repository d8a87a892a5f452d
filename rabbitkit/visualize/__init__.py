"""Seeing what a network learned: Deep Dream, class models, saliency, for scripted research.

    from rabbitkit.visualize import dream, class_models, saliency
    for layer in ("features.3", "features.7", "features.10"):          # a layer sweep is a loop
        out = dream(loaded, photo, layer=layer, seed=0)                # uint8 (H, W, 3)
    result = class_models(loaded, classes=[0, 14], seed=0)             # .images, .probabilities
    maps, classes = saliency(loaded, [photo])                          # (N, H, W) in [0, 1]

``loaded`` is what :func:`rabbitkit.pretrained.open_model` returns (a run
directory, a checkpoint, pretrained weights); a bare network works too, in its
own input space (see :mod:`rabbitkit.visualize.subject`).  Nothing is written
unless asked: :mod:`rabbitkit.visualize.common` holds the writers the ``rabbit``
commands use.

Not to be confused with :mod:`rabbitkit.viz`, whose every module is a built-in
plugin loaded at start-up; this package is imported only when used.
"""
import importlib

_EXPORTS = {
    "dream": "deepdream", "dream_frames": "deepdream", "class_models": "classes", "saliency": "classes",
    "layer_rows": "layer_table",
}
_EXPORTS.update({"style_transfer": "style", "StyleResult": "style"})  # neural style transfer (style.py)
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
