"""The model-zoo nets against the published layouts, and weights through import, convert, export.

Expected names and shapes are generated here from torchvision's module
definitions and BVLC GoogLeNet's deploy.prototxt (written out independently of
rabbitkit's builders), in the order ``torch.nn.Module.state_dict`` lists them.
"""
import re

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import rabbitkit
from rabbitkit import pretrained
from rabbitkit.cli import main
from rabbitkit.errors import CheckpointError
from rabbitkit.export import torch_state_dict
from rabbitkit.models._zoo import class_names
from rabbitkit.plugins import registry
from rabbitkit.probe import FeatureProbe
from rabbitkit.weights import read_weights


# -- the published layouts ---------------------------------------------------------------
def conv(name, cout, cin, k, bias=True):
    return [(f"{name}.weight", (cout, cin, k, k))] + ([(f"{name}.bias", (cout,))] if bias else [])


def linear(name, cout, cin):
    return [(f"{name}.weight", (cout, cin)), (f"{name}.bias", (cout,))]


def vgg_layout(cfg):
    """torchvision ``make_layers(cfg)`` + ``classifier``: conv at index i, ReLU at i+1, "M" one index."""
    names, index, cin = [], 0, 3
    for v in cfg:
        if v == "M":
            index += 1
        else:
            names += conv(f"features.{index}", v, cin, 3)
            index, cin = index + 2, v
    return names + linear("classifier.0", 4096, 25088) + linear("classifier.3", 4096, 4096) + linear("classifier.6", 1000, 4096)


VGG_D = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]
VGG_E = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"]
ALEXNET = (conv("features.0", 64, 3, 11) + conv("features.3", 192, 64, 5) + conv("features.6", 384, 192, 3)
           + conv("features.8", 256, 384, 3) + conv("features.10", 256, 256, 3)
           + linear("classifier.1", 4096, 9216) + linear("classifier.4", 4096, 4096) + linear("classifier.6", 1000, 4096))


def squeezenet1_1_layout():
    names = conv("features.0", 64, 3, 3)
    fires = {3: (64, 16, 64), 4: (128, 16, 64), 6: (128, 32, 128), 7: (256, 32, 128),
             9: (256, 48, 192), 10: (384, 48, 192), 11: (384, 64, 256), 12: (512, 64, 256)}
    for index, (cin, squeeze, expand) in fires.items():
        names += (conv(f"features.{index}.squeeze", squeeze, cin, 1) + conv(f"features.{index}.expand1x1", expand, squeeze, 1)
                  + conv(f"features.{index}.expand3x3", expand, squeeze, 3))
    return names + conv("classifier.1", 1000, 512, 1)


def basic_conv(name, cout, cin, k):
    bn = f"{name}.bn"
    return conv(f"{name}.conv", cout, cin, k, bias=False) + [
        (f"{bn}.weight", (cout,)), (f"{bn}.bias", (cout,)), (f"{bn}.running_mean", (cout,)),
        (f"{bn}.running_var", (cout,)), (f"{bn}.num_batches_tracked", ())]


# GoogLeNet table 1: (in, 1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool proj)
INCEPTIONS = {"3a": (192, 64, 96, 128, 16, 32, 32), "3b": (256, 128, 128, 192, 32, 96, 64),
              "4a": (480, 192, 96, 208, 16, 48, 64), "4b": (512, 160, 112, 224, 24, 64, 64),
              "4c": (512, 128, 128, 256, 24, 64, 64), "4d": (512, 112, 144, 288, 32, 64, 64),
              "4e": (528, 256, 160, 320, 32, 128, 128), "5a": (832, 256, 160, 320, 32, 128, 128),
              "5b": (832, 384, 192, 384, 48, 128, 128)}


