"""Downloading the official dataset archives: progress bar, checksums, resume.

``rabbit data fetch NAME`` and a dataset factory that finds no local copy (its
``download`` option, unless ``$RABBIT_OFFLINE`` is set) call :func:`fetch_dataset`.
A download goes to ``<file>.part``; an interrupted one resumes with an HTTP
Range request; the finished file's SHA-256 (and the publisher's MD5 where that
is what they publish) must match before it is renamed into place.  A corrupt
resumed download is restarted from scratch once; a corrupt fresh one is refused.

Checksums: CIFAR-10's MD5 is published on its page (cs.toronto.edu/~kriz/cifar.html)
and its SHA-256/size are as reported by independent mirrors of that file.  The
GTSRB MD5s are those used by torchvision and other loaders; no SHA-256 is
published for GTSRB, so ``sha256`` is None there and the MD5 plus the archive
format are checked instead.
"""
import hashlib
import http.client
import os
import sys
import urllib.error
import urllib.request
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError
from ..progress import bar
from . import paths

CHUNK = 1 << 20
GTSRB_BASE = "https://sid.erda.dk/public/archives/daaeac0d7ce1152aea9b61d9f1e19370/"


@dataclass(frozen=True)
class Remote:
    """One downloadable file: where it is and how to recognise a good copy."""

    filename: str
    url: str
    sha256: str | None = None
    md5: str | None = None
    size: int | None = None
    archive: str | None = None  # "zip" or "tar": the format a good copy must have


SOURCES = {
    "gtsrb": (
        Remote("GTSRB_Final_Training_Images.zip", GTSRB_BASE + "GTSRB_Final_Training_Images.zip",
               md5="f33fd80ac59bff73c82d25ab499e03a3", archive="zip"),
        Remote("GTSRB_Final_Test_Images.zip", GTSRB_BASE + "GTSRB_Final_Test_Images.zip",
               md5="c7e4e6327067d32654124b0fe9e82185", archive="zip"),
        Remote("GTSRB_Final_Test_GT.zip", GTSRB_BASE + "GTSRB_Final_Test_GT.zip",
               md5="fe31e9c9270bbcd7b84b7f21a9d9d9e5", archive="zip"),
    ),
    "cifar10": (
        Remote("cifar-10-binary.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
               sha256="c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd",
               md5="c32a1d4ab5d03f1284b67883e8d87530", size=170052171, archive="tar"),
    ),
}


def offline():
    """True when ``$RABBIT_OFFLINE`` forbids downloads (CI, air-gapped machines)."""
    return os.environ.get("RABBIT_OFFLINE", "").strip().lower() not in ("", "0", "false", "no")


def file_digests(path):
    sha, md5 = hashlib.sha256(), hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            sha.update(block)
            md5.update(block)
    return sha.hexdigest(), md5.hexdigest()


def verify(path, remote):
    """None when ``path`` is a good copy of ``remote``, else what is wrong (one phrase)."""
    size = path.stat().st_size
    if remote.size is not None and size != remote.size:
        return f"size {size} bytes, expected {remote.size}"
    sha, md5 = file_digests(path)
    if remote.sha256 and sha != remote.sha256:
        return f"SHA-256 {sha}, expected {remote.sha256}"
    if remote.md5 and md5 != remote.md5:
        return f"MD5 {md5}, expected {remote.md5}"
    if remote.archive == "zip" and not zipfile.is_zipfile(path):
        return "not a zip archive"
    if remote.archive == "tar" and not tarfile.is_tarfile(path):
        return "not a tar archive"
    return None


class NetworkError(DataError):
    """The server could not be reached at all (no network, DNS failure, refused)."""

    def __init__(self, message, host, reason):
        super().__init__(message)
        self.host, self.reason = host, reason


def _network_error(remote, dest, err):
    reason = " ".join(str(getattr(err, "reason", None) or err).split())
    host = remote.url.split("/")[2]
    return NetworkError(f"cannot download {remote.url} ({reason}); without network, put {remote.filename} into "
                        f"{dest.parent} yourself, or point [data] path / $RABBIT_DATA at a copy", host, reason)


