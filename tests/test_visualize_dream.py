"""Deep Dream, objectives and tiled gradients (rabbitkit.visualize), judged by numbers, not pictures."""
import numpy as np
import pytest

from rabbitkit.errors import ConfigError
from rabbitkit.layers.activations import ReLU
from rabbitkit.layers.batchnorm import BatchNorm
from rabbitkit.layers.branches import Concat
from rabbitkit.layers.conv2d import Conv2D
from rabbitkit.layers.dense import Dense
from rabbitkit.layers.flatten import Flatten
from rabbitkit.layers.pooling import AvgPool2D, MaxPool2D
from rabbitkit.layers.sequential import Sequential
from rabbitkit.probe import FeatureProbe
from rabbitkit.visualize import common
from rabbitkit.visualize.deepdream import dream, dream_frames, make_step
from rabbitkit.visualize.gradients import ImageGradient
from rabbitkit.visualize.objectives import Channel, Guide, LayerL2, Unit, WeightedSum
from rabbitkit.visualize.tiling import TilingError, layer_geometries
from rabbitkit.testing import numeric_gradient

F64 = np.float64


def conv_net(dtype=F64, seed=0):
    """conv-relu-maxpool-[concat of 1x1 and 3x3 branches]-bn-relu-avgpool-conv: no dense part."""
    rng = np.random.default_rng(seed)
    net = Sequential(
        [
            Conv2D(3, 6, 3, padding=1, dtype=dtype), ReLU(dtype=dtype), MaxPool2D(2, dtype=dtype),
            Concat([Conv2D(6, 4, 1, dtype=dtype), Conv2D(6, 4, 3, padding=1, dtype=dtype)], dtype=dtype),
            BatchNorm(8, dtype=dtype), ReLU(dtype=dtype), AvgPool2D(2, dtype=dtype),
            Conv2D(8, 5, 3, padding=1, dtype=dtype),
        ],
        dtype=dtype,
    )
    bn = net[4]
    bn.buffers["running_mean"][...] = rng.normal(0, 0.1, 8)
    bn.buffers["running_var"][...] = rng.uniform(0.5, 1.5, 8)
    return net


def test_geometry_of_the_conv_net():
    table = layer_geometries(conv_net())
    assert (table["0"].field, table["0"].jump, table["0"].start) == ((3, 3), (1, 1), (-1, -1))
    assert (table["2"].field, table["2"].jump) == ((4, 4), (2, 2))
    assert (table["3"].field, table["3"].jump, table["3"].start) == ((8, 8), (2, 2), (-3, -3))
    assert (table["7"].field, table["7"].jump, table["7"].start) == ((18, 18), (4, 4), (-7, -7))


def test_a_dense_layer_cannot_be_tiled():
    net = Sequential({"features": conv_net(), "flatten": Flatten(dtype=F64), "fc": Dense(5 * 4 * 4, 3, dtype=F64)},
                     dtype=F64)
    table = layer_geometries(net)
    assert isinstance(table["fc"], TilingError) and isinstance(table[""], TilingError)
    with pytest.raises(TilingError, match="flatten"):
        ImageGradient(net, LayerL2("fc"), tile_size=8)


@pytest.mark.parametrize("layer", ["3", "7"])
@pytest.mark.parametrize("tile, offset", [(8, (0, 0)), (12, (5, 3)), (16, (7, 1))])
def test_tiled_gradient_equals_the_whole_image_gradient(layer, tile, offset):
    net = conv_net()
    x = np.random.default_rng(1).normal(size=(1, 3, 37, 45))
    objective = WeightedSum([(1.0, LayerL2(layer)), (0.5, Channel("3", 2))])
    with ImageGradient(net, objective) as whole:
        value, grad = whole(x)
    with ImageGradient(net, objective, tile_size=tile) as tiled:
        tiled_value, tiled_grad = tiled(x, offset=offset)
    # float64 throughout: the tiles differ from the whole only in summation order
    np.testing.assert_allclose(tiled_value, value, rtol=1e-12)
    np.testing.assert_allclose(tiled_grad, grad, rtol=1e-9, atol=1e-12 * np.abs(grad).max())


