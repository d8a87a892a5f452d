"""Writers of real-format weight files for the tests, without torch or protobuf.

The pickles are emitted opcode by opcode, in the sequences ``torch.save`` writes
(checked against torch 2.13's output with ``pickletools.dis``), so the tests can
also build files torch never would: the hostile corpus.
"""
import io
import struct
import zipfile

import numpy as np

STORAGE_OF = {
    np.dtype("float32"): "FloatStorage", np.dtype("float64"): "DoubleStorage",
    np.dtype("float16"): "HalfStorage", np.dtype("int64"): "LongStorage", np.dtype("int32"): "IntStorage",
    np.dtype("int16"): "ShortStorage", np.dtype("int8"): "CharStorage", np.dtype("uint8"): "ByteStorage",
    np.dtype("bool"): "BoolStorage",
}


class Pickle:
    """Emit pickle opcodes one by one; ``bytes()`` ends the stream with STOP."""

    def __init__(self, proto=2):
        self.out = bytearray(b"\x80" + bytes([proto]))
        self.memo = 0

    def raw(self, data):
        self.out += data
        return self

    def put(self):  # BINPUT / LONG_BINPUT, as the standard pickler numbers them
        self.out += b"q" + bytes([self.memo]) if self.memo < 256 else b"r" + struct.pack("<I", self.memo)
        self.memo += 1
        return self

    def get(self, index):
        self.out += b"h" + bytes([index]) if index < 256 else b"j" + struct.pack("<I", index)
        return self

    def global_(self, module, name):
        self.out += b"c" + module.encode() + b"\n" + name.encode() + b"\n"
        return self

    def stack_global(self, module, name):
        self.str(module).str(name)
        self.out += b"\x93"
        return self

    def str(self, text):
        data = text.encode()
        self.out += b"X" + struct.pack("<I", len(data)) + data
        return self

    def short_str(self, text):
        data = text.encode()
        self.out += b"\x8c" + bytes([len(data)]) + data
        return self

    def int(self, value):
        if 0 <= value < 256:
            self.out += b"K" + bytes([value])
        elif 0 <= value < 65536:
            self.out += b"M" + struct.pack("<H", value)
        elif -2**31 <= value < 2**31:
            self.out += b"J" + struct.pack("<i", value)
        else:
            data = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
            self.out += b"\x8a" + bytes([len(data)]) + data
        return self

    def float(self, value):
        self.out += b"G" + struct.pack(">d", value)
        return self

    def op(self, name):
        self.out += {
            "MARK": b"(", "TUPLE": b"t", "TUPLE1": b"\x85", "TUPLE2": b"\x86", "TUPLE3": b"\x87",
            "EMPTY_TUPLE": b")", "EMPTY_DICT": b"}", "EMPTY_LIST": b"]", "REDUCE": b"R", "BUILD": b"b",
            "SETITEM": b"s", "SETITEMS": b"u", "APPEND": b"a", "APPENDS": b"e", "BINPERSID": b"Q",
            "NONE": b"N", "TRUE": b"\x88", "FALSE": b"\x89", "MEMOIZE": b"\x94", "STOP": b".",
            "NEWOBJ": b"\x81", "POP": b"0", "DUP": b"2",
        }[name]
        return self

    def ints_tuple(self, values):
        if len(values) == 0:
            return self.op("EMPTY_TUPLE")
        if len(values) <= 3:
            for v in values:
                self.int(v)
            return self.op(("TUPLE1", "TUPLE2", "TUPLE3")[len(values) - 1])
        self.op("MARK")
        for v in values:
            self.int(v)
        return self.op("TUPLE")

    def ordered_dict(self):
        return self.global_("collections", "OrderedDict").op("EMPTY_TUPLE").op("REDUCE")

    def tensor(self, storage_type, key, numel, offset, shape, stride, legacy=False, parameter=False):
        """``torch._utils._rebuild_tensor_v2(storage, offset, shape, stride, False, OrderedDict())``."""
        if parameter:
            self.global_("torch._utils", "_rebuild_parameter")
        self.global_("torch._utils", "_rebuild_tensor_v2").op("MARK")
        self.op("MARK").str("storage").global_("torch", storage_type).str(key).str("cpu").int(numel)
        if legacy:
            self.op("NONE")
        self.op("TUPLE").op("BINPERSID")
        self.int(offset).ints_tuple(shape).ints_tuple(stride).op("FALSE").ordered_dict().op("TUPLE").op("REDUCE")
        if parameter:
            self.op("TRUE").ordered_dict().op("TUPLE3").op("REDUCE")
        return self

    def __bytes__(self):
        return bytes(self.out + b".")


