"""Reading byte ranges of a weight file straight into numpy arrays.

Storages are read with positioned ``readinto`` calls into the array that becomes
the tensor, not through a memory map: the result then owns its memory (a map
would tie every tensor to the file, crash the process with SIGBUS if the file is
rewritten or truncated while in use, and count both the mapped pages and any
converted copy in the resident size), and the only copy is the kernel's, from the
page cache into the array.
"""
import numpy as np

from ..errors import WeightsError
from . import limits


def read_array(handle, offset, count, dtype, where):
    """``count`` elements of ``dtype`` at byte ``offset`` of the unbuffered file ``handle``."""
    dtype = np.dtype(dtype)
    nbytes = count * dtype.itemsize
    if nbytes > limits.MAX_STORAGE_BYTES:
        raise WeightsError(f"{where}: a storage of {nbytes} bytes exceeds the {limits.MAX_STORAGE_BYTES}-byte cap")
    array = np.empty(count, dtype)
    read_into(handle, offset, array, where)
    return array


def read_into(handle, offset, array, where):
    """Fill the C-contiguous ``array`` with the bytes at ``offset``."""
    buffer = memoryview(array.view(np.uint8).reshape(-1))
    nbytes = len(buffer)
    handle.seek(offset)
    done = 0
    while done < nbytes:
        got = handle.readinto(buffer[done:])
        if not got:
            raise WeightsError(f"{where}: file ends at byte {offset + done}, {nbytes - done} bytes short of a tensor")
        done += got


def read_bytes(handle, offset, nbytes, where):
    """``nbytes`` bytes at ``offset`` (for the small parts: headers, pickles)."""
    handle.seek(offset)
    data = handle.read(nbytes)
    if len(data) != nbytes:
        raise WeightsError(f"{where}: file ends at byte {offset + len(data)}, {nbytes - len(data)} bytes short")
    return data
