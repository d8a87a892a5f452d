"""Built-in ConvNet architectures: shapes, parameter counts, options, gradients, training."""
import inspect

import numpy as np
import pytest

import rabbitkit
from rabbitkit.errors import ConfigError, PluginError
from rabbitkit.initializers import initialize
from rabbitkit.layers.branches import Concat
from rabbitkit.layers.spatial_transformer import SpatialTransformer
from rabbitkit.losses import SoftmaxCrossEntropy
from rabbitkit.models.inception import inception_module
from rabbitkit.optim import Adam
from rabbitkit.plugins import registry
from rabbitkit.testing import check_gradients

ARCHITECTURES = ("lenet5", "gtsrb_cnn", "vgg16", "vgg19", "alexnet", "squeezenet1_1", "googlenet", "bvlc_googlenet",
                 "googlenet_small", "nin")

# (architecture, options, two input shapes of different sizes and channels)
BUILDS = [
    ("lenet5", {}, [(1, 32, 32), (3, 28, 20)]),
    ("lenet5", {"activation": "ReLU", "pooling": "max", "padding": 2}, [(1, 28, 28), (2, 16, 17)]),
    ("gtsrb_cnn", {"variant": "ciresan"}, [(3, 48, 48), (1, 32, 36)]),
    ("gtsrb_cnn", {}, [(3, 48, 48), (1, 32, 32)]),
    ("gtsrb_cnn", {"spatial_transformer": True, "channels": [[8], [16]]}, [(3, 32, 32), (1, 20, 24)]),
    ("gtsrb_cnn", {"multiscale": True}, [(3, 48, 48), (1, 36, 28)]),
    ("vgg16", {"pool_size": 0}, [(3, 32, 32), (1, 40, 48)]),
    ("vgg16", {"pool_size": 2, "fc_width": 32}, [(3, 64, 64), (1, 40, 48)]),  # adaptive pool: identity, then spread
    ("googlenet_small", {}, [(3, 32, 32), (1, 48, 48)]),
    ("nin", {}, [(3, 32, 32), (1, 24, 40)]),
]


@pytest.fixture(autouse=True)
def seeded():
    """Same initial weights in every run (layers draw from the manual_seed stream)."""
    rabbitkit.manual_seed(0)


def build(name, input_shape, num_outputs, **options):
    return registry("architectures").get(name)(input_shape, num_outputs, **options)


def test_registered_with_explicit_annotated_options():
    architectures = registry("architectures")
    for name in ARCHITECTURES:
        signature = inspect.signature(architectures.get(name))
        params = list(signature.parameters.values())
        assert [p.name for p in params[:3]] == ["input_shape", "num_outputs", "dtype"]
        for param in params[3:]:
            assert param.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD, (name, param.name)
            assert param.default is not inspect.Parameter.empty, (name, param.name)
            assert param.annotation is not inspect.Parameter.empty, (name, param.name)


@pytest.mark.parametrize("name,options,shapes", BUILDS, ids=[f"{b[0]}-{i}" for i, b in enumerate(BUILDS)])
def test_builds_runs_forward_and_backward(name, options, shapes, rng):
    for shape in shapes:
        model = build(name, shape, 7, **options)
        assert isinstance(model, rabbitkit.Sequential)
        assert model.output_shape(shape) == (7,)
        x = rng.standard_normal((2, *shape)).astype(np.float32)
        y = model.forward(x, training=True)
        assert y.shape == (2, 7) and y.dtype == np.float32 and np.isfinite(y).all()
        dx = model.backward(rng.standard_normal(y.shape).astype(np.float32))
        assert dx.shape == x.shape and np.isfinite(dx).all() and np.abs(dx).sum() > 0
        params = model.parameters()
        assert all(np.isfinite(p.grad).all() for p in params)
        if isinstance(model[0], SpatialTransformer):
            # The localization starts at the identity with a zero last weight, so only
            # that last layer gets a gradient at first (by design).
            last = len(model[0].localization) - 1
            params = [p for p in params if not p.name.startswith("0.") or p.name.startswith(f"0.{last}.")]
        assert all(np.any(p.grad) for p in params), [p.name for p in params if not np.any(p.grad)]


def test_lenet5_parameter_count():
    # conv 1->6 5x5, conv 6->16 5x5, fc 400->120, 120->84, 84->10 (LeCun et al. 1998: 61,706 with full C3)
    assert build("lenet5", (1, 32, 32), 10).num_parameters() == 61_706


