"""safetensors through read_weights: round trips, widening, header checks."""
import json
import struct

import numpy as np
import pytest
from safetensors.numpy import save_file

from rabbitkit.errors import WeightsError
from rabbitkit.weights import read_weights
from weights_writers import bf16_bits


def test_round_trip_keeps_bits_and_file_order(tmp_path, rng):
    arrays = {
        "conv.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
        "fc.double": rng.standard_normal((2, 5)),
        "steps": np.array([3, -2**40], np.int64),
        "scalar": np.array(2.5, np.float32),
    }
    path = tmp_path / "m.bin"  # the extension says nothing; the content does
    save_file(arrays, str(path), metadata={"source": "test"})
    weights = read_weights(path)
    assert weights.format == "safetensors"
    assert sorted(weights.tensors) == sorted(arrays)
    for name, array in arrays.items():
        got = weights.tensors[name]
        assert got.dtype == array.dtype and got.shape == array.shape
        assert got.tobytes() == array.tobytes()
        assert got.flags.writeable and got.flags.c_contiguous
    assert weights.metadata["safetensors_metadata"] == {"source": "test"}
    # Order is the file's data order (the header's offsets).
    header = json.loads(path.read_bytes()[8:8 + struct.unpack("<Q", path.read_bytes()[:8])[0]])
    header.pop("__metadata__")
    assert list(weights.tensors) == sorted(header, key=lambda n: header[n]["data_offsets"][0])


def test_half_and_small_ints_are_widened(tmp_path, rng):
    half = rng.standard_normal((3, 4)).astype(np.float16)
    save_file({"h": half, "i32": np.array([-5, 7], np.int32), "u8": np.array([200], np.uint8),
               "b": np.array([True, False])}, str(tmp_path / "w.safetensors"))
    t = read_weights(tmp_path / "w.safetensors").tensors
    assert t["h"].dtype == np.float32 and np.array_equal(t["h"], half.astype(np.float32))
    assert t["i32"].dtype == np.int64 and t["i32"].tolist() == [-5, 7]
    assert t["u8"].tolist() == [200] and t["b"].tolist() == [1, 0]


def write_bf16(path, bits, shape):
    # The numpy writer has no bfloat16: write the header by hand, as torch's writer does.
    header = json.dumps({"w": {"dtype": "BF16", "shape": list(shape), "data_offsets": [0, bits.nbytes]},
                         "x": {"dtype": "F32", "shape": [1], "data_offsets": [bits.nbytes, bits.nbytes + 4]}})
    header = header.encode() + b" " * (-len(header) % 8)
    path.write_bytes(struct.pack("<Q", len(header)) + header + bits.tobytes() + np.float32(9).tobytes())


def test_bfloat16_widened_by_shift(tmp_path):
    values = np.array([[1.0, -0.5, 3.0], [2.0**-20, -1024.0, 0.0]], np.float32)
    bits = bf16_bits(values)
    write_bf16(tmp_path / "b.safetensors", bits, values.shape)
    t = read_weights(tmp_path / "b.safetensors").tensors
    assert t["w"].dtype == np.float32 and t["w"].shape == (2, 3)
    np.testing.assert_array_equal(t["w"].view(np.uint32), bits.astype(np.uint32) << 16)
    np.testing.assert_array_equal(t["w"], values)
    assert t["x"].tolist() == [9.0]


def test_header_checks(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"a": np.ones(4, np.float32)}, str(path))
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    cases = {
        "past the end": (struct.pack("<Q", length + 1000) + data[8:], "header claims"),
        "gigabytes": (struct.pack("<Q", 3 * 2**30) + data[8:], "header claims 3221225472 bytes"),
        "bad json": (data[:8] + b"{" + b"x" * (length - 1) + data[8 + length:], "not valid JSON"),
        "truncated data": (data[:-4], "invalid safetensors"),
        "bad dtype": (data.replace(b'"F32"', b'"F8X"'), "dtype 'F8X'"),
    }
    for name, (content, fragment) in cases.items():
        path.write_bytes(content)
        with pytest.raises(WeightsError) as info:
            read_weights(path)
        message = str(info.value)
        assert fragment in message and str(path) in message and "\n" not in message, (name, message)
