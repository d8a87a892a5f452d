"""The hostile corpus: each file is refused with one line naming it, and no payload runs."""
import pickle  # tests only: to prove the payloads are live under the standard unpickler
import struct
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest

from rabbitkit.errors import RabbitError, WeightsError
from rabbitkit.weights import limits, read_weights
from weights_writers import (Checkpoint, Pickle, legacy_header, net, layer, blob, varint, field_bytes,
                             write_checkpoint_zip, write_legacy, write_zip)


def assert_refused(path, *fragments):
    """read_weights(path) raises a one-line WeightsError naming the file and every fragment."""
    with pytest.raises(WeightsError) as info:
        read_weights(path)
    message = str(info.value)
    assert isinstance(info.value, RabbitError)
    assert "\n" not in message, message
    assert str(path) in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def payloads(sentinel):
    """(global, pickle) pairs that create ``sentinel`` when unpickled by the standard machinery."""
    touch = f"touch {sentinel}"
    code = f"open({str(sentinel)!r}, 'w').close()"
    return {
        "os.system": bytes(Pickle().global_("os", "system").str(touch).op("TUPLE1").op("REDUCE")),
        "posix.system": bytes(Pickle().global_("posix", "system").str(touch).op("TUPLE1").op("REDUCE")),
        "builtins.eval": bytes(Pickle().global_("builtins", "eval").str(code).op("TUPLE1").op("REDUCE")),
        "builtins.exec": bytes(Pickle(4).stack_global("builtins", "exec").str(code).op("TUPLE1").op("REDUCE")),
        "subprocess.Popen": bytes(Pickle().global_("subprocess", "Popen").op("EMPTY_LIST").op("MARK")
                                  .str("touch").str(str(sentinel)).op("APPENDS").op("TUPLE1").op("REDUCE")),
    }


@pytest.mark.parametrize("name", ["os.system", "posix.system", "builtins.eval", "builtins.exec", "subprocess.Popen"])
def test_code_execution_payloads_are_refused_and_never_run(name, tmp_path):
    sentinel = tmp_path / "sentinel"
    data = payloads(sentinel)[name]
    # The payload is real: the standard unpickler (in a child process) creates the sentinel.
    live = tmp_path / "live.pkl"
    live.write_bytes(data)
    subprocess.run([sys.executable, "-c", "import pickle, sys; pickle.loads(open(sys.argv[1], 'rb').read())",
                    str(live)], check=False, capture_output=True, timeout=60, cwd=tmp_path)
    for _ in range(100):  # Popen's child may finish after the parent
        if sentinel.exists():
            break
        time.sleep(0.05)
    assert sentinel.exists(), "test payload is not live"
    sentinel.unlink()
    # In a zip checkpoint's data.pkl, in a legacy stream's main pickle, and hidden inside a dict.
    zip_path = write_zip(str(tmp_path / "evil.pth"), data, {})
    legacy_path = write_legacy(str(tmp_path / "evil_legacy.pth"), data, {})
    nested = Pickle().op("EMPTY_DICT").str("state_dict").raw(data[2:]).op("SETITEM")
    nested_path = write_zip(str(tmp_path / "nested.pth"), bytes(nested), {})
    for path in (zip_path, legacy_path, nested_path):
        assert_refused(path, f"'{name}'", "allow-list")
    assert not sentinel.exists()


