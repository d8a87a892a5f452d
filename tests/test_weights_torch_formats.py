"""PyTorch zip and legacy files, built opcode by opcode (no torch needed)."""
import numpy as np
import pytest

from rabbitkit.weights import read_weights
from weights_writers import (Checkpoint, Pickle, bf16_bits, write_checkpoint_legacy, write_checkpoint_zip,
                             write_legacy, write_zip)

WRITERS = {"torch-zip": write_checkpoint_zip, "torch-legacy": write_checkpoint_legacy}


@pytest.fixture(params=sorted(WRITERS))
def fmt(request):
    return request.param


def write(fmt, path, checkpoint, **options):
    return WRITERS[fmt](str(path), checkpoint, **options)


def test_float32_state_dict_keeps_bits_order_and_dtypes(fmt, tmp_path, rng):
    ckpt = Checkpoint()
    conv = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    bias = rng.standard_normal(8).astype(np.float32)
    ckpt.add("features.0.weight", conv)
    ckpt.add("features.0.bias", bias)
    ckpt.add("bn.num_batches_tracked", np.array(12345678901, np.int64))
    weights = read_weights(write(fmt, tmp_path / "model.pth", ckpt))
    assert weights.format == fmt
    assert list(weights.tensors) == ["features.0.weight", "features.0.bias", "bn.num_batches_tracked"]
    np.testing.assert_array_equal(weights.tensors["features.0.weight"].view(np.uint32), conv.view(np.uint32))
    np.testing.assert_array_equal(weights.tensors["features.0.bias"], bias)
    count = weights.tensors["bn.num_batches_tracked"]
    assert count.shape == () and count.dtype == np.int64 and int(count) == 12345678901
    for array in weights.tensors.values():
        assert array.flags.c_contiguous and array.flags.writeable


def test_half_bfloat16_double_and_small_ints_are_widened_exactly(fmt, tmp_path, rng):
    half = rng.standard_normal((4, 5)).astype(np.float16)
    exact_bf16 = np.array([1.0, -2.5, 3.140625, 2.0**-10, -65536.0, 0.0], np.float32)
    bits = bf16_bits(exact_bf16)
    double = rng.standard_normal(7)
    ckpt = Checkpoint()
    ckpt.add("half", half)
    key = ckpt.add_raw_storage("BFloat16Storage", bits)
    ckpt.view("bf16", key, 0, (2, 3), (3, 1))
    ckpt.add("double", double)
    ckpt.add("i32", np.array([-7, 2**31 - 1], np.int32))
    ckpt.add("u8", np.array([0, 255], np.uint8))
    ckpt.add("mask", np.array([True, False, True]))
    t = read_weights(write(fmt, tmp_path / "m.pt", ckpt)).tensors
    assert t["half"].dtype == np.float32
    np.testing.assert_array_equal(t["half"], half.astype(np.float32))
    assert t["bf16"].dtype == np.float32
    # bfloat16 -> float32 is the 16-bit shift: compare the bit patterns.
    np.testing.assert_array_equal(t["bf16"].view(np.uint32).reshape(-1), bits.astype(np.uint32) << 16)
    np.testing.assert_array_equal(t["bf16"].reshape(-1), exact_bf16)
    assert t["double"].dtype == np.float64 and np.array_equal(t["double"], double)
    assert t["i32"].dtype == np.int64 and t["i32"].tolist() == [-7, 2**31 - 1]
    assert t["u8"].tolist() == [0, 255] and t["mask"].tolist() == [1, 0, 1] and t["mask"].dtype == np.int64


def test_strided_views_offsets_and_shared_storages(fmt, tmp_path, rng):
    base = rng.standard_normal(24).astype(np.float32)
    ckpt = Checkpoint()
    key = ckpt.add_raw_storage("FloatStorage", base)
    ckpt.view("whole", key, 0, (4, 6), (6, 1))
    ckpt.view("transposed", key, 0, (6, 4), (1, 6))     # a .t() view
    ckpt.view("row_slice", key, 6, (2, 6), (6, 1))     # rows 1-2, offset 6
    ckpt.view("every_other", key, 1, (3, 2), (8, 2))   # stride 2 columns
    ckpt.view("scalar", key, 23, (), ())
    ckpt.view("empty", key, 0, (0, 5), (5, 1))
    half = ckpt.add_raw_storage("HalfStorage", base.astype(np.float16))
    ckpt.view("half_transposed", half, 0, (6, 4), (1, 6))  # widened from a strided view
    t = read_weights(write(fmt, tmp_path / "v.pt", ckpt)).tensors
    grid = base.reshape(4, 6)
    np.testing.assert_array_equal(t["whole"], grid)
    np.testing.assert_array_equal(t["transposed"], grid.T)
    np.testing.assert_array_equal(t["row_slice"], grid[1:3])
    np.testing.assert_array_equal(t["every_other"], np.lib.stride_tricks.as_strided(
        base[1:], (3, 2), (32, 8)))
    assert t["scalar"].shape == () and t["scalar"] == base[23]
    assert t["empty"].shape == (0, 5)
    # Views are copies: writing one leaves the others as they were.
    t["row_slice"][:] = 0
    np.testing.assert_array_equal(t["whole"], grid)
    np.testing.assert_array_equal(t["half_transposed"], grid.astype(np.float16).T.astype(np.float32))
    assert all(a.flags.c_contiguous for a in t.values())


