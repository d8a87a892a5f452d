"""PyTorch's legacy format (``torch.save`` of 0.4-1.5, and later with
``_use_new_zipfile_serialization=False``).

One stream of five pickles followed by raw storages:

1. the magic number 0x1950a86a20f9469cfc6c (a LONG1),
2. the protocol version 1001,
3. ``sys_info``: ``{"protocol_version", "little_endian", "type_sizes"}``,
4. the object itself (tensors as persistent ids with a sixth, always-None field),
5. the sorted list of storage keys;

then, for each key in that list, an int64 element count and the storage's bytes
in the writer's byte order. The pickles are parsed from a read-only memory map
(only their pages are touched); the storage headers are then walked and every
count checked against the persistent id and the file size before any storage is
read.
"""
import mmap
import struct

from ..errors import WeightsError
from .fileio import read_bytes
from . import limits
from .pickle_vm import PickleVM
from .torch_globals import Storages, allowed_globals
from .torch_zip import materialize_all
from .unwrap import flatten_checkpoint

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001


def read_torch_legacy(path, handle, file_size):
    where = str(path)
    if file_size == 0:
        raise WeightsError(f"{where}: empty file")
    with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        end = min(file_size, limits.MAX_PICKLE_BYTES)

        def plain(pos, what):
            # The header pickles hold only numbers, strings and dicts: no globals allowed.
            return PickleVM(data, f"{where} ({what})", {}, _no_persistent_ids, start=pos, end=end).run()

        magic, pos = plain(0, "magic number")
        if magic != MAGIC_NUMBER:
            raise WeightsError(f"{where}: a pickle file, but not a PyTorch checkpoint (no PyTorch magic number); "
                               "rabbitkit reads only tensors from PyTorch files")
        version, pos = plain(pos, "protocol version")
        if version != PROTOCOL_VERSION:
            raise WeightsError(f"{where}: legacy PyTorch protocol version {version!r}, expected {PROTOCOL_VERSION}")
        sys_info, pos = plain(pos, "sys_info")
        if not isinstance(sys_info, dict) or type(sys_info.get("little_endian")) is not bool:
            raise WeightsError(f"{where}: legacy header sys_info is not a dict with little_endian")
        big_endian = not sys_info["little_endian"]
        storages = Storages(legacy=True)
        obj, pos = PickleVM(data, f"{where} (pickle)", allowed_globals(), storages, start=pos, end=end).run()
        keys, pos = plain(pos, "storage keys")
        if type(keys) is not list or not all(type(k) is str for k in keys):
            raise WeightsError(f"{where}: legacy storage key list is not a list of strings")
    refs, metadata = flatten_checkpoint(obj, where)
    metadata["byteorder"] = "big" if big_endian else "little"

    count_format = struct.Struct(">q" if big_endian else "<q")
    ranges = {}
    for key in keys:
        storage = storages.by_key.get(key)
        if storage is None:
            raise WeightsError(f"{where}: storage '{key}' is listed but no tensor uses it")
        if key in ranges:
            raise WeightsError(f"{where}: storage '{key}' is listed twice")
        (count,) = count_format.unpack(read_bytes(handle, pos, 8, f"{where} (storage '{key}')"))
        nbytes = count * storage.etype.itemsize
        if count < 0 or pos + 8 + nbytes > file_size:
            raise WeightsError(f"{where}: storage '{key}' at byte {pos} claims {count} elements, "
                               f"past the end of the file ({file_size} bytes)")
        if count != storage.numel:
            raise WeightsError(f"{where}: storage '{key}' holds {count} elements but the pickle "
                               f"declares {storage.numel}")
        ranges[key] = (pos + 8, nbytes)
        pos += 8 + nbytes
    for ref in refs.values():
        if ref.storage.key not in ranges:
            raise WeightsError(f"{where}: storage '{ref.storage.key}' is missing from the storage list")
    return "torch-legacy", materialize_all(refs, ranges, handle, big_endian, file_size, where), metadata


def _no_persistent_ids(pid, vm):
    vm.fail("persistent id in a header pickle")