def googlenet_layout(aux):
    names = basic_conv("conv1", 64, 3, 7) + basic_conv("conv2", 64, 64, 1) + basic_conv("conv3", 192, 64, 3)
    for key, (cin, c1, c3r, c3, c5r, c5, pp) in INCEPTIONS.items():
        m = f"inception{key}"
        names += (basic_conv(f"{m}.branch1", c1, cin, 1) + basic_conv(f"{m}.branch2.0", c3r, cin, 1)
                  + basic_conv(f"{m}.branch2.1", c3, c3r, 3) + basic_conv(f"{m}.branch3.0", c5r, cin, 1)
                  + basic_conv(f"{m}.branch3.1", c5, c5r, 3) + basic_conv(f"{m}.branch4.1", pp, cin, 1))
    if aux:
        for name, cin in (("aux1", 512), ("aux2", 528)):
            names += basic_conv(f"{name}.conv", 128, cin, 1) + linear(f"{name}.fc1", 1024, 2048) + linear(f"{name}.fc2", 1000, 1024)
    return names + linear("fc", 1000, 1024)


def caffe_googlenet_blobs(aux=False):
    """(blob name, shape) of bvlc_googlenet.caffemodel's deploy layers (+ the training-only loss1/loss2 heads)."""
    def cv(layer, cout, cin, k):
        return [(f"{layer}/0", (cout, cin, k, k)), (f"{layer}/1", (cout,))]

    blobs = cv("conv1/7x7_s2", 64, 3, 7) + cv("conv2/3x3_reduce", 64, 64, 1) + cv("conv2/3x3", 192, 64, 3)
    for key, (cin, c1, c3r, c3, c5r, c5, pp) in INCEPTIONS.items():
        m = f"inception_{key}"
        blobs += (cv(f"{m}/1x1", c1, cin, 1) + cv(f"{m}/3x3_reduce", c3r, cin, 1) + cv(f"{m}/3x3", c3, c3r, 3)
                  + cv(f"{m}/5x5_reduce", c5r, cin, 1) + cv(f"{m}/5x5", c5, c5r, 5) + cv(f"{m}/pool_proj", pp, cin, 1))
        if aux and key in ("4a", "4d"):
            head = "loss1" if key == "4a" else "loss2"
            blobs += cv(f"{head}/conv", 128, cin, 1) + [(f"{head}/fc/0", (1024, 2048)), (f"{head}/fc/1", (1024,))]
    return blobs + [("loss3/classifier/0", (1000, 1024)), ("loss3/classifier/1", (1000,))]


LAYOUTS = {"vgg16": lambda: vgg_layout(VGG_D), "vgg19": lambda: vgg_layout(VGG_E), "alexnet": lambda: ALEXNET,
           "squeezenet1_1": squeezenet1_1_layout, "googlenet": lambda: googlenet_layout(False)}
COUNTS = {"vgg16": 138_357_544, "vgg19": 143_667_240, "alexnet": 61_100_840, "squeezenet1_1": 1_235_496,
          "googlenet": 6_624_904, "bvlc_googlenet": 6_998_552}


def build(name, shape=(3, 224, 224), outputs=1000, **options):
    rabbitkit.manual_seed(0)
    return registry("architectures").get(name)(shape, outputs, **options)


def shapes_of(state):
    return [(name, tuple(np.shape(value))) for name, value in state.items()]


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_torchvision_names_shapes_and_order(name):
    model = build(name)
    expected = LAYOUTS[name]()
    assert shapes_of(torch_state_dict(model)) == expected
    assert model.num_parameters() == COUNTS[name] == sum(int(np.prod(s)) for n, s in expected
                                                          if not n.endswith(("running_mean", "running_var", "num_batches_tracked")))
    layout = registry("architectures").get(name).pretrained
    assert layout.input_shape == (3, 224, 224) and layout.preprocessing["order"] == "RGB"


def test_googlenet_aux_heads_loaded_or_skipped():
    with_aux = build("googlenet", aux_logits=True)
    assert with_aux.num_parameters() == 13_004_888
    assert dict(shapes_of(torch_state_dict(with_aux))) == dict(googlenet_layout(True))
    # The heads are held, not run: the logits are the trunk's.
    x = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)
    plain = build("googlenet")
    plain.load_state_dict({k: v for k, v in with_aux.state_dict().items() if not k.startswith("aux")})
    np.testing.assert_array_equal(with_aux.forward(x, training=False), plain.forward(x, training=False))
    assert plain.ignored_weights == ("aux1.*", "aux2.*")