def test_parameter_and_state_dict_metadata_and_wrapped_dataparallel_checkpoint(fmt, tmp_path, rng):
    weight = rng.standard_normal((3, 2)).astype(np.float32)
    ckpt = Checkpoint()
    ckpt.add("module.fc.weight", weight, parameter=True)
    ckpt.add("module.fc.bias", np.zeros(3, np.float32))
    weights = read_weights(write(fmt, tmp_path / "c.pth", ckpt, wrap="state_dict",
                                 metadata={"": 1, "module.fc": 1, "module.bn": 2}))
    assert list(weights.tensors) == ["fc.weight", "fc.bias"]
    np.testing.assert_array_equal(weights.tensors["fc.weight"], weight)
    assert weights.metadata["unwrapped"] == "state_dict"
    assert weights.metadata["stripped_prefix"] == "module."
    assert weights.metadata["checkpoint"] == {"epoch": 7}
    # _metadata is an attribute of the OrderedDict (set by BUILD), never a weight.
    assert weights.metadata["state_dict_metadata"]["module.bn"] == {"version": 2}


def test_model_key_is_unwrapped_and_mixed_prefixes_kept(fmt, tmp_path):
    ckpt = Checkpoint()
    ckpt.add("module.a", np.ones(2, np.float32))
    ckpt.add("b", np.ones(2, np.float32))
    weights = read_weights(write(fmt, tmp_path / "m.pt", ckpt, wrap="model"))
    assert list(weights.tensors) == ["module.a", "b"] and weights.metadata["unwrapped"] == "model"


def test_big_endian_files(tmp_path, rng):
    values = rng.standard_normal((3, 4))
    ints = np.array([1, -2, 3], np.int64)
    for fmt in WRITERS:
        ckpt = Checkpoint()
        ckpt.add("w", values.astype(np.float32))
        ckpt.add("d", values)
        ckpt.add("i", ints)
        options = {"byteorder": "big"} if fmt == "torch-zip" else {"little_endian": False}
        weights = read_weights(write(fmt, tmp_path / f"{fmt}.pt", ckpt, **options))
        assert weights.metadata["byteorder"] == "big"
        np.testing.assert_array_equal(weights.tensors["w"], values.astype(np.float32))
        np.testing.assert_array_equal(weights.tensors["d"], values)
        np.testing.assert_array_equal(weights.tensors["i"], ints)


def test_zip_without_byteorder_entry_is_little_endian(tmp_path):
    ckpt = Checkpoint()
    ckpt.add("w", np.arange(4, dtype=np.float32))
    path = write_zip(str(tmp_path / "old.pt"), ckpt.pickle(), ckpt.storages, byteorder=None)
    weights = read_weights(path)
    assert weights.tensors["w"].tolist() == [0, 1, 2, 3] and weights.metadata["byteorder"] == "little"


def test_protocol_4_opcodes(tmp_path):
    # FRAME, SHORT_BINUNICODE, MEMOIZE and STACK_GLOBAL, as pickle protocol 4 writes them.
    p = Pickle(proto=4)
    p.raw(b"\x95" + (0).to_bytes(8, "little"))
    p.stack_global("collections", "OrderedDict").op("MEMOIZE").op("EMPTY_TUPLE").op("REDUCE").op("MEMOIZE")
    p.short_str("w").op("MEMOIZE")
    p.stack_global("torch._utils", "_rebuild_tensor_v2").op("MARK").op("MARK").short_str("storage")
    p.stack_global("torch", "FloatStorage").short_str("0").short_str("cpu").int(3).op("TUPLE").op("BINPERSID")
    p.int(0).ints_tuple((3,)).ints_tuple((1,)).op("FALSE").get(0).op("EMPTY_TUPLE").op("REDUCE")
    p.op("TUPLE").op("REDUCE").op("SETITEM")
    storages = {"0": ("FloatStorage", np.array([1.5, 2.5, -3], np.float32))}
    weights = read_weights(write_zip(str(tmp_path / "p4.pt"), bytes(p), storages))
    assert weights.tensors["w"].tolist() == [1.5, 2.5, -3]