def test_reduce_of_something_not_an_allowed_callable(tmp_path):
    # A storage type is on the allow-list as data, not as a callable.
    p = Pickle().global_("torch", "FloatStorage").op("EMPTY_TUPLE").op("REDUCE")
    assert_refused(write_zip(str(tmp_path / "a.pt"), bytes(p), {}), "REDUCE", "torch.FloatStorage")
    # A value the file made (a string) is not callable either.
    p = Pickle().str("os.system").op("EMPTY_TUPLE").op("REDUCE")
    assert_refused(write_zip(str(tmp_path / "b.pt"), bytes(p), {}), "REDUCE", "not an allowed callable")
    # Globals people do save that have no meaning as weights are refused by name.
    for module, name in [("collections", "Counter"), ("argparse", "Namespace"),
                         ("numpy.core.multiarray", "scalar"), ("torch._tensor", "_rebuild_from_type_v2"),
                         ("torch.nn.modules.linear", "Linear")]:
        p = Pickle().global_(module, name).op("EMPTY_TUPLE").op("REDUCE")
        assert_refused(write_zip(str(tmp_path / f"{name}.pt"), bytes(p), {}), f"'{module}.{name}'")


def test_newobj_and_other_construction_opcodes_are_refused(tmp_path):
    p = Pickle().global_("collections", "OrderedDict").op("EMPTY_TUPLE").op("NEWOBJ")
    assert_refused(write_zip(str(tmp_path / "n.pt"), bytes(p), {}), "NEWOBJ")
    p = Pickle().raw(b"(ios\nsystem\n")  # INST: protocol 0's import-and-call
    assert_refused(write_zip(str(tmp_path / "i.pt"), bytes(p), {}), "INST")
    p = Pickle().raw(b"\xff")
    assert_refused(write_zip(str(tmp_path / "x.pt"), bytes(p), {}), "0xff")


def tensor_pickle(build_state=None, on="tensor"):
    p = Pickle().op("EMPTY_DICT").str("w")
    if on == "tensor":
        p.tensor("FloatStorage", "0", 2, 0, (2,), (1,))
    elif on == "list":
        p.op("EMPTY_LIST")
    elif on == "dict":
        p.op("EMPTY_DICT")
    p.op("EMPTY_DICT").str("data").str("x").op("SETITEM").op("BUILD")
    return bytes(p.op("SETITEM"))


@pytest.mark.parametrize("target", ["tensor", "list", "dict"])
def test_build_on_anything_but_an_ordered_dict(target, tmp_path):
    storages = {"0": ("FloatStorage", np.ones(2, np.float32))}
    assert_refused(write_zip(str(tmp_path / "b.pt"), tensor_pickle(on=target), storages), "BUILD on a")


def test_build_state_never_becomes_items(tmp_path):
    # BUILD on an OrderedDict sets attributes; a "weight" smuggled that way does not appear.
    p = Pickle().ordered_dict().str("w").tensor("FloatStorage", "0", 2, 0, (2,), (1,)).op("SETITEM")
    p.op("EMPTY_DICT").str("extra").tensor("FloatStorage", "0", 2, 0, (2,), (1,)).op("SETITEM").op("BUILD")
    weights = read_weights(write_zip(str(tmp_path / "s.pt"), bytes(p), {"0": ("FloatStorage", np.ones(2, np.float32))}))
    assert list(weights.tensors) == ["w"]


def test_setitem_and_append_only_on_their_containers(tmp_path):
    p = Pickle().op("EMPTY_LIST").str("k").str("v").op("SETITEM")
    assert_refused(write_zip(str(tmp_path / "s.pt"), bytes(p), {}), "SETITEM on a list")
    p = Pickle().op("EMPTY_DICT").str("v").op("APPEND")
    assert_refused(write_zip(str(tmp_path / "a.pt"), bytes(p), {}), "APPEND on a dict")
    p = Pickle().op("EMPTY_DICT").int(1).op("TUPLE1").str("v").op("SETITEM")
    assert_refused(write_zip(str(tmp_path / "k.pt"), bytes(p), {}), "dict key is a tuple")


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_storage_shorter_than_its_tensor(fmt, tmp_path):
    ckpt = Checkpoint()
    key = ckpt.add_raw_storage("FloatStorage", np.ones(6, np.float32))
    ckpt.view("w", key, 0, (2, 3), (3, 1))
    if fmt == "zip":
        # The pickle declares 6 elements, the entry holds 4 (16 bytes).
        path = write_zip(str(tmp_path / "short.pt"), ckpt.pickle(), ckpt.storages,
                         storage_bytes={key: np.ones(4, np.float32).tobytes()})
        assert_refused(path, "storage '0'", "declares 6", "only 4")
    else:
        # The legacy count says 4 where the pickle declares 6.
        path = write_legacy(str(tmp_path / "short.pt"), ckpt.pickle(legacy=True), ckpt.storages, counts={key: 4})
        assert_refused(path, "storage '0'", "4 elements", "declares 6")
    # A pickle declaring fewer elements than its tensor needs.
    path = write_zip(str(tmp_path / "decl.pt"), ckpt.pickle(numel_of={key: 5}), ckpt.storages)
    assert_refused(path, "tensor 'w'", "reaches element 6", "holds 5")


