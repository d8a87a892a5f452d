"""Where data lives.

Resolution order for a dataset's files:

1. the dataset's ``path`` option (TOML ``[data] path = ...``): a file or folder;
2. ``$RABBIT_DATA/<name>/``;
3. the per-user data folder ``<cache>/datasets/<name>/`` (where ``rabbit data fetch``
   puts downloads).

``<cache>`` is ``$RABBIT_CACHE``, else ``$XDG_CACHE_HOME/rabbitkit``, else
``~/.cache/rabbitkit``.  Decoded-array caches live in ``<cache>/arrays/``.
"""
import os
from pathlib import Path

from ..errors import DataError


def cache_root():
    """The per-user rabbitkit cache folder (not created here)."""
    if os.environ.get("RABBIT_CACHE"):
        return Path(os.environ["RABBIT_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "rabbitkit"
    return Path.home() / ".cache" / "rabbitkit"


def download_dir(name):
    """Where ``rabbit data fetch NAME`` stores the archives of dataset ``name``."""
    return cache_root() / "datasets" / name


def arrays_dir():
    """Where decoded, resized arrays are cached."""
    return cache_root() / "arrays"


def candidate_dirs(name):
    """Folders searched, in order, when no ``path`` option is given."""
    dirs = []
    if os.environ.get("RABBIT_DATA"):
        dirs.append(Path(os.environ["RABBIT_DATA"]).expanduser() / name)
    dirs.append(download_dir(name))
    return dirs


def resolve(name, path=None):
    """The path to read dataset ``name`` from, or None when nothing is there.

    An explicit ``path`` must exist (a typo is an error, not a silent download);
    ``archive.zip/inner/folder`` counts when the archive exists.
    """
    if path is not None:
        p = Path(path).expanduser()
        from .sources import split_archive_path

        archive, inner = split_archive_path(p)
        if not p.exists() and not (inner and archive.is_file()):
            raise DataError(f"dataset '{name}': path '{p}' does not exist (set by the 'path' option / [data] path)")
        return p
    for d in candidate_dirs(name):
        if d.is_dir() and any(not f.name.startswith(".") for f in d.iterdir()):
            return d
    return None


def searched(name):
    """Where a dataset without a ``path`` option is looked for, as one phrase."""
    dirs = [str(d) for d in candidate_dirs(name)]
    if not os.environ.get("RABBIT_DATA"):
        dirs.insert(0, f"$RABBIT_DATA/{name}/")
    return " and ".join(dirs)


def missing(name, archives=(), reason=None, fix=None):
    """The DataError for a dataset that cannot be found anywhere: what is wrong, then the fix.

    Two short lines: ``dataset 'x' not found (...)`` and ``  fix: ...``, the one
    command (``rabbit data fetch x``) or path (``--set data.path=...``) that mends it.
    """
    first = f"dataset '{name}' not found ({reason or 'looked in ' + searched(name)})"
    if fix is None:
        fix = (f"put {', '.join(archives)} into {download_dir(name)}  (or --set data.path=PATH to a copy)"
               if archives else f"--set data.path=PATH (its file or folder), or put it into {candidate_dirs(name)[0]}")
    return DataError(f"{first}\n  fix: {fix}")