def test_tiled_gradient_through_inception_branches_and_lrn():
    from rabbitkit.layers.lrn import LocalResponseNorm
    from rabbitkit.models.inception import inception_module

    net = Sequential({"stem": Conv2D(3, 8, 5, stride=2, padding=2, dtype=F64), "relu": ReLU(dtype=F64),
                      "norm": LocalResponseNorm(5, 1e-2, 0.75, 1.0, dtype=F64),
                      "pool": MaxPool2D(3, stride=2, padding=1, dtype=F64),
                      "inception": inception_module(8, 4, 4, 6, 2, 3, 3, dtype=F64)}, dtype=F64)
    x = np.random.default_rng(8).normal(size=(1, 3, 50, 43))
    with ImageGradient(net, LayerL2("inception")) as whole:
        value, grad = whole(x)
    with ImageGradient(net, LayerL2("inception"), tile_size=16) as tiled:
        tiled_value, tiled_grad = tiled(x, offset=(3, 9))
    np.testing.assert_allclose(tiled_value, value, rtol=1e-12)
    np.testing.assert_allclose(tiled_grad, grad, rtol=1e-9, atol=1e-12 * np.abs(grad).max())


def test_tiled_gradient_on_caffe_googlenet_with_ceil_mode_pools():
    from rabbitkit.pretrained import build

    net = build("bvlc_googlenet", dtype=F64)  # random weights: the geometry is what is tested
    x = np.random.default_rng(10).normal(size=(1, 3, 150, 131))
    with ImageGradient(net, LayerL2("inception_3b")) as whole:
        value, grad = whole(x)
    with ImageGradient(net, LayerL2("inception_3b"), tile_size=64) as tiled:
        tiled_value, tiled_grad = tiled(x, offset=(5, 7))
    np.testing.assert_allclose(tiled_value, value, rtol=1e-12)
    np.testing.assert_allclose(tiled_grad, grad, rtol=1e-9, atol=1e-12 * np.abs(grad).max())


def test_unit_objective_is_refused_by_tiling():
    with ImageGradient(conv_net(), Unit("7", 1), tile_size=8) as gradient:
        with pytest.raises(TilingError, match="not a sum over positions"):
            gradient(np.zeros((1, 3, 16, 16)))


def test_guided_objective_gradient_matches_finite_differences():
    net = conv_net()
    rng = np.random.default_rng(2)
    guide_image = rng.normal(size=(1, 3, 12, 10))
    with FeatureProbe(net, ["3"]) as probe:
        guide = Guide("3", probe.forward(guide_image)["3"])
    x = rng.normal(size=(1, 3, 8, 8))
    with ImageGradient(net, guide) as gradient:
        _, grad = gradient(x)
        numeric = numeric_gradient(lambda v: gradient(v)[0], x.copy())
    np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-7)


def test_objective_at_two_depths_through_lrn_and_dense_matches_finite_differences():
    from rabbitkit.layers.lrn import LocalResponseNorm
    from rabbitkit.visualize.objectives import ClassLogit

    features = conv_net()
    features.layers.insert(2, LocalResponseNorm(5, 1e-2, 0.75, 1.0, dtype=F64))
    net = Sequential({"features": Sequential(features.layers, dtype=F64), "flatten": Flatten(dtype=F64),
                      "fc": Dense(5 * 2 * 2, 3, dtype=F64)}, dtype=F64)
    objective = WeightedSum([(0.7, LayerL2("features.2")), (1.0, ClassLogit(2)), (-0.3, Channel("features.4", 1))])
    x = np.random.default_rng(12).normal(size=(1, 3, 8, 8))
    with ImageGradient(net, objective) as gradient:
        _, grad = gradient(x)
        numeric = numeric_gradient(lambda v: gradient(v)[0], x.copy())
    np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-7)


def test_guided_objective_pulls_towards_the_best_match():
    guide = np.zeros((2, 1, 2))
    guide[:, 0, 0] = (1.0, 0.0)
    guide[:, 0, 1] = (0.0, 1.0)
    y = np.array([[[[3.0, 0.1]], [[0.2, 2.0]]]])  # position 0 matches guide 0, position 1 guide 1
    value, grads = Guide("a", guide)({"a": y})
    assert value == pytest.approx(3.0 + 2.0)
    np.testing.assert_array_equal(grads["a"][0, :, 0, :], [[1.0, 0.0], [0.0, 1.0]])


