"""Caffe ``.caffemodel``: a binary protobuf ``NetParameter``, parsed by hand.

Why by hand rather than with the ``protobuf`` package: reading weights needs
five message types and a dozen field numbers of caffe.proto (below), while the
package would need caffe.proto compiled into generated code (a build step and a
pinned generator/runtime pair that has broken across protobuf releases), and its
parser loads the whole message, every float as a Python-visible repeated field,
into memory at once: a 528 MB VGG-16 file would cost several times its size. The
wire format is small and stable (varints, fixed 32/64-bit values,
length-delimited bytes); here the file is memory-mapped, only tags and small
fields are touched, and each blob's packed floats are read from their byte range
straight into the array returned.

Fields read (caffe.proto):

- NetParameter: name = 1, layers = 2 (V1LayerParameter, before 2015), layer = 100 (LayerParameter)
- LayerParameter: name = 1, type = 2 (string), blobs = 7
- V1LayerParameter: name = 4, type = 5 (enum, mapped to the new type strings), blobs = 6
  (field 1 would be a V0 layer, from before 2014: refused)
- BlobProto: shape = 7 (BlobShape: dim = 1, int64, packed or not), data = 5 (float,
  packed or not), double_data = 8, and the legacy num = 1, channels = 2,
  height = 3, width = 4, which - as in Caffe's ``Blob::FromProto`` - give a 4-D
  shape (missing ones 0) whenever any of them is present.

Tensors are named ``<layer name>/<blob index>`` (``conv1/0`` the weights,
``conv1/1`` the bias) in Caffe's own shapes (old files keep InnerProduct weights
as (1, 1, out, in)); ``metadata["layers"]`` lists (name, type) for every layer.
"""
import mmap
import struct

import numpy as np

from ..errors import WeightsError
from .fileio import read_into

# V1LayerParameter.LayerType -> the type string Caffe's upgrade_proto gives it.
V1_TYPES = {
    0: "", 35: "AbsVal", 1: "Accuracy", 30: "ArgMax", 2: "BNLL", 3: "Concat", 37: "ContrastiveLoss",
    4: "Convolution", 39: "Deconvolution", 5: "Data", 6: "Dropout", 32: "DummyData", 7: "EuclideanLoss",
    25: "Eltwise", 38: "Exp", 8: "Flatten", 9: "HDF5Data", 10: "HDF5Output", 28: "HingeLoss", 11: "Im2col",
    12: "ImageData", 13: "InfogainLoss", 14: "InnerProduct", 15: "LRN", 29: "MemoryData",
    16: "MultinomialLogisticLoss", 34: "MVN", 17: "Pooling", 26: "Power", 18: "ReLU", 19: "Sigmoid",
    27: "SigmoidCrossEntropyLoss", 36: "Silence", 20: "Softmax", 21: "SoftmaxWithLoss", 22: "Split",
    33: "Slice", 23: "TanH", 24: "WindowData", 31: "Threshold",
}

VARINT, FIXED64, BYTES, FIXED32 = 0, 1, 2, 5