def test_legacy_storage_past_end_of_file(tmp_path):
    ckpt = Checkpoint()
    ckpt.add("w", np.ones(1000, np.float32))
    path = write_legacy(str(tmp_path / "t.pt"), ckpt.pickle(legacy=True), ckpt.storages)
    data = open(path, "rb").read()
    open(path, "wb").write(data[:-100])
    assert_refused(path, "storage '0'", "past the end")


@pytest.mark.parametrize("geometry", [
    ((2, 3), (3, 2), 0),      # a stride reaching past the 6 elements
    ((2, 3), (3, 1), 1),      # an offset pushing the end out
    ((3,), (1,), 6),          # starting past the end
    ((7,), (0,), 0),          # a broadcast view asking for more elements than stored
])
def test_strides_and_offsets_outside_the_storage(geometry, tmp_path):
    shape, stride, offset = geometry
    ckpt = Checkpoint()
    key = ckpt.add_raw_storage("FloatStorage", np.arange(6, dtype=np.float32))
    ckpt.view("w", key, offset, shape, stride)
    assert_refused(write_checkpoint_zip(str(tmp_path / "s.pt"), ckpt), "tensor 'w'")


def test_negative_and_huge_geometry_integers(tmp_path):
    for n, (shape, stride) in enumerate([((2,), (-1,)), ((2**63,), (1,)), ((2,) * 40, (1,) * 40)]):
        p = Pickle().op("EMPTY_DICT").str("w")
        p.tensor("FloatStorage", "0", 2, 0, shape, stride).op("SETITEM")
        storages = {"0": ("FloatStorage", np.ones(2, np.float32))}
        assert_refused(write_zip(str(tmp_path / f"g{n}.pt"), bytes(p), storages), "tensor")


def test_compressed_zip_entry(tmp_path):
    ckpt = Checkpoint()
    ckpt.add("w", np.zeros(1000, np.float32))
    path = write_zip(str(tmp_path / "deflated.pt"), ckpt.pickle(), ckpt.storages, compression=zipfile.ZIP_DEFLATED)
    assert_refused(path, "compressed")


def test_zip_entry_over_the_cap(tmp_path, monkeypatch):
    ckpt = Checkpoint()
    ckpt.add("w", np.zeros(10, np.float32))
    path = write_checkpoint_zip(str(tmp_path / "big.pt"), ckpt)
    assert read_weights(path).tensors["w"].shape == (10,)
    monkeypatch.setattr(limits, "MAX_PICKLE_BYTES", 64)
    assert_refused(path, "data.pkl", "over the 64-byte cap")
    monkeypatch.setattr(limits, "MAX_PICKLE_BYTES", 2**20)
    monkeypatch.setattr(limits, "MAX_STORAGE_BYTES", 16)
    assert_refused(path, "data/0", "over the 16-byte cap")