def test_legacy_keys_sorted_as_strings_and_counts_read_per_storage(tmp_path):
    # torch sorts the keys as strings ("10" before "9"); storages follow that order.
    ckpt = Checkpoint()
    arrays = [np.full(i + 1, i, np.float32) for i in range(11)]
    for i, array in enumerate(arrays):
        ckpt.add(f"t{i}", array)
    path = write_legacy(str(tmp_path / "many.pt"), ckpt.pickle(legacy=True), ckpt.storages)
    t = read_weights(path).tensors
    for i, array in enumerate(arrays):
        np.testing.assert_array_equal(t[f"t{i}"], array)


def test_a_bare_tensor_and_nested_lists(tmp_path):
    p = Pickle().op("EMPTY_DICT").str("blocks").op("EMPTY_LIST").op("MARK")
    p.tensor("FloatStorage", "0", 2, 0, (2,), (1,)).tensor("FloatStorage", "1", 1, 0, (1,), (1,))
    p.op("APPENDS").op("SETITEM")
    storages = {"0": ("FloatStorage", np.array([1, 2], np.float32)), "1": ("FloatStorage", np.array([3], np.float32))}
    t = read_weights(write_zip(str(tmp_path / "l.pt"), bytes(p), storages)).tensors
    assert list(t) == ["blocks.0", "blocks.1"] and t["blocks.1"].tolist() == [3]
    bare = Pickle().tensor("FloatStorage", "0", 2, 0, (2,), (1,))
    t = read_weights(write_zip(str(tmp_path / "b.pt"), bytes(bare), {"0": storages["0"]})).tensors
    assert list(t) == ["tensor"]


def test_old_rebuild_tensor_and_parameter_with_state(tmp_path):
    # PyTorch < 1.0 reduced tensors with _rebuild_tensor(storage, offset, size, stride);
    # Parameter subclasses with Python state use _rebuild_parameter_with_state.
    p = Pickle().op("EMPTY_DICT").str("old").global_("torch._utils", "_rebuild_tensor").op("MARK")
    p.op("MARK").str("storage").global_("torch", "DoubleStorage").str("0").str("cpu").int(4).op("TUPLE")
    p.op("BINPERSID").int(1).ints_tuple((3,)).ints_tuple((1,)).op("TUPLE").op("REDUCE").op("SETITEM")
    p.str("param").global_("torch._utils", "_rebuild_parameter_with_state").op("MARK")
    p.tensor("FloatStorage", "1", 2, 0, (2,), (1,)).op("TRUE").ordered_dict().op("EMPTY_DICT")
    p.str("note").str("ignored").op("SETITEM").op("TUPLE").op("REDUCE").op("SETITEM")
    storages = {"0": ("DoubleStorage", np.array([0.5, 1.5, 2.5, 3.5])), "1": ("FloatStorage", np.array([7, 8], np.float32))}
    t = read_weights(write_zip(str(tmp_path / "o.pt"), bytes(p), storages)).tensors
    assert t["old"].tolist() == [1.5, 2.5, 3.5] and t["old"].dtype == np.float64
    assert t["param"].tolist() == [7, 8]


def test_rebuild_tensor_v3_on_an_untyped_storage(tmp_path):
    # What torch >= 2 writes for dtypes without a storage class (uint16 here, transposed).
    values = np.array([[0, 65535, 7], [1, 2, 3]], np.uint16)
    p = Pickle().op("EMPTY_DICT").str("u16").global_("torch._utils", "_rebuild_tensor_v3").op("MARK")
    p.op("MARK").str("storage").global_("torch.storage", "UntypedStorage").str("0").str("cpu").int(12).op("TUPLE")
    p.op("BINPERSID").int(0).ints_tuple((3, 2)).ints_tuple((1, 3)).op("FALSE").ordered_dict()
    p.global_("torch", "uint16").op("TUPLE").op("REDUCE").op("SETITEM")
    storages = {"0": ("UntypedStorage", values.reshape(-1).view(np.uint8))}
    t = read_weights(write_zip(str(tmp_path / "u.pt"), bytes(p), storages)).tensors
    assert t["u16"].dtype == np.int64 and t["u16"].tolist() == values.T.tolist()
