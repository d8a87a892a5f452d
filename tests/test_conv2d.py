"""Conv2D: forward against scipy.signal.correlate, gradients, chunking, shapes and errors."""
import numpy as np
import pytest
from scipy.signal import correlate

import rabbitkit
from rabbitkit.errors import ConfigError
from rabbitkit.layers.conv2d import Conv2D
from rabbitkit.testing import check_gradients

# (batch, in, height, width, out, kernel, stride, padding): square and rectangular
# kernels, strides 1-3, padding where the windows do not tile the input exactly.
CASES = [
    (2, 3, 7, 5, 4, (3, 2), (2, 1), (1, 0)),
    (1, 2, 9, 9, 3, 3, 3, 1),
    (3, 1, 5, 6, 2, 1, 1, 0),
    (2, 2, 8, 7, 3, (5, 3), (2, 3), (2, 1)),
    (1, 2, 11, 10, 2, 7, 2, 3),
    (2, 3, 6, 9, 5, 5, 1, 2),
    (1, 1, 4, 4, 1, 4, 1, 0),
]


ALGORITHMS = ["per-sample", "whole-batch", "banded", "shifted", "winograd", "winograd-batch", "channels-last"]


@pytest.fixture
def smallest_bands(monkeypatch):
    """Bands of the fewest rows they may have (kh, or the whole image when it is
    shorter): several bands per image, so both parities of the input gradient's
    scatter run and neighbouring bands add into the same padded rows."""
    monkeypatch.setattr("rabbitkit.layers._conv_lowering.BAND_BYTES", 64)
    monkeypatch.setattr("rabbitkit.layers._conv_shifted.UNPACKED_PRODUCT_LIMIT", 1)


def reference_conv(x, weight, bias, stride, padding):
    """Direct cross-correlation per (sample, output channel) with scipy, then striding."""
    x = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (padding[0],) * 2, (padding[1],) * 2))
    weight = weight.astype(np.float64)
    return np.array([
        [correlate(sample, kernel, mode="valid")[0][:: stride[0], :: stride[1]] + b for kernel, b in zip(weight, bias)]
        for sample in x
    ])


@pytest.mark.parametrize("case", CASES)
def test_forward_matches_scipy_correlate(case, rng):
    n, c, h, w, o, k, s, p = case
    layer = Conv2D(c, o, k, stride=s, padding=p)
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    y = layer.forward(x)
    expected = reference_conv(x, layer.params["weight"], layer.params["bias"], layer.stride, layer.padding)
    assert y.dtype == np.float32 and y.shape == expected.shape
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)
    assert layer.output_shape(x.shape[1:]) == y.shape[1:]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_gradients(case, bias, algorithm, smallest_bands):
    n, c, h, w, o, k, s, p = case
    layer = Conv2D(c, o, k, stride=s, padding=p, bias=bias, dtype=np.float64)
    layer.algorithm = algorithm
    report = check_gradients(layer, (n, c, h, w))
    assert report.checked["input"] == min(n * c * h * w, 150)
    assert ("bias" in report.checked) == bias