def test_ciresan_parameter_count_and_layers():
    model = build("gtsrb_cnn", (3, 48, 48), 43, variant="ciresan")
    conv = (3 * 49 * 100 + 100) + (100 * 16 * 150 + 150) + (150 * 16 * 250 + 250)
    fc = (250 * 3 * 3 * 300 + 300) + (300 * 43 + 43)  # 48 -> 42 -> 21 -> 18 -> 9 -> 6 -> 3
    assert model.num_parameters() == conv + fc == 1_543_443
    assert [type(layer).__name__ for layer in model][:3] == ["Conv2D", "Tanh", "MaxPool2D"]


def test_gtsrb_modern_defaults_and_spatial_transformer():
    model = build("gtsrb_cnn", (3, 32, 32), 43)
    names = [type(layer).__name__ for layer in model]
    assert names.count("Conv2D") == 5 and names.count("MaxPool2D") == 3 and "Dropout" in names
    assert names[:3] == ["Conv2D", "BatchNorm", "ReLU"]
    assert model[-1].in_features == 256 and model[-1].out_features == 43
    with_st = build("gtsrb_cnn", (3, 32, 32), 43, spatial_transformer=True)
    assert isinstance(with_st[0], SpatialTransformer)
    # A run re-initialises all weights; the transformer must still start at the identity.
    initialize(with_st, "msr", rng=0)
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    np.testing.assert_allclose(with_st[0].forward(x, training=False), x, atol=1e-5)


def test_gtsrb_multiscale_classifier_sees_every_blocks_output(rng):
    """The classifier's input is (block 1 pooled to the last block's size, block 2
    pooled likewise, block 3) flattened side by side, Sermanet & LeCun's layout."""
    from rabbitkit.layers.adaptive_pool import AdaptiveAvgPool2D

    plain = build("gtsrb_cnn", (1, 32, 32), 43, channels=[[4], [6], [8]], fc_width=16)
    rabbitkit.manual_seed(0)
    multi = build("gtsrb_cnn", (1, 32, 32), 43, channels=[[4], [6], [8]], fc_width=16, multiscale=True)
    dense = next(layer for layer in multi if type(layer).__name__ == "Dense")
    assert dense.in_features == (4 + 6 + 8) * 4 * 4
    # the same convolutions: copy the plain net's weights into the multi-scale one
    plain_kernels = [p for p in plain.parameters() if p.value.ndim == 4]
    multi_kernels = [p for p in multi.parameters() if p.value.ndim == 4]
    assert len(plain_kernels) == len(multi_kernels) == 3
    for source, target in zip(plain_kernels, multi_kernels):
        target.value[...] = source.value
    x = rng.standard_normal((2, 1, 32, 32)).astype(np.float32)
    outputs, h = [], x
    for layer in plain:
        if type(layer).__name__ == "Flatten":
            break
        h = layer.forward(h, training=False)
        if type(layer).__name__ == "MaxPool2D":
            outputs.append(h)
    expected = np.concatenate([AdaptiveAvgPool2D((4, 4)).forward(out, training=False).reshape(2, -1)
                               for out in outputs[:-1]] + [outputs[-1].reshape(2, -1)], axis=1)
    h = x
    for layer in multi:
        if layer is dense:
            break
        h = layer.forward(h, training=False)
    np.testing.assert_allclose(h, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="'multiscale' applies to variant 'modern' only"):
        build("gtsrb_cnn", (3, 48, 48), 43, variant="ciresan", multiscale=True)


def test_gtsrb_multiscale_gradients():
    from rabbitkit.testing import check_gradients

    model = build("gtsrb_cnn", (2, 13, 11), 5, channels=[[3], [2, 3], [4]], fc_width=6, multiscale=True,
                  dtype=np.float64)
    # Fresh batch norms shift by exactly 0, so a position whose inputs a ReLU zeroed
    # sits exactly on the next ReLU's kink; random shifts move every one off it.
    rng = np.random.default_rng(3)
    for param in model.parameters():
        if param.name.endswith("bias"):
            param.value[...] = rng.uniform(-0.5, 0.5, param.value.shape)
    check_gradients(model, (3, 2, 13, 11), training=False, max_checks=80)
    check_gradients(model, (3, 2, 13, 11), training=True, max_checks=80)