def test_bvlc_googlenet_caffe_blobs_and_layer_names():
    model = build("bvlc_googlenet")
    assert model.num_parameters() == COUNTS["bvlc_googlenet"]
    shapes = pretrained.expected_shapes(model)
    blobs = model.external_names["caffe"]
    expected = caffe_googlenet_blobs()
    assert sorted(blobs) == sorted(name for name, _ in expected)
    assert all(shapes[blobs[name]] == shape for name, shape in expected)
    assert model.get_layer("inception_4c/output") is model.get_layer("inception_4c")
    assert type(model.get_layer("pool1/norm1")).__name__ == "LocalResponseNorm"
    assert model.get_layer("inception_3a/5x5").kernel_size == (5, 5)
    layout = registry("architectures").get("bvlc_googlenet").pretrained
    assert layout.preprocessing["order"] == "BGR" and layout.preprocessing["mean"] == [104.0, 117.0, 123.0]
    # Deep Dream's use: any image size, up to an inception layer.
    x = np.random.default_rng(0).standard_normal((1, 3, 80, 96)).astype(np.float32)
    with FeatureProbe(model, ["inception_4c/output"]) as probe:
        out = probe.forward(x)["inception_4c/output"]
        assert out.shape == (1, 512, 5, 6)
        assert probe.backward({"inception_4c/output": np.ones_like(out)}).shape == x.shape


def test_small_inputs_and_one_line_errors():
    from rabbitkit.errors import ConfigError

    assert build("squeezenet1_1", (3, 64, 64), 7).forward(np.zeros((2, 3, 64, 64), np.float32)).shape == (2, 7)
    assert build("alexnet", (3, 63, 63), 5)["classifier"][1].in_features == 9216
    with pytest.raises(ConfigError, match="bvlc_googlenet classifies 224x224 input"):
        build("bvlc_googlenet", (3, 112, 112))
    with pytest.raises(ConfigError, match="squeezenet1_1 does not fit a 3x8x8 input"):
        build("squeezenet1_1", (3, 8, 8))


def test_imagenet_class_names():
    names = class_names()
    assert len(names) == 1000 and names[0] == "tench" and names[207] == "golden_retriever"
    assert names[999] == "toilet_tissue"


# -- files ------------------------------------------------------------------------------
def random_state(layout, seed=0):
    rng = np.random.default_rng(seed)
    state = {}
    for name, shape in layout:
        if name.endswith("num_batches_tracked"):
            state[name] = np.zeros(shape, np.int64)
        elif name.endswith("running_var"):
            state[name] = rng.uniform(0.5, 2.0, shape).astype(np.float32)
        else:
            state[name] = (rng.standard_normal(shape) * 0.05).astype(np.float32)
    return state


def write_safetensors(path, state):
    from safetensors.numpy import save_file

    save_file(state, str(path))
    return path


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_round_trip_import_convert_export_import(tmp_path):
    original = random_state(googlenet_layout(True))
    source = write_safetensors(tmp_path / "googlenet.safetensors", original)
    result = invoke("weights", "inspect", source)
    assert result.exit_code == 0, result.output
    assert "architecture: googlenet (1000 outputs) --option aux_logits=true" in result.output
    assert re.search(r"\n  conv1\.bn\.num_batches_tracked +int64 +scalar\n", result.output)
    converted = tmp_path / "g.safetensors"
    result = invoke("weights", "convert", source, "--arch", "googlenet", "--option", "aux_logits=true", "-o", converted)
    assert result.exit_code == 0, result.output
    exported = tmp_path / "exported.safetensors"
    result = invoke("weights", "export", converted, "-o", exported, "--names", "torch")
    assert result.exit_code == 0, result.output
    again = read_weights(exported).tensors
    assert list(again) != [] and set(again) == set(original)
    for name, value in original.items():
        assert again[name].dtype == value.dtype and again[name].tobytes() == value.tobytes(), name
    # Without the aux heads, the file's aux tensors are skipped.
    loaded = pretrained.open_model(source, arch="googlenet")
    assert "aux1.fc1.weight" not in pretrained.expected_shapes(loaded.model)
    np.testing.assert_array_equal(loaded.model.get_layer("fc").params["weight"], original["fc.weight"])