class Wire:
    """Protobuf wire-format reading over a buffer; every error names the file and offset."""

    def __init__(self, data, where):
        self.data = data
        self.where = where

    def fail(self, message, offset):
        raise WeightsError(f"{self.where}: {message} at byte {offset}")

    def varint(self, pos, end):
        data = self.data
        start = pos
        value = shift = 0
        while True:
            if pos >= end:
                self.fail("truncated varint", start)
            byte = data[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value, pos
            shift += 7
            if shift >= 70:
                self.fail("varint longer than 10 bytes", start)

    def fields(self, start, end):
        """Yield (field number, wire type, value, tag offset) for one message.

        ``value`` is the integer for a varint, and the byte offset of the payload
        for fixed32/fixed64; for length-delimited fields it is (begin, end).
        """
        pos = start
        while pos < end:
            at = pos
            tag, pos = self.varint(pos, end)
            field, wire = tag >> 3, tag & 7
            if field == 0:
                self.fail("protobuf field number 0", at)
            if wire == VARINT:
                value, pos = self.varint(pos, end)
            elif wire == FIXED64 or wire == FIXED32:
                size = 8 if wire == FIXED64 else 4
                if pos + size > end:
                    self.fail(f"fixed {size * 8}-bit value of field {field} runs past the end of its message", at)
                value, pos = pos, pos + size
            elif wire == BYTES:
                length, pos = self.varint(pos, end)
                if pos + length > end:
                    self.fail(f"field {field} of {length} bytes runs past the end of its message (at {end})", at)
                value, pos = (pos, pos + length), pos + length
            else:
                self.fail(f"protobuf wire type {wire} (groups or invalid) in field {field}", at)
            yield field, wire, value, at

    def string(self, span, at):
        try:
            return bytes(self.data[span[0]:span[1]]).decode("utf-8")
        except UnicodeDecodeError:
            self.fail("string is not valid UTF-8", at)

    def packed_varints(self, span):
        values = []
        pos, end = span
        while pos < end:
            value, pos = self.varint(pos, end)
            values.append(value)
        return values


def _signed(value):
    # int32/int64 fields carry negative numbers as 64-bit two's complement varints.
    return value - (1 << 64) if value >= 1 << 63 else value


def read_caffe(path, handle, file_size):
    where = str(path)
    if file_size == 0:
        raise WeightsError(f"{where}: empty file")
    with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        wire = Wire(data, where)
        net_name, layers = _net(wire, file_size)
        blob_plans = []
        for layer_name, layer_type, blobs in layers:
            for index, (span, at) in enumerate(blobs):
                blob_plans.append((f"{layer_name}/{index}", _blob(wire, span, at, f"{layer_name}/{index}")))
    tensors = {}
    for name, (shape, dtype, chunks, count) in blob_plans:
        if name in tensors:
            raise WeightsError(f"{where}: two layers produce a blob named '{name}'")
        out = np.empty(count, dtype)
        filled = 0
        for chunk in chunks:
            if isinstance(chunk, tuple):  # (byte offset, values): a packed run, read from the file
                offset, n = chunk
                read_into(handle, offset, out[filled:filled + n], where)
            else:  # values of unpacked fields, already decoded
                n = len(chunk)
                out[filled:filled + n] = chunk
            filled += n
        tensors[name] = out.astype(dtype.newbyteorder("="), copy=False).reshape(shape)
    metadata = {"layers": [(name, kind) for name, kind, _ in layers]}
    if net_name is not None:
        metadata["name"] = net_name
    return "caffe", tensors, metadata


def _net(wire, end):
    name = None
    layers = []
    for field, kind, value, at in wire.fields(0, end):
        if field == 1 and kind == BYTES:
            name = wire.string(value, at)
        elif field == 100 and kind == BYTES:
            layers.append(_layer(wire, value, names=(1, 2), blobs_field=7, v1=False))
        elif field == 2 and kind == BYTES:
            layers.append(_layer(wire, value, names=(4, 5), blobs_field=6, v1=True))
    if not layers:
        raise WeightsError(f"{wire.where}: a protobuf message without layers: not a Caffe model "
                           "(expected NetParameter field 100 'layer' or 2 'layers')")
    return name, layers


def _layer(wire, span, names, blobs_field, v1):
    name_field, type_field = names
    name, layer_type, blobs = "", "", []
    for field, kind, value, at in wire.fields(*span):
        if field == name_field and kind == BYTES:
            name = wire.string(value, at)
        elif field == type_field and v1 and kind == VARINT:
            layer_type = V1_TYPES.get(value, f"V1:{value}")
        elif field == type_field and not v1 and kind == BYTES:
            layer_type = wire.string(value, at)
        elif field == blobs_field and kind == BYTES:
            blobs.append((value, at))
        elif v1 and field == 1 and kind == BYTES:
            wire.fail("V0 layer definition (Caffe before 2014) is not supported; upgrade it with "
                      "Caffe's upgrade_net_proto_binary", at)
    return name, layer_type, blobs


def _blob(wire, span, blob_at, name):
    """(shape, dtype, chunks, count) for one BlobProto; the data is read later."""
    legacy = {}
    dims = []
    float_chunks, double_chunks = [], []
    float_count = double_count = 0
    for field, kind, value, at in wire.fields(*span):
        if field == 7 and kind == BYTES:
            for sub, subkind, subvalue, subat in wire.fields(*value):
                if sub == 1 and subkind == VARINT:
                    dims.append(_signed(subvalue))
                elif sub == 1 and subkind == BYTES:
                    dims.extend(_signed(v) for v in wire.packed_varints(subvalue))
        elif field in (1, 2, 3, 4) and kind == VARINT:
            legacy[field] = _signed(value)
        elif field == 5 and kind == BYTES:
            begin, stop = value
            if (stop - begin) % 4:
                wire.fail(f"packed float data of blob '{name}' is {stop - begin} bytes, not a multiple of 4", at)
            float_chunks.append((begin, (stop - begin) // 4))
            float_count += (stop - begin) // 4
        elif field == 5 and kind == FIXED32:
            _append_value(float_chunks, struct.unpack_from("<f", wire.data, value)[0])
            float_count += 1
        elif field == 8 and kind == BYTES:
            begin, stop = value
            if (stop - begin) % 8:
                wire.fail(f"packed double data of blob '{name}' is {stop - begin} bytes, not a multiple of 8", at)
            double_chunks.append((begin, (stop - begin) // 8))
            double_count += (stop - begin) // 8
        elif field == 8 and kind == FIXED64:
            _append_value(double_chunks, struct.unpack_from("<d", wire.data, value)[0])
            double_count += 1
    if legacy:
        shape = tuple(legacy.get(f, 0) for f in (1, 2, 3, 4))
    else:
        shape = tuple(dims)
    if any(d < 0 for d in shape):
        wire.fail(f"blob '{name}' has a negative dimension {shape}", blob_at)
    count = 1
    for d in shape:
        count *= d
    if float_count and double_count:
        wire.fail(f"blob '{name}' has both float and double data", blob_at)
    dtype, chunks, stored = ((np.dtype("<f8"), double_chunks, double_count) if double_count
                             else (np.dtype("<f4"), float_chunks, float_count))
    if stored != count:
        wire.fail(f"blob '{name}' holds {stored} values but its shape {shape} needs {count}", blob_at)
    return shape, dtype, chunks, count


def _append_value(chunks, value):
    # Unpacked repeated values arrive one field at a time; runs are gathered in lists.
    if chunks and isinstance(chunks[-1], list):
        chunks[-1].append(value)
    else:
        chunks.append([value])