@pytest.mark.parametrize("stride", [1, 2])
def test_batch_kernel_matches_one_sample_at_a_time(stride, rng):
    """The batch-parallel kernel (per-thread scratch and gradient parts) must agree with
    the serial one a single sample takes, and the BLAS thread counts must be restored."""
    from rabbitkit.layers.conv2d import SINGLE_THREADED_BLAS

    threads_before = [lib.num_threads for lib in SINGLE_THREADED_BLAS._blas()]
    layer = Conv2D(3, 4, 3, stride=stride, padding=1)
    x = rng.standard_normal((5, 3, 7, 6)).astype(np.float32)
    y = layer.forward(x)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    dx = layer.backward(dy)
    batch_grads = {name: grad.copy() for name, grad in layer.grads.items()}
    layer.zero_grad()
    for n in range(5):
        np.testing.assert_allclose(layer.forward(x[n : n + 1]), y[n : n + 1], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(layer.backward(dy[n : n + 1]), dx[n : n + 1], rtol=1e-5, atol=1e-6)
    for name, grad in layer.grads.items():
        np.testing.assert_allclose(grad, batch_grads[name], rtol=1e-4, atol=1e-5)
    assert [lib.num_threads for lib in SINGLE_THREADED_BLAS._blas()] == threads_before


def test_backward_matches_loop_reference_and_accumulates(rng):
    layer = Conv2D(2, 3, (3, 2), stride=(2, 1), padding=(1, 1))
    x = rng.standard_normal((2, 2, 5, 4)).astype(np.float32)
    y = layer.forward(x)
    dy = rng.standard_normal(y.shape).astype(np.float32)
    dx = layer.backward(dy)
    # Direct loops over every (output, tap) pair.
    weight = layer.params["weight"].astype(np.float64)
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    dxp = np.zeros_like(xp)
    dweight = np.zeros_like(weight)
    for n in range(2):
        for o in range(3):
            for oh in range(y.shape[2]):
                for ow in range(y.shape[3]):
                    window = xp[n, :, oh * 2 : oh * 2 + 3, ow : ow + 2]
                    dweight[o] += dy[n, o, oh, ow] * window
                    dxp[n, :, oh * 2 : oh * 2 + 3, ow : ow + 2] += dy[n, o, oh, ow] * weight[o]
    np.testing.assert_allclose(dx, dxp[:, :, 1:-1, 1:-1], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(layer.grads["weight"], dweight, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(layer.grads["bias"], dy.sum(axis=(0, 2, 3)), rtol=1e-5, atol=1e-5)
    layer.backward(dy)  # gradients add up until zero_grad
    np.testing.assert_allclose(layer.grads["weight"], 2 * dweight, rtol=1e-4, atol=1e-5)


def test_parameters_shapes_flops_and_registry():
    layer = rabbitkit.layers.Conv2D(3, 8, (5, 3), stride=2, padding=(2, 1))
    assert type(layer) is Conv2D
    assert layer.params["weight"].shape == (8, 3, 5, 3)
    assert layer.params["bias"].shape == (8,)
    assert layer.param_roles == {"weight": "weight", "bias": "bias"}
    assert layer.output_shape((3, 32, 31)) == (8, 16, 16)
    assert layer.flops((3, 32, 31)) == 2 * 8 * 3 * 5 * 3 * 16 * 16
    assert Conv2D(3, 8, 3, bias=False).num_parameters() == 8 * 3 * 9
    assert Conv2D(1, 1, 3, dtype="float64").params["weight"].dtype == np.float64


def test_float64_input_is_cast_to_layer_dtype():
    y = Conv2D(1, 2, 3).forward(np.ones((1, 1, 4, 4)))
    assert y.dtype == np.float32 and y.shape == (1, 2, 2, 2)


def test_user_errors_are_config_errors():
    with pytest.raises(ConfigError, match="3 input channels, got 4"):
        Conv2D(3, 2, 3).forward(np.zeros((1, 4, 5, 5), np.float32))
    with pytest.raises(ConfigError, match="does not fit"):
        Conv2D(1, 2, 5).output_shape((1, 3, 8))
    with pytest.raises(ConfigError, match="kernel_size"):
        Conv2D(1, 2, 3, stride=0)
    with pytest.raises(ConfigError, match="kernel_size must be an int"):
        Conv2D(1, 2, "3x3")
    with pytest.raises(ConfigError, match=r"\(N, C, H, W\)"):
        Conv2D(1, 2, 3).forward(np.zeros((4, 4), np.float32))


def test_skipped_input_gradient_leaves_parameter_gradients_unchanged():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 3, 9, 7)).astype(np.float32)
    full, first = Conv2D(3, 5, 3, padding=1), Conv2D(3, 5, 3, padding=1)
    first.load_state_dict(full.state_dict())
    first.skip_input_grad()
    dy = rng.standard_normal((4, 5, 9, 7)).astype(np.float32)
    full.forward(x)
    assert full.backward(dy).shape == x.shape
    first.forward(x)
    assert first.backward(dy) is None
    for key in ("weight", "bias"):
        np.testing.assert_array_equal(first.grads[key], full.grads[key])


def test_kernel_blas_is_single_threaded_inside_kernels_and_nesting_restores():
    """The BLAS that kernels call (scipy's) runs on one thread; numpy's keeps its pool."""
    from threadpoolctl import threadpool_info

    from rabbitkit.backend.cpu import SINGLE_THREADED_BLAS

    def threads():
        return {lib["filepath"]: lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"}

    before = threads()
    with SINGLE_THREADED_BLAS:
        with SINGLE_THREADED_BLAS:
            inside = threads()
        assert threads() == inside
    assert threads() == before
    kernel_side = [path for path in inside if "numpy" not in path]
    assert kernel_side and all(inside[path] == 1 for path in kernel_side)


@pytest.mark.parametrize("stride, relu, band_bytes", [(1, False, 1 << 19), (2, False, 1 << 19), (1, True, 1 << 19),
                                                     (1, True, 200), (1, False, 1)])
def test_cpu_variants_agree_to_float32_rounding(stride, relu, band_bytes, rng, monkeypatch):
    """Per-sample, whole-batch, banded and channels-last lowering, shifted products and
    Winograd compute the same thing (sums in another order); ``band_bytes`` makes one band
    per image, several, or the fewest rows a band may have (kh).  Stride 2 has no banded,
    shifted, channels-last or Winograd variant (whole-batch runs)."""
    from rabbitkit.layers.activations import ReLU
    from rabbitkit.layers.sequential import Sequential

    monkeypatch.setattr("rabbitkit.layers._conv_lowering.BAND_BYTES", band_bytes)
    results = []
    monkeypatch.setattr("rabbitkit.layers._conv_shifted.UNPACKED_PRODUCT_LIMIT", band_bytes // 4)
    for algorithm in ALGORITHMS:
        conv = Conv2D(3, 5, 3, stride=stride, padding=1)
        conv.load_state_dict({"weight": np.linspace(-1, 1, 135).reshape(5, 3, 3, 3), "bias": np.arange(5) / 10})
        conv.algorithm = algorithm
        model = Sequential([conv, ReLU()] if relu else [conv])
        x = np.random.default_rng(7).standard_normal((4, 3, 9, 8)).astype(np.float32)
        y = model.forward(x)
        assert conv.fused_relu == relu
        dx = model.backward(np.random.default_rng(8).standard_normal(y.shape).astype(np.float32))
        results.append((y, dx, conv.grads["weight"].copy(), conv.grads["bias"].copy()))
    for other in results[1:]:
        for first, second in zip(results[0], other):
            np.testing.assert_allclose(first, second, rtol=1e-5, atol=1e-5)


def test_banded_lowering_never_writes_the_whole_column_matrix(rng):
    """A batch of one large image: the banded variant's column scratch is one band per
    thread, a small part of the (K, Ho*Wp) matrix that whole-batch lowering writes."""
    import numba

    from rabbitkit.layers import _conv_lowering
    from rabbitkit.layers.conv2d import scratch

    conv = Conv2D(4, 8, 3, padding=1)
    conv.algorithm = "banded"
    x = rng.standard_normal((1, 4, 300, 298)).astype(np.float32)
    # The buffer is shared with other variants (Winograd's tiles) and only grows: start it afresh.
    _conv_lowering._workspace.pop(("conv_band_cols", np.dtype(np.float32)), None)
    whole = Conv2D(4, 8, 3, padding=1)
    whole.load_state_dict(conv.state_dict())
    whole.algorithm = "whole-batch"
    np.testing.assert_allclose(conv.forward(x), whole.forward(x), rtol=1e-5, atol=1e-5)
    band_block = scratch("conv_band_cols", (1,), np.float32).base.size  # the buffer as it grew
    column_matrix = 4 * 9 * 300 * 300
    assert band_block <= numba.get_num_threads() * (_conv_lowering.BAND_BYTES // 4 + 4 * 9 * 300)
    assert band_block * 4 < column_matrix


@pytest.mark.parametrize("algorithm", ALGORITHMS[1:])
def test_frozen_batch_of_one_conv_skips_weight_gradients(algorithm, rng):
    from rabbitkit.layers import freeze

    conv = Conv2D(2, 3, 3, padding=1)
    conv.algorithm = algorithm
    reference = Conv2D(2, 3, 3, padding=1)
    reference.load_state_dict(conv.state_dict())
    freeze(conv, "*")
    x = rng.standard_normal((1, 2, 6, 5)).astype(np.float32)
    dy = rng.standard_normal((1, 3, 6, 5)).astype(np.float32)
    conv.forward(x)
    reference.forward(x)
    assert conv._x is None  # a frozen layer keeps no input: its backward needs only the shape
    np.testing.assert_allclose(conv.backward(dy), reference.backward(dy), rtol=1e-5, atol=1e-6)
    assert not conv.grads["weight"].any() and not conv.grads["bias"].any()
    conv.forward(x)
    freeze(conv, "*", frozen=False)
    with pytest.raises(RuntimeError, match="unfrozen after a forward pass"):
        conv.backward(dy)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_frozen_fused_relu_keeps_a_byte_mask_and_the_same_gradient(algorithm, rng):
    """Frozen and unobserved, a Conv2D with a fused ReLU keeps one byte per output
    (where it is positive) instead of its output; the input gradient is that of the
    conv and the ReLU as separate layers, bit for bit.  Observed or trained, it keeps y."""
    from rabbitkit.layers import freeze
    from rabbitkit.layers.activations import ReLU
    from rabbitkit.layers.sequential import Sequential

    x = rng.standard_normal((2, 3, 7, 6)).astype(np.float32)
    dy = rng.standard_normal((2, 4, 7, 6)).astype(np.float32)
    fused, separate = (Sequential([Conv2D(3, 4, 3, padding=1), ReLU()], fuse_relu=f) for f in (True, False))
    separate.load_state_dict(fused.state_dict())
    for model in (fused, separate):
        model[0].algorithm = algorithm
        freeze(model, "*")
    y = fused.forward(x)
    np.testing.assert_array_equal(y, separate.forward(x))
    assert fused[0].fused_relu and fused[0]._y.dtype == np.uint8 and fused[0]._y.shape == y.shape
    np.testing.assert_array_equal(fused.backward(dy), separate.backward(dy))
    fused[0].output_observed = True  # someone reads the conv's own output: it stays as it is
    fused.forward(x)
    assert fused[0]._y.dtype == np.float32
    fused[0].output_observed = False
    freeze(fused, "*", frozen=False)
    fused.forward(x)
    assert fused[0]._y.dtype == np.float32


# Winograd F(2x2, 3x3): (batch, in, height, width, out, padding) with odd and even
# output sizes (a last tile half outside), one-pixel images and padding 0 to 2.
WINOGRAD_CASES = [
    (2, 3, 7, 6, 4, 1),
    (1, 2, 5, 8, 3, 0),
    (3, 1, 4, 3, 2, 2),
    (1, 2, 1, 1, 3, 1),
    (2, 4, 9, 5, 1, 1),
]


@pytest.fixture
def one_tile_row_bands(monkeypatch):
    """Bands of one tile row: many bands per image, so both parities of the input
    gradient's scatter run and neighbouring bands share padded rows."""
    monkeypatch.setattr("rabbitkit.layers._conv_lowering.BAND_BYTES", 1)
    monkeypatch.setattr("rabbitkit.layers._conv_winograd.MIN_BAND_TILES", 1)


@pytest.mark.parametrize("case", WINOGRAD_CASES)
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("algorithm", ["winograd", "winograd-batch"])
def test_winograd_gradients(case, relu, algorithm, one_tile_row_bands):
    """Finite differences (float64) through the Winograd kernels, with and without a
    fused ReLU: the backward pass is the exact adjoint of the transformed forward."""
    from rabbitkit.layers.activations import ReLU
    from rabbitkit.layers.sequential import Sequential

    n, c, h, w, o, p = case
    conv = Conv2D(c, o, 3, padding=p, dtype=np.float64)
    conv.algorithm = algorithm
    model = Sequential([conv, ReLU(dtype=np.float64)]) if relu else conv
    report = check_gradients(model, (n, c, h, w))
    assert report.checked["input"] == min(n * c * h * w, 150)
    assert conv.fused_relu == relu


@pytest.mark.parametrize("case", WINOGRAD_CASES)
@pytest.mark.parametrize("bands", ["one tile row", "default", "whole batch"])
def test_winograd_matches_lowering_in_float32(case, bands, rng, request):
    """Forward, input gradient, weight and bias gradients of Winograd (in bands, or the
    whole batch at once) against per-sample lowering, float32, to float32 rounding (the
    transforms sum up to four times as many terms per element)."""
    if bands == "one tile row":
        request.getfixturevalue("one_tile_row_bands")
    n, c, h, w, o, p = case
    x = rng.standard_normal((n, c, h, w)).astype(np.float32)
    results = []
    for algorithm in ("per-sample", "winograd-batch" if bands == "whole batch" else "winograd"):
        conv = Conv2D(c, o, 3, padding=p)
        conv.load_state_dict({"weight": np.sin(np.arange(o * c * 9)).reshape(o, c, 3, 3), "bias": np.arange(o) / 7})
        conv.algorithm = algorithm
        y = conv.forward(x)
        dx = conv.backward(np.cos(np.arange(y.size)).reshape(y.shape).astype(np.float32))
        results.append((y, dx, conv.grads["weight"].copy(), conv.grads["bias"].copy()))
    for lowered, tiled in zip(*results):
        np.testing.assert_allclose(tiled, lowered, rtol=1e-5, atol=2e-5)


def test_winograd_only_for_3x3_at_stride_1():
    """Forcing Winograd on another kernel size or stride runs whole-batch lowering."""
    from rabbitkit.layers.conv2d import WHOLE_BATCH, WINOGRAD, WINOGRAD_BATCH

    for kernel, stride in [(5, 1), (3, 2), ((3, 1), 1)]:
        for algorithm in (WINOGRAD, WINOGRAD_BATCH):
            conv = Conv2D(2, 3, kernel, stride=stride)
            conv.algorithm = algorithm
            assert conv._variant("forward", np.zeros((1, 2, 8, 8), np.float32), None, 0) == WHOLE_BATCH


def test_bands_are_never_shorter_than_the_kernel():
    """Bands of one parity must not add into the same element: a band's windows reach
    kh - 1 rows and kw - 1 elements past it, so bands have at least kh rows (or the
    whole image), whatever the budget."""
    from rabbitkit.layers._conv_lowering import band_rows
    from rabbitkit.layers._conv_shifted import shifted_band_rows

    assert band_rows(3, 10_000, 226, 4, ho=224) == 3  # a budget of under one row
    assert band_rows(5, 1, 8, 4, ho=4) == 4  # the image is shorter than the kernel's rows
    for unpacked in (True, False):
        assert shifted_band_rows(512, 512, 3, 226, 4, ho=224, unpacked=unpacked) == 3
        assert shifted_band_rows(2, 2, 3, 10, 4, ho=8, unpacked=unpacked) == 8
    # Under OpenBLAS's unpacked-product limit, the tallest band whose product fits:
    assert shifted_band_rows(32, 32, 3, 34, 4, ho=32, unpacked=True) == 1_000_000 // (32 * 32 * 34)


def test_tuner_times_the_shifted_variant_at_stride_1_from_8_channels(monkeypatch):
    """The tuner's candidates: shifted products where the layer has stride 1 and enough
    input channels for a product per tap to be worth timing; forced at another stride,
    the layer runs whole-batch lowering."""
    from rabbitkit.backend import tuning
    from rabbitkit.layers.conv2d import SHIFTED, WHOLE_BATCH

    offered = {}
    monkeypatch.setattr(tuning, "choose", lambda op, shape, candidates, default, **_: offered.setdefault(
        (shape[0][1], shape[3]), sorted(candidates)) and default)
    for channels, stride in [(3, 1), (8, 1), (8, 2)]:
        conv = Conv2D(channels, 4, 3, stride=stride, padding=1)
        conv._variant("forward", np.zeros((4, channels, 9, 9), np.float32), None, 0)
    assert SHIFTED in offered[(8, (1, 1))]
    assert SHIFTED not in offered[(3, (1, 1))] and SHIFTED not in offered[(8, (2, 2))]
    conv = Conv2D(8, 4, 3, stride=2)
    conv.algorithm = SHIFTED
    assert conv._variant("forward", np.zeros((1, 8, 9, 9), np.float32), None, 0) == WHOLE_BATCH


def test_tuner_times_the_channels_last_forward_at_stride_1_from_8_channels(monkeypatch):
    """Channels-last lowering is a forward candidate where per-sample lowering is one
    (stride 1, at least as many samples as threads) and the input has enough channels;
    forced, the backward pass runs per-sample lowering, and at stride 2 whole-batch."""
    import numba

    from rabbitkit.backend import tuning
    from rabbitkit.layers.conv2d import CHANNELS_LAST, PER_SAMPLE, WHOLE_BATCH

    offered = {}
    monkeypatch.setattr(tuning, "choose", lambda op, shape, candidates, default, **_: offered.setdefault(
        (op, shape[0][0], shape[0][1], shape[3]), sorted(candidates)) and default)
    threads = numba.get_num_threads()
    for batch, channels, stride in [(threads, 8, 1), (threads, 3, 1), (threads, 8, 2)]:
        conv = Conv2D(channels, 4, 3, stride=stride, padding=1)
        for direction in ("forward", "backward"):
            conv._variant(direction, np.zeros((batch, channels, 9, 9), np.float32), None, 0)
    assert (CHANNELS_LAST in offered[("conv2d.forward", threads, 8, (1, 1))]) == (threads > 1)
    assert CHANNELS_LAST not in offered[("conv2d.backward", threads, 8, (1, 1))]
    assert CHANNELS_LAST not in offered[("conv2d.forward", threads, 3, (1, 1))]
    assert CHANNELS_LAST not in offered[("conv2d.forward", threads, 8, (2, 2))]
    conv = Conv2D(8, 4, 3, padding=1)
    conv.algorithm = CHANNELS_LAST
    x = np.zeros((1, 8, 9, 9), np.float32)
    assert conv._variant("forward", x, None, 0) == CHANNELS_LAST
    assert conv._variant("backward", x, None, 0) == PER_SAMPLE
    conv = Conv2D(8, 4, 3, stride=2)
    conv.algorithm = CHANNELS_LAST
    assert conv._variant("forward", x, None, 0) == WHOLE_BATCH


@pytest.mark.parametrize("variant", ["shifted", "channels-last"])
@pytest.mark.parametrize("kernel, padding", [(3, 1), ((2, 3), (0, 1)), (1, 0)])
def test_shifted_and_channels_last_match_lowering_in_float32(variant, kernel, padding, smallest_bands, rng):
    """Forward, input, weight and bias gradients of the shifted variant and the channels-last
    forward against per-sample lowering, in float32 with a fused ReLU, bands of the fewest
    rows; 9 channels and 10 columns: full and partial tiles of the channels-last transpose."""
    from rabbitkit.layers.activations import ReLU
    from rabbitkit.layers.sequential import Sequential

    x = rng.standard_normal((3, 9, 11, 10)).astype(np.float32)
    results = []
    for algorithm in ("per-sample", variant):
        conv = Conv2D(9, 6, kernel, padding=padding)
        weight = np.sin(np.arange(conv.params["weight"].size)).reshape(conv.params["weight"].shape)
        conv.load_state_dict({"weight": weight, "bias": np.arange(6) / 7})
        conv.algorithm = algorithm
        model = Sequential([conv, ReLU()])
        y = model.forward(x)
        dx = model.backward(np.cos(np.arange(y.size)).reshape(y.shape).astype(np.float32))
        results.append((y, dx, conv.grads["weight"].copy(), conv.grads["bias"].copy()))
    for lowered, other in zip(*results):
        np.testing.assert_allclose(other, lowered, rtol=1e-5, atol=1e-5)