def test_dream_objective_rises_at_every_step_without_jitter_or_clipping():
    net = conv_net()
    x = np.random.default_rng(3).normal(size=(3, 24, 24))
    log = common.StepLog()
    dream(net, x, layer="7", octaves=1, steps=12, step_size=0.01, jitter=0, clip=False, log=log, progress=False)
    values = log.column("objective")
    assert len(values) == 12
    assert all(b > a for a, b in zip(values, values[1:])), values


def test_minimised_dream_objective_falls():
    log = common.StepLog()
    x = np.random.default_rng(3).normal(size=(3, 24, 24))
    dream(conv_net(), x, layer="3", minimise=True, octaves=1, steps=6, step_size=0.01, jitter=0, clip=False,
          log=log, progress=False)
    values = log.column("objective")  # the maximised quantity: minus the L2
    assert all(b > a for a, b in zip(values, values[1:])) and values[0] < 0


def test_dream_octaves_keep_the_size_and_clip_to_the_range():
    x = np.random.default_rng(4).uniform(-1, 1, size=(3, 40, 30))
    out = dream(conv_net(), x, layer=["3", "7"], weights=[1.0, 0.25], octaves=3, steps=3, jitter=4,
                input_range=([-1.0] * 3, [1.0] * 3), seed=0, progress=False)
    assert out.shape == x.shape and out.min() >= -1 and out.max() <= 1
    assert not np.allclose(out, x)


def test_an_octave_too_small_for_the_net_is_one_line():
    with pytest.raises(ConfigError, match=r"^octave 1 of 4 is 3x3 pixels, too small for the net \(.*\); use fewer"):
        dream(conv_net(), np.zeros((3, 8, 8)), layer="7", octaves=4, octave_scale=1.4, steps=1, progress=False)


def test_make_step_normalises_the_step_by_the_mean_gradient():
    net = conv_net()
    x = np.random.default_rng(5).normal(size=(3, 16, 16))
    with ImageGradient(net, LayerL2("3")) as gradient:
        _, g = gradient(x[None])
        before = x.copy()
        make_step(gradient, x, np.random.default_rng(0), step_size=1.5, jitter=0)
    np.testing.assert_allclose(np.abs(x - before).mean(), 1.5, rtol=1e-9)
    np.testing.assert_allclose(x - before, 1.5 * g[0] / np.abs(g).mean(), rtol=1e-9)


def test_same_seed_same_bytes_other_seed_other_bytes():
    x = np.random.default_rng(6).uniform(0, 1, size=(3, 32, 32)).astype(np.float32)
    net = conv_net(np.float32)

    def png(seed):
        out = dream(net, x, layer="3", octaves=2, steps=3, jitter=8, tile_size=12, seed=seed,
                    input_range=([0.0] * 3, [1.0] * 3), progress=False)
        return common.png_bytes((out.transpose(1, 2, 0) * 255).round().astype(np.uint8))

    assert png(7) == png(7)
    assert png(7) != png(8)


def test_zoom_frames_and_their_log():
    x = np.random.default_rng(7).normal(size=(3, 20, 20))
    log = common.StepLog()
    frames = dream_frames(conv_net(), x, 3, zoom=0.1, layer="3", octaves=2, steps=2, seed=1, log=log,
                          progress=False)
    assert len(frames) == 3 and all(f.shape == x.shape for f in frames)
    assert log.column("frame") == [0] * 4 + [1] * 4 + [2] * 4
    assert log.column("octave")[:4] == [1, 1, 2, 2]