def _transfer(remote, part, timeout, progress):
    """Append the rest of ``remote`` to ``part`` (resuming with Range); True if it resumed."""
    offset = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(remote.url, headers={"User-Agent": "rabbitkit"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:  # the partial file is already as long as (or longer than) the file
            part.unlink()
            return _transfer(remote, part, timeout, progress)
        raise DataError(f"cannot download {remote.url}: HTTP {err.code} {err.reason}") from None
    with response:
        resumed = offset > 0 and response.status == 206
        if not resumed:
            offset = 0  # the server ignored the Range request: start again
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        with bar(total, remote.filename, progress, unit="B", unit_scale=True, initial=offset) as downloaded:
            with open(part, "ab" if resumed else "wb") as f:
                while block := response.read(CHUNK):
                    f.write(block)
                    downloaded.update(len(block))
        if total is not None and part.stat().st_size < total:
            raise ConnectionError(f"connection closed after {part.stat().st_size} of {total} bytes")
    return resumed


def download(remote, dest, progress=True, timeout=30, attempts=3):
    """Download ``remote`` to the file ``dest`` (verified); returns ``dest``.

    A good existing ``dest`` is kept.  Interrupted transfers resume (up to
    ``attempts`` tries); the partial file stays as ``dest.part`` for the next call.
    """
    dest = Path(dest)
    if dest.exists() and verify(dest, remote) is None:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    restarted = False
    tries = 0
    while True:
        tries += 1
        try:
            resumed = _transfer(remote, part, timeout, progress)
        except (urllib.error.URLError, http.client.HTTPException, TimeoutError, OSError) as err:
            if isinstance(err, urllib.error.URLError) and not part.exists():
                raise _network_error(remote, dest, err) from None
            if tries < attempts:
                continue
            raise DataError(
                f"download of {remote.url} was interrupted ({err}); run the same command again to resume"
            ) from None
        problem = verify(part, remote)
        if problem is None:
            os.replace(part, dest)
            return dest
        part.unlink()
        if resumed and not restarted:  # the old partial may have been the bad piece: once more from zero
            restarted = True
            continue
        raise DataError(
            f"downloaded {remote.filename} is corrupt ({problem}); it was deleted: run again, or download "
            f"{remote.url} by hand into {dest.parent}"
        )


def fetch_dataset(name, dest=None, progress=True):
    """Download every archive of dataset ``name`` into ``dest`` (default: the per-user data folder)."""
    if name not in SOURCES:
        known = ", ".join(sorted(SOURCES))
        raise DataError(f"no download known for dataset '{name}' (downloadable: {known}); provide it with [data] path")
    dest = Path(dest) if dest is not None else paths.download_dir(name)
    for remote in SOURCES[name]:
        download(remote, dest / remote.filename, progress=progress)
    return dest


def ensure_available(name, path=None, download=True):
    """The local path of dataset ``name``, downloading it when allowed and nothing is found."""
    found = paths.resolve(name, path)
    if found is not None:
        return found
    archives = [r.filename for r in SOURCES.get(name, ())]
    if not download or offline() or name not in SOURCES:
        reason = f"looked in {paths.searched(name)}"
        fix = None  # copy the files in
        if name in SOURCES and offline():
            reason += "; downloads are off: $RABBIT_OFFLINE is set"
        elif name in SOURCES:  # the dataset's download option is off
            fix = f"rabbit data fetch {name}  (or --set data.path=PATH to a copy)"
        raise paths.missing(name, archives, reason=reason, fix=fix)
    print(f"dataset '{name}' not found locally: downloading it to {paths.download_dir(name)}", file=sys.stderr)
    try:
        return fetch_dataset(name, progress=True)
    except NetworkError as err:
        reason = f"not in {paths.searched(name)}; cannot reach {err.host}: {err.reason}"
        raise paths.missing(name, archives, reason=reason) from None
