"""Uniform read access to a folder tree or a zip archive of one.

Dataset readers list member names (posix paths relative to the root), read
bytes, and name a member in error messages the same way for both kinds.  Tar
archives are read by the readers that need them (CIFAR-10) because a tar.gz can
only be streamed, not randomly accessed.
"""
import os
import threading
import zipfile
from pathlib import Path

from ..errors import DataError


class _Source:
    """Membership test shared by the sources: the set of names is built once, on first use."""

    _set = None

    def exists(self, name):
        if self._set is None:
            self._set = set(self.names())
        return name in self._set


class FolderSource(_Source):
    """Files under a folder; member names are relative posix paths."""

    kind = "folder"

    def __init__(self, root):
        self.root = Path(root)
        self._names = None

    @property
    def label(self):
        return str(self.root)

    def names(self):
        if self._names is None:
            names = []
            for dirpath, dirnames, filenames in os.walk(self.root):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                rel = os.path.relpath(dirpath, self.root)
                prefix = "" if rel == "." else rel.replace(os.sep, "/") + "/"
                names.extend(prefix + f for f in sorted(filenames) if not f.startswith("."))
            self._names = names
        return self._names

    def read(self, name):
        try:
            return (self.root / name).read_bytes()
        except OSError as err:
            raise DataError(f"{self.member_label(name)}: cannot read file ({err.strerror})") from None

    def member_label(self, name):
        return str(self.root / name)

    def fingerprint(self):
        """Names, sizes and modification times of every file (the cache key)."""
        entries = []
        for name in self.names():
            st = (self.root / name).stat()
            entries.append((name, st.st_size, st.st_mtime_ns))
        return {"folder": str(self.root.resolve()), "files": entries}


class ZipSource(_Source):
    """Members of a zip archive (thread-safe reads; directories are skipped)."""

    kind = "zip"

    def __init__(self, path, prefix=""):
        self.path = Path(path)
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        try:
            self._zip = zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, OSError) as err:
            raise DataError(f"{self.path}: not a readable zip archive ({err})") from None
        self._lock = threading.Lock()
        self._names = None

    @property
    def label(self):
        return str(self.path) + (f":{self.prefix}" if self.prefix else "")

    def names(self):
        if self._names is None:
            n = len(self.prefix)
            self._names = [
                info.filename[n:]
                for info in self._zip.infolist()
                if not info.is_dir() and info.filename.startswith(self.prefix)
                and not any(part.startswith(".") or part == "__MACOSX" for part in info.filename.split("/"))
            ]
            if self.prefix and not self._names:
                raise DataError(f"{self.path}: no folder '{self.prefix.rstrip('/')}' inside the archive")
        return self._names

    def read(self, name):
        try:
            with self._lock:  # one reader at a time on the shared file handle; decoding runs in parallel
                return self._zip.read(self.prefix + name)
        except KeyError:
            raise DataError(f"{self.member_label(name)}: no such member in the archive") from None
        except (zipfile.BadZipFile, OSError, EOFError) as err:
            raise DataError(f"{self.member_label(name)}: corrupt archive member ({err})") from None

    def member_label(self, name):
        return f"{self.path}:{self.prefix}{name}"

    def fingerprint(self):
        st = self.path.stat()
        return {"zip": str(self.path.resolve()), "prefix": self.prefix, "size": st.st_size, "mtime": st.st_mtime_ns}


def split_archive_path(path):
    """``a/b.zip/inner/dir`` -> (``a/b.zip``, ``inner/dir``); a plain path -> (path, "")."""
    path = Path(path)
    if path.exists():
        return path, ""
    for parent in path.parents:
        if parent.is_file() and zipfile.is_zipfile(parent):
            return parent, path.relative_to(parent).as_posix()
    return path, ""


def open_source(path, subdir=""):
    """A FolderSource or ZipSource for ``path`` (``x.zip/inner`` selects a folder in a zip)."""
    path, inner = split_archive_path(path)
    inner = "/".join(p for p in (inner, subdir or "") if p)
    if path.is_dir():
        return FolderSource(path / inner if inner else path)
    if path.is_file():
        if not zipfile.is_zipfile(path):
            raise DataError(f"{path}: expected a folder or a .zip archive, got a file of another kind")
        return ZipSource(path, inner)
    raise DataError(f"{path}: no such file or folder")