def test_gtsrb_block_dropout_follows_each_blocks_pooling():
    model = build("gtsrb_cnn", (1, 32, 32), 43, block_dropout=[0.1, 0.2])
    names = [type(layer).__name__ for layer in model]
    pools = [i for i, name in enumerate(names) if name == "MaxPool2D"]
    assert [model[i + 1].p for i in pools[:2]] == [0.1, 0.2]
    assert names[pools[2] + 1] == "Flatten"  # the list ended: no dropout after block 3
    every_block = build("gtsrb_cnn", (1, 32, 32), 43, block_dropout=0.25)
    assert [every_block[i + 1].p for i, layer in enumerate(every_block) if type(layer).__name__ == "MaxPool2D"] \
        == [0.25] * 3
    assert build("gtsrb_cnn", (1, 32, 32), 43, block_dropout=[0.1, 0.2]).num_parameters() \
        == build("gtsrb_cnn", (1, 32, 32), 43).num_parameters()


def test_vgg16_layer_table_at_small_input():
    model = build("vgg16", (3, 32, 32), 10, pool_size=0)
    assert [name for name, _ in model.named_children()] == ["features", "flatten", "classifier"]
    convs = [layer for layer in model["features"] if type(layer).__name__ == "Conv2D"]
    assert [c.out_channels for c in convs] == [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) and c.stride == (1, 1) for c in convs)
    assert sum(type(layer).__name__ == "MaxPool2D" for layer in model["features"]) == 5
    assert [layer.p for layer in model["classifier"] if type(layer).__name__ == "Dropout"] == [0.5, 0.5]
    conv_params = sum(c.num_parameters() for c in convs)
    assert conv_params == 14_714_688  # torchvision's vgg16().features
    assert model.num_parameters() == conv_params + (512 * 4096 + 4096) + (4096 * 4096 + 4096) + (4096 * 10 + 10)
    assert type(model["classifier"][-1]).__name__ == "Dense"  # logits: softmax is fused into the loss
    # torchvision's layout: a 7x7 adaptive pool feeds a 25,088-wide classifier at any input size
    assert build("vgg16", (3, 32, 32), 10, fc_width=8)["classifier"][0].in_features == 512 * 7 * 7


@pytest.mark.slow
def test_vgg16_imagenet_parameter_count_and_one_pass():
    model = build("vgg16", (3, 224, 224), 1000)
    assert model.num_parameters() == 138_357_544
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    y = model.forward(x, training=True)
    assert y.shape == (1, 1000) and np.isfinite(y).all()
    dx = model.backward(np.full((1, 1000), 1e-3, dtype=np.float32))
    assert dx.shape == x.shape and np.isfinite(dx).all()
    assert np.any(model["features"][0].grads["weight"])


def test_inception_module_shapes_and_parameters():
    module = inception_module(192, 64, 96, 128, 16, 32, 32)  # GoogLeNet's 3a
    assert isinstance(module, Concat)
    assert module.output_shape((192, 28, 28)) == (256, 28, 28)
    expected = (
        (192 * 64 + 64)  # 1x1
        + (192 * 96 + 96) + (96 * 9 * 128 + 128)  # 1x1 reduce -> 3x3
        + (192 * 16 + 16) + (16 * 25 * 32 + 32)  # 1x1 reduce -> 5x5
        + (192 * 32 + 32)  # pool -> 1x1 projection
    )
    assert module.num_parameters() == expected == 163_696
    x = np.random.default_rng(0).standard_normal((1, 192, 6, 5)).astype(np.float32)
    assert module.forward(x).shape == (1, 256, 6, 5)


@pytest.mark.parametrize("batch_norm,shape", [(False, (1, 2, 5, 4)), (True, (2, 3, 4, 4))])
def test_inception_module_gradients(batch_norm, shape):
    module = inception_module(shape[1], 2, 1, 2, 1, 2, 1, batch_norm=batch_norm, dtype=np.float64)
    report = check_gradients(module, shape, max_checks=40)
    five_by_five = "2.3.weight" if batch_norm else "2.2.weight"  # after reduce conv (+ BN) + ReLU
    assert {"input", "0.0.weight", five_by_five, "3.1.weight"} <= set(report.checked)
    assert module.branches[2][3 if batch_norm else 2].kernel_size == (5, 5)


def test_googlenet_small_structure():
    model = build("googlenet_small", (3, 32, 32), 10, width=0.25)
    modules = [layer for layer in model if isinstance(layer, Concat)]
    assert len(modules) == 5
    # 32x32 in; two stride-2 pools -> 8x8 at module 5a; its output feeds the classifier.
    shape = (3, 32, 32)
    for layer in model:
        if layer is modules[-1]:
            assert shape[1:] == (8, 8)
        shape = layer.output_shape(shape)
    assert model[-1].in_features == round(256 * 0.25) + round(320 * 0.25) + round(128 * 0.25) + round(128 * 0.25)