def test_predict_on_a_converted_model(tmp_path):
    source = write_safetensors(tmp_path / "sq.pth.safetensors", random_state(squeezenet1_1_layout(), seed=3))
    converted = tmp_path / "sq.safetensors"
    assert invoke("weights", "convert", source, "--arch", "squeezenet1_1", "-o", converted).exit_code == 0
    image = tmp_path / "cat.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (150, 200, 3)).astype(np.uint8)).save(image)
    result = invoke("predict", converted, image, "--top", "3")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == f"{image}:" and len(lines) == 4
    # The same answer as the Python API: logits of the preprocessed image.
    model = pretrained.load(source, arch="squeezenet1_1")
    logits = model.forward(pretrained.preprocess("squeezenet1_1", image), training=False)[0]
    assert lines[1].split()[1] == class_names()[int(np.argmax(logits))]
    loaded = pretrained.open_model(converted)
    assert loaded.class_names == class_names() and loaded.preprocessing.to_dict()["resize"] == 256


def test_mismatched_weights_are_one_line(tmp_path):
    state = random_state(squeezenet1_1_layout())
    state["features.3.squeeze.weight"] = np.zeros((16, 64, 3, 3), np.float32)
    bad = write_safetensors(tmp_path / "bad.safetensors", state)
    result = invoke("weights", "convert", bad, "--arch", "squeezenet1_1", "-o", tmp_path / "x.safetensors")
    assert result.exit_code == 2
    assert result.output.strip() == (f"error: {bad}: 'features.3.squeeze.weight' has shape (16, 64, 3, 3), "
                                     "squeezenet1_1 expects (16, 64, 1, 1)")
    partial = write_safetensors(tmp_path / "partial.safetensors", random_state(ALEXNET[:2]))
    with pytest.raises(CheckpointError, match=r"no tensor 'features.3.weight' in the file \(alexnet expects shape \(192, 64, 5, 5\)\)"):
        pretrained.load(partial, arch="alexnet")
    result = invoke("predict", bad, tmp_path / "cat.png")
    assert result.exit_code == 2 and "is a safetensors weights file: pass --arch NAME" in result.output


# -- a caffemodel written field by field ------------------------------------------------------
def varint(value):
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def field(number, payload):
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def blob_proto(array, legacy=False):
    if legacy:  # num/channels/height/width, as files written before BlobShape
        dims = (1,) * (4 - array.ndim) + array.shape
        head = b"".join(varint(number << 3) + varint(d) for number, d in zip((1, 2, 3, 4), dims))
    else:
        head = field(7, field(1, b"".join(varint(d) for d in array.shape)))
    return head + field(5, array.astype("<f4").tobytes())


def caffemodel(blobs):
    layers = {}
    for name, array in blobs.items():
        layer, _ = name.rsplit("/", 1)
        layers.setdefault(layer, []).append(array)
    body = b""
    for layer, arrays in layers.items():
        kind = b"InnerProduct" if "fc" in layer or "classifier" in layer else b"Convolution"
        legacy = layer == "loss3/classifier"
        body += field(100, field(1, layer.encode()) + field(2, kind) + b"".join(field(7, blob_proto(a, legacy)) for a in arrays))
    return field(1, b"GoogleNet") + body


def test_bvlc_googlenet_from_a_caffemodel(tmp_path):
    rng = np.random.default_rng(5)
    blobs = {name: (rng.standard_normal(shape) * 0.05).astype(np.float32) for name, shape in caffe_googlenet_blobs(aux=True)}
    path = tmp_path / "bvlc_googlenet.caffemodel"
    path.write_bytes(caffemodel(blobs))
    result = invoke("weights", "inspect", path)
    assert result.exit_code == 0 and "caffe" in result.output.splitlines()[0]
    assert "architecture: bvlc_googlenet (1000 outputs)" in result.output
    loaded = pretrained.open_model(path, arch="bvlc_googlenet")
    model = loaded.model
    np.testing.assert_array_equal(model.get_layer("conv2/3x3").params["weight"], blobs["conv2/3x3/0"])
    np.testing.assert_array_equal(model.get_layer("inception_5b/pool_proj").params["bias"], blobs["inception_5b/pool_proj/1"])
    np.testing.assert_array_equal(model.get_layer("loss3/classifier").params["weight"], blobs["loss3/classifier/0"])
    assert loaded.input_range[0] == (-104.0, 151.0) and loaded.mean_pixel == [123.0, 117.0, 104.0]
