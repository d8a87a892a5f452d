"""Images in, model input out, and back: the preprocessing a model carries.

Two kinds, both JSON-describable (``to_dict``/``from_dict``) so a standalone
checkpoint records them:

* :class:`AffineInput` -- the model-zoo nets: resize the shorter side, centre
  crop, optionally reorder RGB to BGR, scale 0-255 pixels to the net's value
  range, subtract a mean and divide by a standard deviation per channel.  It is
  exactly invertible, so :meth:`deprocess` gives the pixels back.
* :class:`PipelineInput` -- a run's own ``[data] preprocess`` pipeline (fitted
  statistics included) at the dataset's image size.  Steps other than ``scale``
  and a final ``standardize`` (LCN, ZCA, colour conversions) are not
  invertible: :meth:`deprocess` then undoes the final standardisation and
  rescales each image's values to 0-255 for display, and :attr:`input_range` is
  the range the model saw on (up to 256) training images.

Images are PIL images, file paths, or HWC / HW uint8 arrays; model input is
float32 NCHW; deprocessed images are HWC uint8 (C = 1 or 3).
"""
import os
import pathlib

import numpy as np

from .errors import ConfigError, DataError


def open_image(image, mode):
    """A PIL image in ``mode`` ("RGB" or "L") from a PIL image, a path or an HWC/HW uint8 array."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, (str, os.PathLike)):
        path = pathlib.Path(image)
        try:
            with Image.open(path) as img:
                img.load()
                return img.convert(mode)
        except FileNotFoundError:
            raise DataError(f"{path}: image not found") from None
        except (UnidentifiedImageError, OSError) as err:
            raise DataError(f"{path}: not a readable image ({err})") from None
    if isinstance(image, Image.Image):
        return image.convert(mode)
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
        raise DataError(f"an image array must be HWC or HW uint8, got {array.dtype} of shape {array.shape}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    return Image.fromarray(array).convert(mode)


def _as_list(images):
    if isinstance(images, (str, os.PathLike)) or (isinstance(images, np.ndarray) and images.ndim <= 3):
        return [images]
    try:
        from PIL import Image

        if isinstance(images, Image.Image):
            return [images]
    except ImportError:  # pragma: no cover
        pass
    return list(images)


def _resize_crop(img, size, resize):
    """Shorter side to ``resize`` (if set), then a centre crop of ``size``; or a plain resize to ``size``."""
    from PIL import Image

    if size is None:
        return img
    height, width = size
    if resize:
        scale = resize / min(img.width, img.height)
        new = (max(width, round(img.width * scale)), max(height, round(img.height * scale)))
        img = img.resize(new, Image.BILINEAR)
        left, top = (img.width - width) // 2, (img.height - height) // 2
        return img.crop((left, top, left + width, top + height))
    if img.size != (width, height):
        img = img.resize((width, height), Image.BILINEAR)
    return img


def _pixels(images, mode, size, resize=None):
    """uint8 NCHW from images (all one size after resizing)."""
    arrays = []
    for image in _as_list(images):
        array = np.asarray(_resize_crop(open_image(image, mode), size, resize), dtype=np.uint8)
        arrays.append(array[None] if array.ndim == 2 else array.transpose(2, 0, 1))
    if not arrays:
        raise DataError("no images given")
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise DataError(f"images of different sizes {sorted(shapes)} cannot share a batch; pass a size")
    return np.stack(arrays)


def _hwc(x):
    """NCHW float -> list of HWC uint8 (rounded, clipped)."""
    x = np.clip(np.rint(np.asarray(x, dtype=np.float64)), 0, 255).astype(np.uint8)
    return [image.transpose(1, 2, 0) for image in x]


def _check_nchw(x, channels):
    x = np.asarray(x)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[1] != channels:
        raise DataError(f"model input must be NCHW with {channels} channels, got shape {x.shape}")
    return x


class AffineInput:
    """``input = (pixel / 255 * value_range - mean) / std`` per channel, channels in ``order``.

    ``mean`` and ``std`` are in the model's channel order and value range
    (Caffe's BGR mean [104, 117, 123] on 0-255; torchvision's RGB mean
    [0.485, 0.456, 0.406] on 0-1).
    """

    kind = "affine"

    def __init__(self, size, mean, std, order="RGB", value_range=1.0, resize=None):
        self.size = (int(size[0]), int(size[1])) if size is not None else None
        self.mean = np.asarray(mean, dtype=np.float64)
        self.std = np.asarray(std, dtype=np.float64)
        if order not in ("RGB", "BGR", "L"):
            raise ConfigError(f"channel order must be RGB, BGR or L, got {order!r}")
        self.order = order
        self.value_range = float(value_range)
        self.resize = int(resize) if resize else None
        self.channels = 1 if order == "L" else 3
        if self.mean.shape != (self.channels,) or self.std.shape != (self.channels,):
            raise ConfigError(f"mean and std need {self.channels} values for order {order}, got {mean} and {std}")

    def to_dict(self):
        return {"kind": self.kind, "size": list(self.size) if self.size else None, "mean": self.mean.tolist(),
                "std": self.std.tolist(), "order": self.order, "value_range": self.value_range, "resize": self.resize}

    def preprocess(self, images, size="default"):
        size = self.size if size == "default" else (None if size is None else tuple(size))
        resize = self.resize if size == self.size else None
        x = _pixels(images, "L" if self.order == "L" else "RGB", size, resize).astype(np.float64)
        if self.order == "BGR":
            x = x[:, ::-1]
        x = x * (self.value_range / 255.0)
        x = (x - self.mean[None, :, None, None]) / self.std[None, :, None, None]
        return np.ascontiguousarray(x, dtype=np.float32)

    def deprocess(self, x):
        x = _check_nchw(x, self.channels).astype(np.float64)
        x = x * self.std[None, :, None, None] + self.mean[None, :, None, None]
        x = x * (255.0 / self.value_range)
        if self.order == "BGR":
            x = x[:, ::-1]
        return _hwc(x)

    @property
    def input_range(self):
        """Per model channel (low, high): where pixels 0 and 255 land."""
        low = (0.0 - self.mean) / self.std
        high = (self.value_range - self.mean) / self.std
        return [(float(lo), float(hi)) for lo, hi in zip(low, high)]

    @property
    def mean_pixel(self):
        """The 0-255 pixel (RGB, or gray) that maps to model input 0."""
        pixel = self.mean * (255.0 / self.value_range)
        return [float(v) for v in (pixel[::-1] if self.order == "BGR" else pixel)]


class PipelineInput:
    """A run's fitted preprocessing pipeline at the dataset's image shape (C, H, W)."""

    kind = "pipeline"

    def __init__(self, pipeline, image_shape, sample=None):
        self.pipeline = pipeline
        self.image_shape = tuple(int(v) for v in image_shape)
        self.size = self.image_shape[1:]
        self.mode = "L" if self.image_shape[0] == 1 else "RGB"
        self.channels = pipeline.output_shape(self.image_shape)[0]
        self._sample = sample  # callable giving training images (uint8 NCHW) for input_range
        names = [step.name for step in pipeline.steps]
        body = names[:-1] if names and names[-1] == "standardize" else names
        self.invertible = all(name == "scale" for name in body)
        self._standardize = pipeline.steps[-1] if names and names[-1] == "standardize" else None

    def to_dict(self):
        return {"kind": self.kind, "steps": self.pipeline.to_config(), "image_shape": list(self.image_shape)}

    def state_dict(self):
        return self.pipeline.state_dict()

    def preprocess(self, images, size="default"):
        size = self.size if size == "default" else (None if size is None else tuple(size))
        return np.ascontiguousarray(self.pipeline.apply(_pixels(images, self.mode, size)), dtype=np.float32)

    def _unstandardize(self, x):
        if self._standardize is None:
            return x
        state = self._standardize.state
        std = np.maximum(state["std"].astype(np.float64), self._standardize.eps)
        return x * std[None, :, None, None] + state["mean"].astype(np.float64)[None, :, None, None]

    def deprocess(self, x):
        x = self._unstandardize(_check_nchw(x, self.channels).astype(np.float64))
        if self.invertible:
            return _hwc(x * 255.0)
        low = x.min(axis=(1, 2, 3), keepdims=True)
        span = np.maximum(x.max(axis=(1, 2, 3), keepdims=True) - low, 1e-12)
        return _hwc((x - low) / span * 255.0)  # display only: LCN/ZCA/colour steps are not inverted

    @property
    def input_range(self):
        if self.invertible:
            low = np.zeros((1, self.image_shape[0], 1, 1), np.uint8)
            ends = self.pipeline.apply(np.concatenate([low, low + 255]))
            return [(float(ends[0, c, 0, 0]), float(ends[1, c, 0, 0])) for c in range(self.channels)]
        if self._sample is None:
            raise DataError("this pipeline is not invertible and no training images are at hand for its input range")
        x = self.pipeline.apply(self._sample())
        return [(float(x[:, c].min()), float(x[:, c].max())) for c in range(self.channels)]

    @property
    def mean_pixel(self):
        """The 0-255 pixel that a zero model input shows as (invertible pipelines), else mid-gray."""
        if not self.invertible:
            return [127.5] * self.image_shape[0]
        zero = self._unstandardize(np.zeros((1, self.channels, 1, 1)))
        return [float(v) * 255.0 for v in zero[0, :, 0, 0]]


def from_dict(record, state=None):
    """A preprocessing object from ``to_dict`` output (and the pipeline's fitted tensors)."""
    if not isinstance(record, dict) or record.get("kind") not in ("affine", "pipeline"):
        raise ConfigError(f"unknown preprocessing record {record!r}")
    if record["kind"] == "affine":
        return AffineInput(record["size"], record["mean"], record["std"], record.get("order", "RGB"),
                           record.get("value_range", 1.0), record.get("resize"))
    from .data.preprocess import Pipeline

    pipeline = Pipeline.from_config(record["steps"])
    pipeline.load_state_dict(state or {})
    return PipelineInput(pipeline, record["image_shape"])
