"""CIFAR-10 from its official *binary* version (``cifar-10-binary.tar.gz``).

Read from the archive itself or from its extracted folder
(``cifar-10-batches-bin/data_batch_1..5.bin``, ``test_batch.bin``,
``batches.meta.txt``).  Each record is 1 label byte followed by 3072 pixel bytes
(1024 red, 1024 green, 1024 blue, row-major 32x32), which is exactly uint8 NCHW.
The python version (pickled batches) is refused: unpickling a downloaded file can
execute arbitrary code.
"""
import re
import tarfile
from pathlib import Path

import numpy as np

from ...errors import DataError
from ...hookspecs import hookimpl
from .. import cache as array_cache
from .. import fetch
from ..assemble import image_dataset, seed_streams
from ..splitting import limit_per_class

NAME = "cifar10"
READER_VERSION = 1
RECORD = 1 + 3 * 32 * 32
CLASS_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
ARCHIVE = "cifar-10-binary.tar.gz"
_BATCH = re.compile(r"(?:^|/)(data_batch_(\d+)|test_batch)\.bin$")
_PICKLED = re.compile(r"(?:^|/)(data_batch_\d+|test_batch)$")


def _pickle_error(where):
    return DataError(
        f"{where}: this is the python (pickle) version of CIFAR-10; rabbitkit reads only the binary version "
        f"({ARCHIVE}) because loading pickles can execute code"
    )


def _read_archive(path):
    """{member base name: bytes} of the batch and meta files in a tar archive."""
    files = {}
    if not tarfile.is_tarfile(path):
        raise DataError(f"{path}: not a tar archive; expected {ARCHIVE} (the binary version of CIFAR-10)")
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                if _PICKLED.search(member.name):
                    raise _pickle_error(path)
                if _BATCH.search(member.name) or member.name.endswith("batches.meta.txt"):
                    files[member.name.rsplit("/", 1)[-1]] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(f"{path}: corrupt tar archive ({reason}); expected {ARCHIVE}") from None
    return files


def _read_folder(folder):
    files = {}
    for candidate in (folder, folder / "cifar-10-batches-bin"):
        if not candidate.is_dir():
            continue
        for f in sorted(candidate.iterdir()):
            if _PICKLED.search(f.name):
                raise _pickle_error(f)
            if _BATCH.search(f.name) or f.name == "batches.meta.txt":
                files[f.name] = f.read_bytes()
        if files:
            break
    return files


def _records(data, label):
    if len(data) == 0 or len(data) % RECORD:
        raise DataError(
            f"{label}: {len(data)} bytes is not a whole number of {RECORD}-byte records "
            "(1 label byte + 3072 pixel bytes); expected a batch of the binary CIFAR-10"
        )
    records = np.frombuffer(data, np.uint8).reshape(-1, RECORD)
    labels = records[:, 0].astype(np.int64)
    bad = np.flatnonzero(labels >= len(CLASS_NAMES))
    if len(bad):
        raise DataError(f"{label} record {bad[0]}: label {labels[bad[0]]} out of range; expected 0..9")
    return records[:, 1:].reshape(-1, 3, 32, 32), labels


def _parse(files, where):
    train = sorted((n for n in files if n.startswith("data_batch_")), key=lambda n: int(_BATCH.search(n).group(2)))
    if not train:
        raise DataError(f"{where}: no data_batch_N.bin found; expected {ARCHIVE} or its folder cifar-10-batches-bin")
    xs, ys = zip(*(_records(files[n], f"{where}:{n}") for n in train))
    arrays = {"train_x": np.concatenate(xs), "train_y": np.concatenate(ys)}
    if "test_batch.bin" in files:
        arrays["test_x"], arrays["test_y"] = _records(files["test_batch.bin"], f"{where}:test_batch.bin")
    names = CLASS_NAMES
    if "batches.meta.txt" in files:
        listed = [line.strip() for line in files["batches.meta.txt"].decode("utf-8", "replace").splitlines() if line.strip()]
        if len(listed) == len(CLASS_NAMES):
            names = listed
    arrays["class_names"] = np.array(names)
    return arrays


def load_cifar10(
    path: str | None = None,
    seed: int = 0,
    val_fraction: float = 0.1,
    max_per_class: int | None = None,
    download: bool = True,
    cache: bool = True,
):
    """Load CIFAR-10 (binary version) as uint8 (N, 3, 32, 32) images.

    Args:
        path: ``cifar-10-binary.tar.gz``, a folder holding it, or the extracted
            folder; default ``$RABBIT_DATA/cifar10/`` or the per-user data folder.
        seed: seeds the validation split and the ``max_per_class`` selection.
        val_fraction: fraction of the training images held out (stratified).
        max_per_class: keep at most this many images per class and split (quick runs).
        download: fetch the archive when nothing is found locally (not with ``$RABBIT_OFFLINE``).
        cache: keep the arrays decoded from the archive on disk.
    """
    root = Path(fetch.ensure_available(NAME, path, download))
    archive = root if root.is_file() else root / ARCHIVE
    split_rng, limit_rng = seed_streams(seed, 2)
    if archive.is_file():
        st = archive.stat()
        parts = {"reader": NAME, "version": READER_VERSION, "file": str(archive.resolve()), "size": st.st_size,
                 "mtime": st.st_mtime_ns}
        arrays = array_cache.load_or_build(NAME, parts, lambda: _parse(_read_archive(archive), archive), enabled=cache)
        where = archive
    else:
        arrays, where = _parse(_read_folder(root), root), root
    if max_per_class:
        keep = limit_per_class(arrays["train_y"], max_per_class, limit_rng)
        arrays = {**arrays, "train_x": arrays["train_x"][keep], "train_y": arrays["train_y"][keep]}
        if "test_x" in arrays:
            keep = limit_per_class(arrays["test_y"], max_per_class, limit_rng)
            arrays = {**arrays, "test_x": arrays["test_x"][keep], "test_y": arrays["test_y"][keep]}
    info = {"source": str(where), "options": f"val_fraction={val_fraction} seed={seed}"}
    return image_dataset(NAME, arrays, [str(n) for n in arrays["class_names"]], val_fraction, split_rng, info, by_group=False)


@hookimpl
def rabbit_datasets():
    return {NAME: load_cifar10}
