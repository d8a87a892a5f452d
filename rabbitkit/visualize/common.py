"""Shared pieces of every image-optimisation command (Deep Dream, class models,
saliency, style transfer): reading and writing images, the per-step log, the
seed, Adam on an image and the progress bar.

Nothing here knows about networks; a command strings the pieces together::

    from rabbitkit.visualize import common

    rng = common.make_rng(seed)                      # one seed: jitter, noise, init
    image = common.load_image("photo.jpg")           # uint8 (H, W, 3); DataError names the file
    x = rng.normal(0, 1, (3, 64, 64)).astype(np.float32)
    adam = common.ImageAdam(x, lr=0.05)
    log = common.StepLog()
    with common.objective_bar(100, "dream") as bar:
        for step in range(100):
            value, grad = objective_and_gradient(x)  # the command's own
            adam.step(grad, maximise=True)           # x changes in place
            log.record(objective=value)
            bar.update(1, objective=value)
    common.save_image_and_log("out.png", to_uint8(x), log)   # out.png + out.csv, atomically

Same seed and same inputs give byte-identical PNGs on the CPU: the PNG encoder
adds no timestamps and every random draw comes from the one generator.
"""
import csv
import io
import os
import pathlib

import numpy as np

from ..backend import get_backend
from ..errors import DataError
from ..layers.base import Param
from ..optim import Adam
from ..progress import bar as _bar

__all__ = ["load_image", "write_png", "csv_path_for", "StepLog", "save_image_and_log", "make_rng",
           "ImageAdam", "objective_bar"]


# -- images ---------------------------------------------------------------------------
def load_image(path, size=None, grayscale=False):
    """An image file as uint8 ``(H, W, 3)`` (or ``(H, W)`` with ``grayscale``).

    ``size``: an int resizes the shorter side to ``size`` (keeping the aspect),
    a pair ``(width, height)`` resizes to exactly that.  A missing, unreadable or
    corrupt file raises :class:`~rabbitkit.errors.DataError` naming it.
    """
    from ..data.images import decode, pillow

    path = pathlib.Path(path)
    if not path.exists():
        raise DataError(f"{path}: image file not found")
    if not path.is_file():
        raise DataError(f"{path}: not a file; expected an image file (PNG, JPEG, ...)")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read image ({err.strerror or err})") from None
    img = decode(data, str(path), "L" if grayscale else "RGB")
    if size is not None:
        if isinstance(size, int):
            scale = size / min(img.size)
            size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        size = (int(size[0]), int(size[1]))
        if size != img.size:
            img = img.resize(size, pillow().BILINEAR)
    return np.asarray(img, dtype=np.uint8).copy()


def _atomic_write_bytes(path, data):
    """Write ``data`` to ``path`` through a temporary file in the same folder, then rename."""
    path = pathlib.Path(path)
    if path.parent and not path.parent.is_dir():
        raise DataError(f"{path}: folder {path.parent} does not exist")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def png_bytes(image):
    """PNG encoding of a uint8 ``(H, W)``, ``(H, W, 1)`` or ``(H, W, 3)`` array (deterministic)."""
    from ..data.images import pillow

    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"PNG images must be uint8, got {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
        raise ValueError(f"PNG images are (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {image.shape}")
    buffer = io.BytesIO()
    pillow().fromarray(np.ascontiguousarray(image)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_png(path, image):
    """Write a uint8 HWC (or HW) image as PNG atomically: the file is complete or absent."""
    return _atomic_write_bytes(path, png_bytes(image))


# -- the per-step log --------------------------------------------------------------------
def csv_path_for(image_path):
    """The CSV log that belongs beside an output image: ``out.png`` -> ``out.csv``."""
    return pathlib.Path(image_path).with_suffix(".csv")


class StepLog:
    """Rows of named values (the objective, each loss term), one per optimisation step.

    ``record(**values)`` adds a row; the step number (from 1) and any ``context``
    (e.g. ``octave=2``) are prepended.  Columns are the union of all keys in
    first-seen order.  :meth:`csv_text` gives the CSV; :meth:`write` writes it
    atomically.
    """

    def __init__(self):
        self.rows = []
        self._columns = {"step": None}

    def record(self, context=None, **values):
        row = {"step": len(self.rows) + 1, **(context or {}), **values}
        for key in row:
            self._columns.setdefault(key, None)
        self.rows.append(row)
        return row

    @property
    def columns(self):
        return list(self._columns)

    def column(self, name):
        """Every row's value of ``name`` (None where a row lacks it)."""
        return [row.get(name) for row in self.rows]

    def csv_text(self):
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=self.columns, lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({k: (repr(float(v)) if isinstance(v, (float, np.floating)) else v) for k, v in row.items()})
        return out.getvalue()

    def write(self, path):
        return _atomic_write_bytes(path, self.csv_text().encode())


def save_image_and_log(image_path, image, log):
    """Write ``image`` (uint8 HWC) as PNG and ``log`` as the CSV beside it; returns both paths.

    Both are encoded before either is written, and each is written atomically,
    so an error leaves no half-written file.
    """
    image_path = pathlib.Path(image_path)
    encoded = png_bytes(image)
    text = log.csv_text().encode()
    csv_path = _atomic_write_bytes(csv_path_for(image_path), text)
    return _atomic_write_bytes(image_path, encoded), csv_path


# -- randomness -------------------------------------------------------------------------------
def make_rng(seed=None):
    """The one generator of a command: jitter, noise and initialisation all draw from it.

    ``seed`` an int gives the same draws every time; None draws fresh entropy;
    a ``numpy.random.Generator`` is passed through (a caller sharing its own).
    """
    if isinstance(seed, np.random.Generator):
        return seed
    return np.random.default_rng(None if seed is None else int(seed))


# -- Adam on an image ---------------------------------------------------------------------------
class ImageAdam:
    """Adam (PyTorch's rule, rabbitkit's own kernel) on one float image array, in place.

    ``step(grad, maximise=False)`` moves ``image`` against the gradient (or along
    it with ``maximise``)::

        x = np.zeros((3, 8, 8), np.float32)
        adam = ImageAdam(x, lr=0.1)
        adam.step(np.ones_like(x))      # x is now -0.1 everywhere
    """

    def __init__(self, image, lr=0.01, betas=(0.9, 0.999), eps=1e-8):
        if not isinstance(image, np.ndarray) or image.dtype not in (np.float32, np.float64) \
                or not image.flags.c_contiguous:
            raise ValueError("ImageAdam needs a C-contiguous float32/float64 numpy array")
        self.image = image
        self._grad = np.zeros_like(image)
        param = Param("image", image, self._grad, "image", get_backend("cpu"))
        self._adam = Adam([param], lr=lr, betas=betas, eps=eps)

    @property
    def lr(self):
        return self._adam.lr

    @lr.setter
    def lr(self, value):
        self._adam.lr = float(value)

    @property
    def steps(self):
        return self._adam.steps

    def step(self, grad, maximise=False):
        np.copyto(self._grad, -grad if maximise else grad, casting="same_kind")
        self._adam.step()
        return self.image


# -- progress -------------------------------------------------------------------------------------
def objective_bar(total, desc, enabled=None):
    """A progress bar for ``total`` steps; ``bar.update(1, objective=v, tv=t)`` shows the values.

    Shown only on a terminal (see :mod:`rabbitkit.progress`); ``enabled=False`` silences it.
    """
    return _bar(total, desc, enabled, unit="step")
