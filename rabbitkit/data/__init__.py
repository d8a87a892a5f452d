"""rabbitkit's data layer: datasets, preprocessing, augmentation and batching.

* Datasets are plugins (``rabbit_datasets`` hook; built-ins in
  :mod:`rabbitkit.data.datasets`): ``factory(path=None, seed=0, **options)``
  returns a :class:`~rabbitkit.data.base.Dataset` whose splits hold whole arrays
  (images uint8 NCHW).
* :class:`~rabbitkit.data.preprocess.Pipeline`: fitted preprocessing (standardize,
  ZCA, LCN, colour spaces), float32 out.
* :class:`~rabbitkit.data.augment.Augmenter`: seeded on-the-fly augmentation.
* :class:`~rabbitkit.data.loader.BatchLoader`: batches prepared in a background thread.

Names are imported lazily, so importing this package does not load Numba.
"""
_EXPORTS = {
    "Dataset": "base", "Split": "base",
    "Pipeline": "preprocess", "Augmenter": "augment",
    "BatchLoader": "loader", "make_transform": "loader",
    "fetch_dataset": "fetch",
}

__all__ = sorted(_EXPORTS) + ["load_dataset"]


def load_dataset(name, **options):
    """``registry("datasets").get(name)(**options)``: a dataset by its plugin name."""
    from ..plugins import registry

    return registry("datasets").get(name)(**options)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
