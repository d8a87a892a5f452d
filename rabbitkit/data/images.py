"""Decoding and resizing images with Pillow, in parallel threads.

Pillow releases the GIL while it decodes and resamples, so a thread pool scales
with the cores.  Resizing is Pillow's convolution resampler (bilinear, antialiased when
shrinking), after the optional crop.  Images of many different sizes do not map onto one Numba kernel well, and
Pillow's C loops are already the fast path here, so there is no Numba resize.
"""
import io
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..errors import DataError
from ..progress import bar


def pillow():
    from PIL import Image

    return Image


def decode(data, label, mode="RGB"):
    """Decode image bytes into a loaded PIL image in ``mode`` ("RGB" or "L").

    A truncated or corrupt file raises DataError naming ``label``.
    """
    Image = pillow()
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        if img.mode != mode:
            img = img.convert(mode)
    except Exception as err:  # Pillow raises OSError, SyntaxError, ValueError, ... on bad input
        reason = " ".join(str(err).split())
        raise DataError(f"{label}: cannot decode image ({type(err).__name__}: {reason}); expected a complete image file") from None
    return img


def decode_resized(data, label, size=None, box=None, grayscale=False):
    """One image as uint8 (C, H, W): decoded, cropped to ``box`` and resized to ``size`` x ``size``.

    ``box`` is (x1, y1, x2, y2) in pixels, x2/y2 exclusive; it is clipped to the
    image.  ``size`` None keeps the (cropped) image's own size.
    """
    Image = pillow()
    img = decode(data, label, "L" if grayscale else "RGB")
    if box is not None:
        x1, y1, x2, y2 = box
        x1, y1 = max(0, x1), max(0, y1)
        x2, y2 = min(img.width, x2), min(img.height, y2)
        if x2 <= x1 or y2 <= y1:
            raise DataError(f"{label}: region of interest {tuple(box)} lies outside the {img.width}x{img.height} image")
        # Crop first: resize(box=...) would let the filter reach pixels outside the box.
        img = img.crop((x1, y1, x2, y2))
    if size is not None and img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    array = np.asarray(img, dtype=np.uint8)
    if array.ndim == 2:
        return array[None]
    return array.transpose(2, 0, 1)


def default_workers():
    return max(1, min(16, os.cpu_count() or 1))


def load_images(items, size=None, boxes=None, grayscale=False, labels=None, workers=None, progress=None):
    """Decode ``items`` (a list of (source, member name)) into one uint8 (N, C, H, W) array, in parallel.

    ``boxes`` (optional, one (x1, y1, x2, y2) per image) crops before resizing;
    ``labels`` (optional, one per image) prefix error messages (e.g. "Train.csv row
    17"); with ``size`` None every image must have the same size.  A progress bar
    (images decoded / total) shows on a terminal unless ``progress`` is False; the
    cache (:mod:`rabbitkit.data.cache`) means it is seen on the first load only.
    """
    n = len(items)
    channels = 1 if grayscale else 3
    if n == 0:
        return np.zeros((0, channels, size or 0, size or 0), np.uint8)

    def label_of(i):
        source, name = items[i]
        label = source.member_label(name)
        return f"{labels[i]}: {label}" if labels is not None else label

    def one(i):
        source, name = items[i]
        box = None if boxes is None else boxes[i]
        return decode_resized(source.read(name), label_of(i), size, box, grayscale)

    first = one(0)
    out = np.empty((n,) + first.shape, np.uint8)
    out[0] = first

    def fill(chunk):
        for i in chunk:
            img = one(i)
            if img.shape != first.shape:
                raise DataError(
                    f"{label_of(i)}: image is {img.shape[2]}x{img.shape[1]} but the first one is "
                    f"{first.shape[2]}x{first.shape[1]}; set the image_size option to resize them all"
                )
            out[i] = img
        return chunk

    workers = workers or default_workers()
    chunks = [range(s, min(n, s + 64)) for s in range(1, n, 64)]
    with bar(n, "decoding images", progress, unit="img", initial=1) as decoded:
        if workers == 1 or len(chunks) <= 1:
            for chunk in chunks:
                fill(chunk)
                decoded.update(len(chunk))
        else:
            with ThreadPoolExecutor(workers) as pool:
                for chunk in pool.map(fill, chunks):  # re-raises the first worker error
                    decoded.update(len(chunk))
    return out