def c_strides(shape):
    strides, step = [], 1
    for s in reversed(shape):
        strides.append(step)
        step *= s
    return tuple(reversed(strides))


class Checkpoint:
    """A state_dict to write: storages (key -> raw array) and tensors viewing them."""

    def __init__(self):
        self.storages = {}
        self.entries = []  # (name, storage key, offset, shape, stride, parameter)

    def add(self, name, array, parameter=False):
        """A tensor that is a whole storage (what torch writes for an ordinary tensor)."""
        array = np.array(array, order="C")  # (ascontiguousarray would make a 0-d array 1-d)
        key = str(len(self.storages))
        self.storages[key] = (STORAGE_OF[array.dtype], array.reshape(-1))
        self.entries.append((name, key, 0, array.shape, c_strides(array.shape), parameter))
        return key

    def add_raw_storage(self, storage_type, flat):
        key = str(len(self.storages))
        self.storages[key] = (storage_type, np.ascontiguousarray(flat).reshape(-1))
        return key

    def view(self, name, key, offset, shape, stride):
        self.entries.append((name, key, offset, tuple(shape), tuple(stride), False))

    def pickle(self, legacy=False, proto=2, metadata=None, wrap=None, numel_of=None):
        p = Pickle(proto)
        if wrap is not None:  # {"epoch": 7, wrap: state_dict}
            p.op("EMPTY_DICT").put().op("MARK").str("epoch").int(7).str(wrap)
        p.ordered_dict().put().op("MARK")
        for name, key, offset, shape, stride, parameter in self.entries:
            storage_type, flat = self.storages[key]
            numel = (numel_of or {}).get(key, flat.size)
            p.str(name).tensor(storage_type, key, numel, offset, shape, stride, legacy=legacy, parameter=parameter)
        p.op("SETITEMS")
        if metadata is not None:  # state_dict._metadata, set by BUILD as torch does
            p.op("EMPTY_DICT").str("_metadata").ordered_dict().op("MARK")
            for prefix, version in metadata.items():
                p.str(prefix).op("EMPTY_DICT").str("version").int(version).op("SETITEM")
            p.op("SETITEMS").op("SETITEM").op("BUILD")
        if wrap is not None:
            p.op("SETITEMS")
        return bytes(p)


def write_zip(path, pickle_bytes, storages, byteorder="little", folder="archive",
              compression=zipfile.ZIP_STORED, storage_bytes=None):
    """The torch zip layout; ``storages``: key -> (storage type, flat array)."""
    with zipfile.ZipFile(path, "w", compression=compression) as archive:
        archive.writestr(f"{folder}/data.pkl", pickle_bytes)
        if byteorder is not None:
            archive.writestr(f"{folder}/byteorder", byteorder)
        for key, (_, flat) in storages.items():
            data = (storage_bytes or {}).get(key)
            if data is None:
                data = flat.astype(flat.dtype.newbyteorder(">" if byteorder == "big" else "<")).tobytes()
            archive.writestr(f"{folder}/data/{key}", data)
        archive.writestr(f"{folder}/version", "3\n")
    return path