def test_overlapping_storage_entries_cannot_multiply_memory(tmp_path):
    # Ten storage keys whose central-directory records all point at one entry's bytes:
    # a zip bomb by reuse, claiming ten times the file's size.
    ckpt = Checkpoint()
    for i in range(10):
        ckpt.add(f"t{i}", np.ones(4096 if i == 0 else 1, np.float32))
    pickle_bytes = ckpt.pickle(numel_of={str(i): 4096 for i in range(10)})
    path = write_zip(str(tmp_path / "o.pt"), pickle_bytes, ckpt.storages)
    first = zipfile.ZipFile(path).getinfo("archive/data/0")
    data = bytearray(open(path, "rb").read())
    pos = data.find(b"PK\x01\x02")
    while pos >= 0:
        name_length, extra_length, comment_length = struct.unpack_from("<HHH", data, pos + 28)
        name = bytes(data[pos + 46:pos + 46 + name_length]).decode()
        if name.startswith("archive/data/") and name != "archive/data/0":
            struct.pack_into("<II", data, pos + 20, first.file_size, first.file_size)
            struct.pack_into("<I", data, pos + 42, first.header_offset)
        pos = data.find(b"PK\x01\x02", pos + 46 + name_length + extra_length + comment_length)
    open(path, "wb").write(bytes(data))
    assert_refused(path, "storages add up to")


def test_deep_nesting(tmp_path):
    deep_tuple = Pickle().op("EMPTY_DICT").str("x").op("NONE")
    for _ in range(10000):
        deep_tuple.op("TUPLE1")
    deep_tuple.op("SETITEM")
    assert_refused(write_zip(str(tmp_path / "t.pt"), bytes(deep_tuple), {}), "nested deeper")
    marks = Pickle()
    for _ in range(1000):
        marks.op("MARK")
    assert_refused(write_zip(str(tmp_path / "m.pt"), bytes(marks), {}), "MARKs nested deeper")
    lists = Pickle()
    for _ in range(1000):
        lists.op("EMPTY_LIST")
    for _ in range(999):
        lists.op("APPEND")
    assert_refused(write_zip(str(tmp_path / "l.pt"), bytes(lists), {}), "nested deeper")
    # A list that contains itself (through the memo): the walk stops at the cap.
    cycle = Pickle().op("EMPTY_LIST").put().get(0).op("APPEND")
    assert_refused(write_zip(str(tmp_path / "c.pt"), bytes(cycle), {}), "nested deeper")


def test_memo_cap(tmp_path, monkeypatch):
    p = Pickle().op("EMPTY_LIST")
    for i in range(50):
        p.put()
    monkeypatch.setattr(limits, "MAX_MEMO", 20)
    assert_refused(write_zip(str(tmp_path / "memo.pt"), bytes(p), {}), "memo holds more than 20")
    p = Pickle().get(7)
    assert_refused(write_zip(str(tmp_path / "get.pt"), bytes(p), {}), "memo entry 7")


def test_truncated_and_unterminated_pickles(tmp_path):
    good = bytes(Pickle().op("EMPTY_DICT").str("a" * 40).int(1).op("SETITEM"))
    assert_refused(write_zip(str(tmp_path / "t.pt"), good[:20], {}), "truncated pickle")
    assert_refused(write_zip(str(tmp_path / "s.pt"), good[:-1], {}), "without STOP")
    huge = Pickle().raw(b"\x8d" + (2**62).to_bytes(8, "little"))  # BINUNICODE8 claiming exabytes
    assert_refused(write_zip(str(tmp_path / "h.pt"), bytes(huge), {}), "truncated pickle")
    assert_refused(write_zip(str(tmp_path / "u.pt"), bytes(Pickle().op("MARK").op("STOP")), {}), "pickle")


