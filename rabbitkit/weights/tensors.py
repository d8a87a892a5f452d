"""Element types, tensor stand-ins and the step from stored bytes to numpy arrays.

Every reader hands out only three dtypes, so code built on top never meets a
half-precision or small-integer array it cannot compute with: floats become
float32 (half and bfloat16 widened, exactly) or stay float64; integers and bools
become int64.
"""
import numpy as np

from ..errors import WeightsError
from . import limits


class ElementType:
    """How one stored element type is read (``raw``) and what it becomes (``out``)."""

    __slots__ = ("name", "raw", "out")

    def __init__(self, name, raw, out):
        self.name = name
        self.raw = np.dtype(raw)
        self.out = np.dtype(out)

    @property
    def itemsize(self):
        return self.raw.itemsize

    def __repr__(self):
        return self.name


# bfloat16 has no numpy dtype: it is read as uint16 and widened by a 16-bit shift
# (a bfloat16 is the top half of the float32 with the same value, so this is exact).
BFLOAT16 = ElementType("bfloat16", "<u2", "<f4")

ELEMENT_TYPES = {
    "float64": ElementType("float64", "<f8", "<f8"),
    "float32": ElementType("float32", "<f4", "<f4"),
    "float16": ElementType("float16", "<f2", "<f4"),
    "bfloat16": BFLOAT16,
    "int64": ElementType("int64", "<i8", "<i8"),
    "int32": ElementType("int32", "<i4", "<i8"),
    "int16": ElementType("int16", "<i2", "<i8"),
    "int8": ElementType("int8", "<i1", "<i8"),
    "uint8": ElementType("uint8", "<u1", "<i8"),
    "uint16": ElementType("uint16", "<u2", "<i8"),
    "uint32": ElementType("uint32", "<u4", "<i8"),
    "bool": ElementType("bool", "<u1", "<i8"),
}


def widen(raw, etype):
    """``raw`` (an array of ``etype.raw``, native order) as a new array of ``etype.out``."""
    if etype is BFLOAT16:
        return (raw.astype(np.uint32) << 16).view(np.float32)
    if etype.name == "bool":
        return (raw != 0).astype(np.int64)
    return raw.astype(etype.out)


def native(raw, big_endian):
    """Swap ``raw`` in place to native (little-endian) order if it was stored big-endian."""
    if big_endian and raw.dtype.itemsize > 1:
        raw.byteswap(inplace=True)
    return raw


class StorageRef:
    """One storage a pickle refers to: its key, element type and declared element count."""

    __slots__ = ("key", "etype", "numel", "location")
    pickle_kind = "storage"

    def __init__(self, key, etype, numel, location):
        self.key = key
        self.etype = etype
        self.numel = numel
        self.location = location


class TensorRef:
    """A tensor as a pickle describes it: a strided view into a storage (no data yet)."""

    __slots__ = ("storage", "offset", "shape", "stride")
    pickle_kind = "tensor"

    def __init__(self, storage, offset, shape, stride):
        self.storage = storage
        self.offset = offset
        self.shape = shape
        self.stride = stride

    @property
    def numel(self):
        n = 1
        for s in self.shape:
            n *= s
        return n

    def extent(self):
        """Elements of the storage the view needs: one past its last element."""
        if self.numel == 0:
            return self.offset
        return self.offset + 1 + sum((s - 1) * st for s, st in zip(self.shape, self.stride))

    def is_whole_storage(self):
        """True when the view is the whole storage, C-contiguous from element 0."""
        if self.offset != 0 or self.numel != self.storage.numel:
            return False
        expected = 1
        for s, st in zip(reversed(self.shape), reversed(self.stride)):
            if s != 1 and st != expected:
                return False
            expected *= s
        return True


def check_view(where, name, ref, available):
    """Refuse a view reaching outside its storage or outside the bytes present.

    ``available`` is the number of elements the file really holds for the storage.
    """
    storage = ref.storage
    if storage.numel > available:
        raise WeightsError(
            f"{where}: storage '{storage.key}' of '{name}' declares {storage.numel} {storage.etype} elements "
            f"but the file holds only {available}")
    if ref.extent() > storage.numel:
        raise WeightsError(
            f"{where}: tensor '{name}' (shape {tuple(ref.shape)}, stride {tuple(ref.stride)}, offset {ref.offset}) "
            f"reaches element {ref.extent()} of storage '{storage.key}', which holds {storage.numel}")
    if ref.numel > max(storage.numel, 1):
        # A broadcast view (stride 0) can claim any size from one stored element;
        # refused so that a small file cannot demand unbounded memory.
        raise WeightsError(
            f"{where}: tensor '{name}' has {ref.numel} elements but its storage '{storage.key}' "
            f"only {storage.numel} (broadcast views are not accepted)")


def check_shape(fail, shape, stride, offset):
    """Validate the integers of a tensor's geometry; ``fail(message)`` raises."""
    if type(shape) is not tuple or type(stride) is not tuple:
        fail("tensor size and stride must be tuples")
    if len(shape) != len(stride):
        fail(f"tensor has {len(shape)} sizes but {len(stride)} strides")
    if len(shape) > limits.MAX_NDIM:
        fail(f"tensor has {len(shape)} dimensions (at most {limits.MAX_NDIM})")
    for value in (*shape, *stride, offset):
        if type(value) is not int or not 0 <= value < 2**62:
            fail("tensor size, stride and offset must be integers in [0, 2**62)")


def view_of(storage_array, ref):
    """The strided numpy view of ``ref`` into its (checked) storage array."""
    itemsize = storage_array.dtype.itemsize
    # A size-1 dimension's stride is never used; zero it so numpy sees no huge stride.
    strides = tuple(0 if s <= 1 else st * itemsize for s, st in zip(ref.shape, ref.stride))
    base = storage_array[ref.offset:] if ref.numel else storage_array[:0]
    return np.lib.stride_tricks.as_strided(base, shape=ref.shape, strides=strides, writeable=False)


def materialize(storage_array, ref):
    """The tensor ``ref`` as a new (or, for a whole storage already in ``out`` dtype, the same) array."""
    etype = ref.storage.etype
    if ref.is_whole_storage():
        flat = storage_array if storage_array.dtype == etype.out else widen(storage_array, etype)
        return flat.reshape(ref.shape)
    view = view_of(storage_array, ref)
    if view.dtype == etype.out:
        return np.array(view, order="C")  # a copy: the result never aliases a part of a storage
    return widen(view, etype)