def write_checkpoint_zip(path, checkpoint, **options):
    byteorder = options.pop("byteorder", "little")
    return write_zip(path, checkpoint.pickle(**options), checkpoint.storages, byteorder=byteorder)


MAGIC = 0x1950A86A20F9469CFC6C


def legacy_header(little_endian=True):
    sys_info = (Pickle().op("EMPTY_DICT").op("MARK").str("protocol_version").int(1001)
                .str("little_endian").op("TRUE" if little_endian else "FALSE")
                .str("type_sizes").op("EMPTY_DICT").op("MARK").str("short").int(2).str("int").int(4)
                .str("long").int(4).op("SETITEMS").op("SETITEMS"))
    return bytes(Pickle().int(MAGIC)) + bytes(Pickle().int(1001)) + bytes(sys_info)


def write_legacy(path, main_pickle, storages, little_endian=True, counts=None):
    """The legacy stream: header pickles, the object, the key list, then the storages."""
    keys = sorted(storages)
    key_list = Pickle().op("EMPTY_LIST").op("MARK")
    for key in keys:
        key_list.str(key)
    out = io.BytesIO()
    out.write(legacy_header(little_endian) + main_pickle + bytes(key_list.op("APPENDS")))
    order = "<" if little_endian else ">"
    for key in keys:
        flat = storages[key][1]
        count = (counts or {}).get(key, flat.size)
        out.write(struct.pack(order + "q", count))
        out.write(flat.astype(flat.dtype.newbyteorder(order)).tobytes())
    with open(path, "wb") as handle:
        handle.write(out.getvalue())
    return path


def write_checkpoint_legacy(path, checkpoint, little_endian=True, **options):
    return write_legacy(path, checkpoint.pickle(legacy=True, **options), checkpoint.storages, little_endian)


def bf16_bits(array):
    """bfloat16 bit patterns (uint16) of float32 values, truncating (values chosen exactly representable)."""
    return (np.ascontiguousarray(array, np.float32).view(np.uint32) >> 16).astype(np.uint16)


# -- protobuf ------------------------------------------------------------------------------

def varint(value):
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def field_varint(number, value):
    return varint(number << 3) + varint(value)


def field_bytes(number, payload):
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def field_fixed32_float(number, value):
    return varint(number << 3 | 5) + struct.pack("<f", value)


def field_fixed64_double(number, value):
    return varint(number << 3 | 1) + struct.pack("<d", value)


def blob(values, shape=None, legacy_dims=None, packed=True, packed_shape=True, double=False):
    out = b""
    if legacy_dims is not None:
        for number, dim in zip((1, 2, 3, 4), legacy_dims):
            out += field_varint(number, dim)
    if shape is not None:
        if packed_shape:
            dims = field_bytes(1, b"".join(varint(d) for d in shape))
        else:
            dims = b"".join(field_varint(1, d) for d in shape)
        out += field_bytes(7, dims)
    values = np.asarray(values).reshape(-1)
    if double:
        if packed:
            out += field_bytes(8, values.astype("<f8").tobytes())
        else:
            out += b"".join(field_fixed64_double(8, float(v)) for v in values)
    elif packed:
        out += field_bytes(5, values.astype("<f4").tobytes())
    else:
        out += b"".join(field_fixed32_float(5, float(v)) for v in values)
    return out


def layer(name, kind, blobs):
    """A LayerParameter (NetParameter field 100)."""
    body = field_bytes(1, name.encode()) + field_bytes(2, kind.encode()) + b"".join(field_bytes(7, b) for b in blobs)
    return field_bytes(100, body)


def v1_layer(name, kind_enum, blobs):
    """A V1LayerParameter (NetParameter field 2)."""
    body = field_bytes(4, name.encode()) + field_varint(5, kind_enum) + b"".join(field_bytes(6, b) for b in blobs)
    return field_bytes(2, body)


def net(name, layers):
    return field_bytes(1, name.encode()) + b"".join(layers)
