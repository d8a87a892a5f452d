"""PyTorch's zip format (``torch.save`` since 1.6).

The archive holds one folder (named after the file or ``archive``) with
``data.pkl`` (the pickled object, tensors as persistent ids), ``data/<key>`` (one
raw storage per key, native byte order), ``byteorder`` (``little``/``big``; absent
in files from before 1.10, which are little-endian), ``version`` and a few
bookkeeping entries. PyTorch stores every entry uncompressed and 64-byte aligned,
so a storage is a plain byte range of the file: only the central directory and
``data.pkl`` are parsed (``zipfile`` reads only the directory), and each storage is
read from its offset straight into its array.
"""
import struct
import zipfile

from ..errors import WeightsError
from . import limits
from .fileio import read_array, read_bytes
from .pickle_vm import PickleVM
from .tensors import check_view, materialize, native
from .torch_globals import Storages, allowed_globals
from .unwrap import flatten_checkpoint

_LOCAL_HEADER = struct.Struct("<4s22xHH")


def read_torch_zip(path, handle, file_size):
    where = str(path)
    try:
        archive = zipfile.ZipFile(handle)
        infos = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError, OSError, struct.error,
            NotImplementedError) as err:
        raise WeightsError(f"{where}: corrupt zip archive ({err})") from None
    entries = {info.filename: info for info in infos}
    pickles = [name for name in entries if name.endswith("/data.pkl") and name.count("/") == 1]
    if len(pickles) != 1:
        if any(name.endswith("/constants.pkl") or "/code/" in name for name in entries):
            raise WeightsError(f"{where}: a TorchScript archive (torch.jit.save), not a state_dict; "
                               "save the model's state_dict() instead")
        if not pickles:
            raise WeightsError(f"{where}: zip archive without a <folder>/data.pkl entry: not a PyTorch file "
                               "(a .npz or another zip?)")
        raise WeightsError(f"{where}: zip archive with {len(pickles)} data.pkl entries (PyTorch writes one)")
    folder = pickles[0][:-len("data.pkl")]

    def entry(name, cap):
        info = entries[name]
        if info.flag_bits & 0x1:
            raise WeightsError(f"{where}: zip entry '{name}' is encrypted")
        if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
            raise WeightsError(f"{where}: zip entry '{name}' is compressed; PyTorch stores entries uncompressed "
                               "(was the file re-zipped?)")
        if info.file_size > cap:
            raise WeightsError(f"{where}: zip entry '{name}' is {info.file_size} bytes, over the {cap}-byte cap")
        header = read_bytes(handle, info.header_offset, _LOCAL_HEADER.size, where)
        signature, name_length, extra_length = _LOCAL_HEADER.unpack(header)
        if signature != b"PK\x03\x04":
            raise WeightsError(f"{where}: zip entry '{name}' has no local header at byte {info.header_offset}")
        start = info.header_offset + _LOCAL_HEADER.size + name_length + extra_length
        if start + info.file_size > file_size:
            raise WeightsError(f"{where}: zip entry '{name}' runs past the end of the file")
        return start, info.file_size

    start, size = entry(folder + "data.pkl", limits.MAX_PICKLE_BYTES)
    pickle_bytes = read_bytes(handle, start, size, where)

    big_endian = False
    if folder + "byteorder" in entries:
        order = read_bytes(handle, *entry(folder + "byteorder", limits.MAX_SMALL_ENTRY_BYTES), where)
        if order not in (b"little", b"big"):
            raise WeightsError(f"{where}: byteorder entry says {order[:16]!r}, expected b'little' or b'big'")
        big_endian = order == b"big"

    storages = Storages(legacy=False)
    obj, end = PickleVM(pickle_bytes, f"{where} ({folder}data.pkl)", allowed_globals(), storages).run()
    refs, metadata = flatten_checkpoint(obj, where)
    metadata["byteorder"] = "big" if big_endian else "little"
    if folder + "version" in entries:
        version = read_bytes(handle, *entry(folder + "version", limits.MAX_SMALL_ENTRY_BYTES), where)
        metadata["archive_version"] = version.decode("ascii", "replace").strip()

    ranges = {}
    for ref in refs.values():
        key = ref.storage.key
        if key not in ranges:
            name = f"{folder}data/{key}"
            if name not in entries:
                raise WeightsError(f"{where}: storage '{key}' has no zip entry '{name}'")
            ranges[key] = entry(name, limits.MAX_STORAGE_BYTES)
    return "torch-zip", materialize_all(refs, ranges, handle, big_endian, file_size, where), metadata


def materialize_all(refs, ranges, handle, big_endian, file_size, where):
    """Read each storage once (``ranges``: key -> (offset, bytes)) and build its tensors.

    Storages are read one at a time and dropped once their tensors are built, so
    memory holds the results plus at most one storage being sliced.
    """
    by_storage = {}
    for name, ref in refs.items():
        by_storage.setdefault(ref.storage.key, []).append(name)
    total = sum(size for _, size in ranges.values())
    if total > file_size:
        # Entries overlapping one another could make a small file expand without bound.
        raise WeightsError(f"{where}: storages add up to {total} bytes, more than the file's {file_size}")
    out = {}
    for key, names in by_storage.items():
        start, size = ranges[key]
        storage = refs[names[0]].storage
        available = size // storage.etype.itemsize
        for name in names:
            check_view(where, name, refs[name], available)
        raw = native(read_array(handle, start, storage.numel, storage.etype.raw, where), big_endian)
        for name in names:
            out[name] = materialize(raw, refs[name])
        del raw
    return {name: out[name] for name in refs}