def test_nin_parameter_count():
    model = build("nin", (3, 32, 32), 10)
    expected = (
        (3 * 25 * 192 + 192) + (192 * 160 + 160) + (160 * 96 + 96)
        + (96 * 25 * 192 + 192) + (192 * 192 + 192) * 2
        + (192 * 9 * 192 + 192) + (192 * 192 + 192) + (192 * 10 + 10)
    )
    assert model.num_parameters() == expected == 966_986
    assert type(model[-1]).__name__ == "GlobalAvgPool2D"
    assert type(build("nin", (3, 32, 32), 10, final_relu=True)[-2]).__name__ == "ReLU"


def test_configuration_errors():
    with pytest.raises(ConfigError, match="variant"):
        build("gtsrb_cnn", (3, 48, 48), 43, variant="resnet")
    with pytest.raises(ConfigError, match="'modern' only"):
        build("gtsrb_cnn", (3, 48, 48), 43, variant="ciresan", channels=[[8]])
    with pytest.raises(ConfigError, match="'block_dropout' applies to variant 'modern' only"):
        build("gtsrb_cnn", (3, 48, 48), 43, variant="ciresan", block_dropout=[0.1])
    for bad in ([0.1, 0.2, 0.3, 0.4], [1.0], "high"):
        with pytest.raises(ConfigError, match="block_dropout must be a probability in \\[0, 1\\) or a list of at most 3"):
            build("gtsrb_cnn", (1, 32, 32), 43, block_dropout=bad)
    with pytest.raises(ConfigError, match="lenet5 does not fit a 1x8x8 input"):
        build("lenet5", (1, 8, 8), 10)
    with pytest.raises(ConfigError, match="vgg16 does not fit"):
        build("vgg16", (3, 16, 16), 10)
    with pytest.raises(ConfigError, match="image input shape"):
        build("nin", (784,), 10)
    with pytest.raises(PluginError, match="did you mean 'Tanh'"):
        build("lenet5", (1, 32, 32), 10, activation="tanh")


def test_float64_models():
    model = build("lenet5", (1, 16, 16), 3, dtype=np.float64)
    assert all(p.value.dtype == np.float64 for p in model.parameters())
    assert model.forward(np.zeros((1, 1, 16, 16))).dtype == np.float64


# -- training sanity: the loss falls on a toy separable problem ---------------------------
def toy_images(shape, count, classes, seed=0):
    """Class k: a bright vertical band in the k-th of ``classes`` strips, plus noise."""
    rng = np.random.default_rng(seed)
    channels, height, width = shape
    labels = np.arange(count) % classes
    x = rng.normal(0.0, 0.3, (count, channels, height, width))
    strip = width // classes
    for i, k in enumerate(labels):
        x[i, :, :, k * strip:(k + 1) * strip] += 1.0
    return x.astype(np.float32), labels


def training_losses(model, shape, count=24, steps=10, lr=1e-3):
    """Initialise as a run does (He/MSR weights), train with Adam, compare the losses.

    The loss is measured in training mode with the same dropout masks (reseeded)
    before and after, so the comparison is deterministic.
    """
    initialize(model, "msr", rng=0)
    x, labels = toy_images(shape, count, 3)
    loss = SoftmaxCrossEntropy()

    def measured():
        model.seed(0)
        return loss.forward(model.forward(x, training=True), labels)

    before = measured()
    optimizer = Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        model.zero_grad()
        loss.forward(model.forward(x, training=True), labels)
        model.backward(loss.backward())
        optimizer.step()
    after = measured()
    return before, after


TRAINING = [
    ("lenet5", {}, (1, 16, 16), {}),
    ("gtsrb_cnn", {"variant": "ciresan"}, (3, 32, 32), {"count": 12, "steps": 5}),
    ("gtsrb_cnn", {"channels": [[8], [16]], "fc_width": 32, "spatial_transformer": True}, (3, 16, 16), {}),
    ("googlenet_small", {"width": 0.125}, (3, 16, 16), {}),
    ("nin", {"width": 0.125}, (3, 16, 16), {"lr": 3e-3}),
]


@pytest.mark.parametrize("name,options,shape,schedule", TRAINING, ids=[f"{t[0]}-{i}" for i, t in enumerate(TRAINING)])
def test_training_loss_falls(name, options, shape, schedule):
    before, after = training_losses(build(name, shape, 3, **options), shape, **schedule)
    assert np.isfinite(after) and after < 0.7 * before, (before, after)


@pytest.mark.slow
def test_vgg16_training_loss_falls():
    before, after = training_losses(build("vgg16", (3, 32, 32), 3, pool_size=0), (3, 32, 32), count=6, steps=8, lr=1e-4)
    assert np.isfinite(after) and after < 0.7 * before, (before, after)
