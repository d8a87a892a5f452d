"""Caffe .caffemodel files encoded by hand (protobuf wire format)."""
import numpy as np
import pytest

from rabbitkit.errors import WeightsError
from rabbitkit.weights import read_weights
from weights_writers import blob, field_bytes, field_varint, layer, net, v1_layer


def test_new_style_layers_with_shapes_packed_and_unpacked(tmp_path, rng):
    weight = rng.standard_normal((4, 3, 7, 7)).astype(np.float32)
    bias = rng.standard_normal(4).astype(np.float32)
    fc = rng.standard_normal((5, 6)).astype(np.float32)
    data = net("GoogLeNet", [
        layer("data", "Input", []),
        layer("conv1/7x7_s2", "Convolution", [blob(weight, shape=weight.shape), blob(bias, shape=(4,), packed=False)]),
        layer("relu1", "ReLU", []),
        layer("fc", "InnerProduct", [blob(fc, shape=fc.shape, packed_shape=False)]),
    ])
    path = tmp_path / "g.caffemodel"
    path.write_bytes(data)
    weights = read_weights(path)
    assert weights.format == "caffe"
    assert list(weights.tensors) == ["conv1/7x7_s2/0", "conv1/7x7_s2/1", "fc/0"]
    assert weights.tensors["conv1/7x7_s2/0"].tobytes() == weight.tobytes()
    assert weights.tensors["conv1/7x7_s2/1"].tobytes() == bias.tobytes()
    np.testing.assert_array_equal(weights.tensors["fc/0"], fc)
    assert weights.metadata["layers"] == [("data", "Input"), ("conv1/7x7_s2", "Convolution"),
                                          ("relu1", "ReLU"), ("fc", "InnerProduct")]
    assert weights.metadata["name"] == "GoogLeNet"
    assert all(a.dtype == np.float32 and a.flags.writeable for a in weights.tensors.values())


def test_v1_layers_with_legacy_dims_and_double_data(tmp_path, rng):
    weight = rng.standard_normal((1, 1, 3, 8)).astype(np.float32)
    bias = rng.standard_normal(3)
    data = net("VGG_ILSVRC_16_layers", [
        v1_layer("fc8", 14, [blob(weight, legacy_dims=(1, 1, 3, 8)),
                             blob(bias, legacy_dims=(1, 1, 1, 3), double=True, packed=False)]),
        v1_layer("prob", 20, []),
        v1_layer("odd", 999, []),
    ])
    path = tmp_path / "v.caffemodel"
    path.write_bytes(data)
    weights = read_weights(path)
    # Caffe's own 4-D legacy shapes are kept (InnerProduct weights as (1, 1, out, in)).
    assert weights.tensors["fc8/0"].shape == (1, 1, 3, 8)
    np.testing.assert_array_equal(weights.tensors["fc8/0"], weight)
    assert weights.tensors["fc8/1"].dtype == np.float64 and weights.tensors["fc8/1"].shape == (1, 1, 1, 3)
    np.testing.assert_array_equal(weights.tensors["fc8/1"].reshape(-1), bias)
    assert weights.metadata["layers"] == [("fc8", "InnerProduct"), ("prob", "Softmax"), ("odd", "V1:999")]


def test_unknown_fields_are_skipped_and_split_packed_runs_joined(tmp_path):
    values = np.arange(10, dtype=np.float32)
    # A blob whose data comes in two packed runs, with unknown fields of every wire type around.
    body = (field_bytes(7, field_bytes(1, b"\x0a")) + field_bytes(5, values[:4].tobytes())
            + field_varint(20, 5) + b"\x95\x01" + b"\x00" * 4   # field 18, fixed32
            + field_bytes(5, values[4:].tobytes()))
    data = field_varint(5, 1) + layer("x", "Scale", [body]) + field_bytes(6, b"\x08\x01")
    path = tmp_path / "u.caffemodel"
    path.write_bytes(field_bytes(1, b"n") + data)
    np.testing.assert_array_equal(read_weights(path).tensors["x/0"], values)


@pytest.mark.parametrize("content, fragment", [
    (net("n", [layer("a", "Convolution", [blob(np.ones(5), shape=(2, 3))])]), "holds 5 values but its shape (2, 3)"),
    (net("n", [layer("a", "C", []), layer("a", "C", [blob(np.ones(1), shape=(1,))]),
               layer("a", "C", [blob(np.ones(1), shape=(1,))])]), "two layers produce a blob named 'a/0'"),
    (field_bytes(1, b"only a name"), "without layers"),
    (net("n", [layer("a", "C", [field_bytes(5, b"\x00" * 6)])]), "not a multiple of 4"),
    (net("n", [layer("a", "C", [blob(np.ones(1), shape=(1,)) + blob(np.ones(1), shape=(), double=True)])]),
     "both float and double"),
    (net("n", [field_bytes(2, field_bytes(1, b"old"))]), "V0 layer"),
    (net("n", [layer("a", "C", [])]) + b"\x0b", "wire type 3"),
])
def test_malformed_models(content, fragment, tmp_path):
    path = tmp_path / "bad.caffemodel"
    path.write_bytes(content)
    with pytest.raises(WeightsError) as info:
        read_weights(path)
    message = str(info.value)
    assert fragment in message and str(path) in message and "\n" not in message, message