def test_persistent_ids_are_checked(tmp_path):
    cases = {
        "notuple": (Pickle().str("storage").op("BINPERSID"), "persistent id is not"),
        "badtype": (Pickle().op("MARK").str("storage").str("FloatStorage").str("0").str("cpu").int(1)
                    .op("TUPLE").op("BINPERSID"), "where a storage type belongs"),
        "complex": (Pickle().op("MARK").str("storage").global_("torch", "ComplexFloatStorage").str("0")
                    .str("cpu").int(1).op("TUPLE").op("BINPERSID"), "'torch.ComplexFloatStorage'"),
        "negative": (Pickle().op("MARK").str("storage").global_("torch", "FloatStorage").str("0")
                     .str("cpu").int(-1).op("TUPLE").op("BINPERSID"), "element count"),
    }
    for name, (p, fragment) in cases.items():
        assert_refused(write_zip(str(tmp_path / f"{name}.pt"), bytes(p), {}), fragment)


def test_a_plain_pickle_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "data.pth"
    path.write_bytes(pickle.dumps({"a": [1, 2, 3]}, protocol=2))
    assert_refused(path, "not a PyTorch checkpoint")
    path.write_bytes(legacy_header() + bytes(Pickle().op("EMPTY_DICT")) + bytes(Pickle().op("EMPTY_LIST")))
    assert_refused(path, "no tensors")


def test_safetensors_header_claiming_gigabytes(tmp_path):
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", 5 * 2**30) + b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}')
    assert_refused(path, "header claims 5368709120 bytes")


def test_truncated_caffemodel_varint(tmp_path):
    data = net("n", [layer("conv1", "Convolution", [blob(np.ones(4), shape=(4,))])])
    path = tmp_path / "t.caffemodel"
    # The file ends inside the varint of a layer's length.
    path.write_bytes(data + varint(100 << 3 | 2) + b"\xff")
    assert_refused(path, "truncated varint at byte")
    path.write_bytes(data + field_bytes(100, b"x" * 50)[:-20])
    assert_refused(path, "runs past the end")


def test_files_of_another_format_renamed(tmp_path):
    cases = {
        "image.pth": (b"\x89PNG\r\n\x1a\n" + b"\x00" * 100, "PNG image"),
        "photo.caffemodel": (b"\xff\xd8\xff\xe0" + b"\x00" * 100, "JPEG image"),
        "weights.safetensors": (b"\x1f\x8b\x08\x00" + b"\x00" * 100, "gzip"),
        "keras.pt": (b"\x89HDF\r\n\x1a\n" + b"\x00" * 100, "HDF5"),
        "array.pth": (b"\x93NUMPY\x01\x00" + b"\x00" * 100, "numpy"),
        "page.pth": (b"<!DOCTYPE html><html>Not found</html>", "HTML"),
        "deploy.caffemodel": (b'name: "VGG_ILSVRC_16_layers"\nlayer {\n}\n', "text file"),
        "empty.pt": (b"", "empty file"),
        "random.pt": (bytes(range(7, 200)), "unrecognized"),
    }
    for name, (content, what) in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        assert_refused(path, what)


def test_zip_that_is_not_a_torch_file(tmp_path):
    npz = tmp_path / "arrays.pth"
    np.savez(npz.with_suffix(".npz"), a=np.ones(3))
    npz.with_suffix(".npz").rename(npz)
    assert_refused(npz, "not a PyTorch file")
    script = tmp_path / "script.pt"
    with zipfile.ZipFile(script, "w") as archive:
        archive.writestr("m/data.pkl", b"")
        archive.writestr("m/constants.pkl", b"")
        archive.writestr("m/code/__torch__.py", b"")
    assert_refused(script, "TorchScript")


def test_missing_file_and_folder(tmp_path):
    assert_refused(tmp_path / "nope.pt", "not found")
    assert_refused(tmp_path, "folder")