@pytest.mark.parametrize("kwargs, message", [
    (dict(layer="3.0.5"), r"^layer '3\.0\.5' is deeper than the model: '3\.0' \(Conv2D\) has no layers inside$"),
    (dict(layer="8"), r"^layer '8' is deeper than the model: Sequential has layers 0\.\.7$"),
    (dict(layer="conv9"), r"no layer named 'conv9'"),
    (dict(objective=Channel("3", 99)), r"channel 99 is out of range: layer '3' has 8 channels"),
    (dict(layer="3", weights=[1, 2]), r"2 layer weights for 1 layers"),
    (dict(), r"needs a layer"),
])
def test_bad_dream_arguments_are_one_line_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message) as info:
        dream(conv_net(), np.zeros((3, 16, 16)), steps=1, octaves=1, progress=False, **kwargs)
    assert "\n" not in str(info.value)


class _Terminal:
    """A stand-in for stderr on a terminal (the bar draws only there)."""

    def __init__(self):
        self.text = []

    def isatty(self):
        return True

    def write(self, text):
        self.text.append(text)

    def flush(self):
        pass


def test_progress_bar_is_drawn_on_a_terminal_and_gets_the_objective(monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    monkeypatch.delenv("RABBIT_PROGRESS", raising=False)
    updates = []
    real_bar = common.objective_bar

    def recording_bar(total, desc, enabled=None):
        bar = real_bar(total, desc, enabled)
        update = bar.update
        bar.update = lambda n=1, **postfix: (updates.append(postfix), update(n, **postfix))
        return bar

    monkeypatch.setattr(common, "objective_bar", recording_bar)
    log = common.StepLog()
    dream(conv_net(), np.zeros((3, 16, 16)) + 0.5, layer="3", octaves=1, steps=3, jitter=0, log=log)
    assert "dream" in "".join(terminal.text)  # tqdm drew the bar (it redraws the postfix at most every 0.2 s)
    assert [u["objective"] for u in updates] == log.column("objective")


def test_dream_on_a_loaded_model_with_caffe_preprocessing_takes_and_gives_pixels():
    from rabbitkit.model_input import AffineInput
    from rabbitkit.pretrained import LoadedModel

    preprocessing = AffineInput((24, 24), mean=[104.0, 117.0, 123.0], std=[1.0, 1.0, 1.0], order="BGR",
                                value_range=255.0)
    loaded = LoadedModel(conv_net(np.float32), "caffe-like", (3, 24, 24), None, preprocessing)
    photo = np.random.default_rng(11).integers(0, 256, (30, 36, 3), dtype=np.uint8)
    out = dream(loaded, photo, layer="3", octaves=2, steps=3, seed=0, progress=False)
    assert out.dtype == np.uint8 and out.shape == photo.shape
    assert not np.array_equal(out, photo)
    from rabbitkit.visualize.subject import Subject

    subject = Subject(loaded)  # the clip range: pixels 0 and 255 per BGR channel, minus Caffe's mean
    np.testing.assert_array_equal(subject.input_range[0].ravel(), [-104.0, -117.0, -123.0])
    np.testing.assert_array_equal(subject.input_range[1].ravel(), [151.0, 138.0, 132.0])
    assert subject.span() == pytest.approx(255.0)  # so a step of 1.5 is 1.5 pixel levels, as in the notebook


def test_dream_on_cuda_gives_the_cpu_result():
    """Deep Dream with the net on the device (Numba's CUDA simulator here): octaves,
    jitter, tiles and clipping on the host, the forward and input gradient on the
    device, the same image as on the CPU to float32 rounding."""
    x = np.random.default_rng(8).uniform(0, 1, size=(3, 13, 12)).astype(np.float32)
    options = dict(layer=["3", "7"], weights=[1.0, 0.5], octaves=2, octave_scale=1.2, steps=1, jitter=3,
                   tile_size=9, seed=2, input_range=([0.0] * 3, [1.0] * 3), progress=False)
    cpu_log, cuda_log = common.StepLog(), common.StepLog()
    net = conv_net(np.float32)
    on_cpu = dream(net, x, log=cpu_log, **options)
    net.to("cuda")
    on_cuda = dream(net, x, log=cuda_log, **options)
    np.testing.assert_allclose(cuda_log.column("objective"), cpu_log.column("objective"), rtol=1e-4)
    np.testing.assert_allclose(on_cuda, on_cpu, atol=1e-4)
    assert not np.allclose(on_cpu, x)
