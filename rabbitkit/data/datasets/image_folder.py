"""Image classification from a folder tree (or a zip of one): one sub-folder per class.

The layout of NDSB plankton and ImageNet-style trees::

    root/<class>/<image>           (validation carved out with val_fraction)
    root/train/<class>/<image>, root/val/<class>/..., root/test/<class>/...

Any format Pillow reads; other files are ignored.  ``path`` may point inside a
zip (``archive.zip/some/folder``) or use the ``subdir`` option.  Class ids are
the sorted class-folder names.
"""
import numpy as np

from ...errors import DataError
from ...hookspecs import hookimpl
from .. import cache as array_cache
from .. import paths
from ..assemble import image_dataset, seed_streams
from ..base import Split
from ..images import load_images
from ..sources import open_source
from ..splitting import limit_per_class

NAME = "image_folder"
READER_VERSION = 1
SPLIT_DIRS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


def _image_extensions():
    from PIL import Image

    return {ext.lower() for ext in Image.registered_extensions()}


def _scan(source):
    """{split: [(class name, member)]}: split 'pool' when there are no train/val/test folders."""
    extensions = _image_extensions()
    images = [n for n in source.names() if "/" in n and "." + n.rsplit(".", 1)[-1].lower() in extensions]
    tops = {n.split("/", 1)[0] for n in images}
    presplit = "train" in tops and tops <= set(SPLIT_DIRS)
    found = {}
    for n in images:
        parts = n.split("/")
        if presplit:
            if len(parts) < 3:
                continue
            found.setdefault(SPLIT_DIRS[parts[0]], []).append((parts[1], n))
        else:
            found.setdefault("pool", []).append((parts[0], n))
    return found


def load_image_folder(
    path: str | None = None,
    seed: int = 0,
    image_size: int | None = None,
    grayscale: bool = False,
    val_fraction: float = 0.1,
    subdir: str | None = None,
    max_per_class: int | None = None,
    cache: bool = True,
):
    """Load a class-per-folder image tree as uint8 NCHW.

    Args:
        path: the folder, a zip of it, or ``archive.zip/inner/folder``.
        seed: seeds the validation split (and ``max_per_class``).
        image_size: resize every image to this square; None keeps their size
            (then all images must have the same size).
        grayscale: decode to one channel.
        val_fraction: validation fraction (stratified) when there is no val/ folder.
        subdir: a folder inside ``path`` to read instead of its root.
        max_per_class: keep at most this many training images per class.
        cache: keep the decoded arrays on disk.
    """
    root = paths.resolve(NAME, path)
    if root is None:
        raise paths.missing(NAME)
    source = open_source(root, subdir or "")
    split_rng, limit_rng = seed_streams(seed, 2)
    parts = {"reader": NAME, "version": READER_VERSION, "source": source.fingerprint(), "image_size": image_size,
             "grayscale": grayscale, "max_per_class": max_per_class, "seed": seed if max_per_class else None}

    def build():
        found = _scan(source)
        if not found:
            raise DataError(
                f"{source.label}: no images in class folders; expected <class>/<image> files (e.g. cat/0001.png), "
                "optionally under train/, val/, test/"
            )
        classes = sorted({c for items in found.values() for c, _ in items})
        index = {c: i for i, c in enumerate(classes)}
        arrays = {"class_names": np.array(classes)}
        for split, items in found.items():
            y = np.array([index[c] for c, _ in items], np.int64)
            keep = np.arange(len(items))
            if max_per_class and split in ("pool", "train"):
                keep = limit_per_class(y, max_per_class, limit_rng)
            arrays[f"{split}_x"] = load_images([(source, items[i][1]) for i in keep], size=image_size, grayscale=grayscale)
            arrays[f"{split}_y"] = y[keep]
        return arrays

    arrays = array_cache.load_or_build(NAME, parts, build, enabled=cache)
    classes = [str(c) for c in arrays["class_names"]]
    info = {"source": source.label, "options": f"image_size={image_size} grayscale={grayscale} val_fraction={val_fraction} seed={seed}"}
    if "pool_x" in arrays:
        pool = {"train_x": arrays["pool_x"], "train_y": arrays["pool_y"]}
        return image_dataset(NAME, pool, classes, val_fraction, split_rng, info, by_group=False)
    shapes = {arrays[f"{s}_x"].shape[1:] for s in ("train", "val", "test") if f"{s}_x" in arrays}
    if len(shapes) > 1:
        raise DataError(f"{source.label}: the train/val/test images have different sizes {sorted(shapes)}; set image_size")
    dataset = image_dataset(NAME, arrays, classes, 0.0 if "val_x" in arrays else val_fraction, split_rng, info, by_group=False)
    if "val_x" in arrays:
        dataset.splits["val"] = Split(arrays["val_x"], arrays["val_y"])
        dataset.splits = {k: dataset.splits[k] for k in ("train", "val", "test") if k in dataset.splits}
    return dataset


@hookimpl
def rabbit_datasets():
    return {NAME: load_image_folder}