def test_truncated_and_mutated_files_only_ever_raise_weights_errors(tmp_path, rng):
    """Truncations (up to 400 points) and 200 random byte changes of small valid files of
    each format: each either reads or is refused with a one-line WeightsError."""
    import random

    from safetensors.numpy import save_file
    from weights_writers import v1_layer, write_checkpoint_legacy

    ckpt = Checkpoint()
    ckpt.add("a.w", rng.standard_normal((3, 4)).astype(np.float32))
    half = ckpt.add_raw_storage("HalfStorage", np.ones(6, np.float16))
    ckpt.view("h", half, 1, (2, 2), (1, 2))
    ckpt.add("n", np.array(3))
    save_file({"x": np.ones((2, 3), np.float32), "y": np.arange(3)}, str(tmp_path / "s.st"))
    seeds = {
        "zip": open(write_checkpoint_zip(str(tmp_path / "s.zip"), ckpt, metadata={"": 1}, wrap="state_dict"), "rb").read(),
        "legacy": open(write_checkpoint_legacy(str(tmp_path / "s.leg"), ckpt), "rb").read(),
        "safetensors": (tmp_path / "s.st").read_bytes(),
        "caffe": net("n", [layer("c", "Convolution", [blob(np.ones(6), shape=(2, 3)),
                                                      blob(np.ones(2), legacy_dims=(1, 1, 1, 2), packed=False)]),
                           v1_layer("f", 14, [blob(np.ones(2), shape=(2,), double=True)])]),
    }
    mutate = random.Random(1)
    path = tmp_path / "case"
    for name, data in seeds.items():
        path.write_bytes(data)
        assert read_weights(path).tensors, name
        cases = [data[:i] for i in range(0, len(data), max(1, len(data) // 400))]
        for _ in range(200):
            case = bytearray(data)
            for _ in range(mutate.choice([1, 2, 4])):
                case[mutate.randrange(len(case))] = mutate.randrange(256)
            cases.append(bytes(case))
        for case in cases:
            path.write_bytes(case)
            try:
                read_weights(path)
            except WeightsError as err:
                assert "\n" not in str(err) and str(path) in str(err)


def test_a_module_the_file_names_is_never_imported(tmp_path, monkeypatch):
    # A module that would leave a sentinel just by being imported, importable from sys.path.
    sentinel = tmp_path / "imported"
    (tmp_path / "rabbit_evil_module.py").write_text(f"open({str(sentinel)!r}, 'w').close()\ndef run(): pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    p = Pickle().global_("rabbit_evil_module", "run").op("EMPTY_TUPLE").op("REDUCE")
    assert_refused(write_zip(str(tmp_path / "i.pt"), bytes(p), {}), "'rabbit_evil_module.run'")
    assert "rabbit_evil_module" not in sys.modules and not sentinel.exists()


def test_the_package_never_uses_the_standard_unpickler():
    # The same patterns a repository checker greps for.
    import pathlib
    import re

    import rabbitkit

    pattern = re.compile(r"pickle\.load|pickle\.Unpickler|torch\.load|allow_pickle\s*=\s*True|^\s*import pickle|"
                         r"from pickle import|import torch|__import__|importlib", re.M)
    root = pathlib.Path(rabbitkit.__file__).parent / "weights"
    hits = [f"{path.name}: {m.group(0)}" for path in sorted(root.glob("*.py")) for m in pattern.finditer(path.read_text())]
    assert not hits, hits


def test_legacy_storage_list_must_match_the_pickle(tmp_path):
    ckpt = Checkpoint()
    ckpt.add("w", np.ones(3, np.float32))
    extra = dict(ckpt.storages, unused=("FloatStorage", np.ones(2, np.float32)))
    assert_refused(write_legacy(str(tmp_path / "x.pt"), ckpt.pickle(legacy=True), extra), "'unused' is listed but no tensor")
    assert_refused(write_legacy(str(tmp_path / "m.pt"), ckpt.pickle(legacy=True), {}), "missing from the storage list")
    # A zip-style 5-field persistent id in a legacy file (and the reverse) is refused.
    assert_refused(write_legacy(str(tmp_path / "z.pt"), ckpt.pickle(legacy=False), ckpt.storages), "persistent id")
    assert_refused(write_zip(str(tmp_path / "l.pt"), ckpt.pickle(legacy=True), ckpt.storages), "persistent id")
