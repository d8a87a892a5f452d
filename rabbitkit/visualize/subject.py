"""The network being visualised and how pixels map onto its input.

Every function of :mod:`rabbitkit.visualize` takes either

* a loaded model (:func:`rabbitkit.pretrained.open_model`'s ``LoadedModel``,
  with ``model``, ``preprocess``, ``deprocess``, ``input_range``,
  ``class_names``): images go in and come out as uint8 pixels (H, W, C), or
* a bare network (any :class:`~rabbitkit.layers.Layer`): images go in and come
  out as float (C, H, W) arrays in the network's own input space, and
  ``input_range`` (per-channel low, high) is given by the caller, if at all.
"""
import numpy as np

from ..layers.base import Layer


class Subject:
    """A network plus the (optional) pixel mapping of a loaded model."""

    def __init__(self, model, input_range=None):
        if isinstance(model, Layer):
            self.loaded, self.network = None, model
            self.input_range = None if input_range is None else _range_arrays(input_range)
            self.class_names = None
        else:
            self.loaded, self.network = model, model.model
            if input_range is None:  # the loaded model's: one (low, high) pair per channel
                pairs = np.asarray(model.input_range, dtype=np.float64).reshape(-1, 2)
                input_range = (pairs[:, 0], pairs[:, 1])
            self.input_range = _range_arrays(input_range)
            self.class_names = list(getattr(model, "class_names", None) or []) or None

    @property
    def pixels(self):
        """True when images are uint8 pixels (a loaded model), False for model-space arrays."""
        return self.loaded is not None

    def to_input(self, image, model_size=False):
        """One image as float (C, H, W) in the model's input space.

        A loaded model's pixels keep their own size, or are resized and cropped
        to the model's input size with ``model_size``; a bare net's arrays pass as they are.
        """
        if self.loaded is None:
            return np.array(image, dtype=self.network.dtype)
        x = self.loaded.preprocess(image, size="default" if model_size else None)
        return np.array(x[0], dtype=self.network.dtype)

    def to_output(self, x):
        """A model-space (C, H, W) array as the caller's kind of image."""
        if self.loaded is None:
            return x
        return self.loaded.deprocess(x[None])[0]

    def clip(self, x):
        """Clip (…, C, H, W) ``x`` in place to the valid input range (no-op without one)."""
        if self.input_range is not None:
            low, high = self.input_range
            np.clip(x, low.astype(x.dtype), high.astype(x.dtype), out=x)
        return x

    def span(self):
        """Mean width of the valid input range over channels (None without one)."""
        if self.input_range is None:
            return None
        low, high = self.input_range
        return float(np.mean(high - low))

    def class_name(self, index):
        if self.class_names and 0 <= index < len(self.class_names):
            return str(self.class_names[index])
        return str(index)


def _range_arrays(input_range):
    low, high = input_range
    low = np.asarray(low, dtype=np.float64).reshape(-1, 1, 1)
    high = np.asarray(high, dtype=np.float64).reshape(-1, 1, 1)
    if np.any(high <= low):
        raise ValueError(f"input range needs low < high per channel, got {input_range}")
    return low, high
