"""On-disk cache of decoded arrays, so the second load of a dataset takes well under a second.

An entry is an uncompressed ``.npz`` (read with ``allow_pickle=False``: loading
a cache never executes code) in ``<cache>/arrays/``.  Its name is a hash of the
source files (names, sizes, modification times), the reader's version and the
options, so changing any of them builds a new entry.  Entries are written to a
temporary name and renamed, so an interrupted write never leaves a half-written
entry behind; an unreadable entry is rebuilt.
"""
import hashlib
import json
import os
import tempfile
import warnings

import numpy as np

from . import paths

FORMAT_VERSION = 1


def cache_key(parts):
    """A stable hex digest of a JSON-able description of the sources and options."""
    text = json.dumps({"format": FORMAT_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def cache_file(kind, parts):
    return paths.arrays_dir() / f"{kind}-{cache_key(parts)}.npz"


def read_arrays(file):
    """The arrays of one entry, or None when it is missing or unreadable."""
    try:
        with np.load(file, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except FileNotFoundError:
        return None
    except Exception:  # truncated/corrupt entry: rebuild it
        return None


def write_arrays(file, arrays):
    """Write ``arrays`` atomically (temporary file in the same folder, fsync, rename)."""
    file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=file.name + ".", suffix=".tmp", dir=file.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, file)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def load_or_build(kind, parts, build, enabled=True):
    """The cached arrays for (kind, parts), built with ``build()`` and stored on a miss.

    ``build`` returns a dict of numpy arrays (no object arrays).  A cache folder
    that cannot be written only costs speed: a warning, and the arrays are returned.
    """
    if not enabled:
        return build()
    file = cache_file(kind, parts)
    arrays = read_arrays(file)
    if arrays is not None:
        return arrays
    arrays = build()
    try:
        write_arrays(file, arrays)
    except OSError as err:
        warnings.warn(f"could not write the data cache {file}: {err}", stacklevel=2)
    return arrays
