"""Neural style transfer on a small conv net (rabbitkit.visualize.style): objective checks, no pictures looked at."""
import numpy as np
import pytest

from rabbitkit.data.preprocess import YUVStep
from rabbitkit.errors import ConfigError, DataError
from rabbitkit.layers.activations import ReLU
from rabbitkit.layers.conv2d import Conv2D
from rabbitkit.layers.pooling import AvgPool2D, MaxPool2D
from rabbitkit.layers.sequential import Sequential
from rabbitkit.layers.style_losses import StyleLoss, gram_matrix
from rabbitkit.probe import FeatureProbe
from rabbitkit.visualize import common
from rabbitkit.visualize.style import (VGG19_LAYERS, PixelSpace, keep_original_colors, resolve_layer_name,
                                       style_transfer)

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


def small_net(seed=0):
    """conv(3->16) relu maxpool conv(16->16) relu, weights from a fixed generator."""
    rng = np.random.default_rng(seed)
    net = Sequential([Conv2D(3, 16, 3, padding=1), ReLU(), MaxPool2D(2), Conv2D(16, 16, 3, padding=1), ReLU()],
                     names=["conv1", "relu1", "pool1", "conv2", "relu2"])
    for conv in (net[0], net[3]):
        fan_in = conv.params["weight"][0].size
        conv.params["weight"][...] = rng.normal(0, np.sqrt(2 / fan_in), conv.params["weight"].shape)
        conv.params["bias"][...] = rng.normal(0, 0.05, conv.params["bias"].shape)
    return net


def imagenet_encode(pixels):
    """torchvision's preprocessing of RGB pixels in [0, 1]: (x - mean) / std, NCHW."""
    return np.transpose((pixels - MEAN) / STD, (2, 0, 1))[None].astype(np.float32)


def smooth_image(h, w, seed):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    channels = []
    for _ in range(3):
        a, b, c, d = rng.uniform(1, 4, 4)
        channels.append(0.5 + 0.35 * np.sin(a * 3 * xx + b) * np.cos(c * 3 * yy + d))
    return np.clip(np.stack(channels, axis=2), 0, 1).astype(np.float32)


def textured_image(h, w, seed):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    stripes = 0.5 + 0.4 * np.sin(xx * 1.3 + yy * 0.4)[:, :, None] * np.array([1.0, -0.6, 0.3])
    return np.clip(stripes + rng.normal(0, 0.05, (h, w, 3)), 0, 1).astype(np.float32)


def run(content=None, styles=None, **options):
    options.setdefault("encode", imagenet_encode)
    options.setdefault("progress", False)
    options.setdefault("content_layers", ["relu2"])
    options.setdefault("style_layers", ["relu1", "relu2"])
    content = smooth_image(20, 24, 1) if content is None else content
    styles = [textured_image(20, 20, 2)] if styles is None else styles
    return style_transfer(small_net(), content, styles, **options)


def psnr(a, b):
    return 10 * np.log10(1.0 / np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))


def test_vgg19_names_are_torchvisions_indices():
    assert VGG19_LAYERS["relu1_1"] == "features.1"
    assert VGG19_LAYERS["relu2_1"] == "features.6"
    assert VGG19_LAYERS["relu3_1"] == "features.11"
    assert VGG19_LAYERS["relu4_1"] == "features.20"
    assert VGG19_LAYERS["relu4_2"] == "features.22"
    assert VGG19_LAYERS["relu5_1"] == "features.29"
    assert VGG19_LAYERS["conv5_4"] == "features.34" and VGG19_LAYERS["pool5"] == "features.36"


def test_neural_style_names_map_only_on_a_vgg19():
    features = Sequential([ReLU() for _ in range(37)])
    vgg_like = Sequential({"features": features})
    assert resolve_layer_name(vgg_like, "relu4_2") == "features.22"
    assert resolve_layer_name(vgg_like, "features.3") == "features.3"
    with pytest.raises(ConfigError, match="no layer named 'relu4_2'"):
        resolve_layer_name(small_net(), "relu4_2")


def test_pixel_space_reads_the_affine_preprocessing_and_inverts_it():
    bgr_caffe = lambda p: np.transpose(p[:, :, ::-1] * 255 - np.array([103.939, 116.779, 123.68]), (2, 0, 1))[None]
    for encode in (imagenet_encode, bgr_caffe):
        space = PixelSpace(encode)
        pixels = smooth_image(5, 4, 3)
        np.testing.assert_allclose(space.encode(pixels), encode(pixels), rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(space.decode(encode(pixels)), pixels, atol=1e-5)
    space = PixelSpace(imagenet_encode)
    np.testing.assert_allclose(space.low, -MEAN / STD, rtol=1e-6)
    np.testing.assert_allclose(space.high, (1 - MEAN) / STD, rtol=1e-6)
    with pytest.raises(ConfigError, match="not affine"):
        PixelSpace(lambda p: np.transpose(p ** 2, (2, 0, 1))[None])


def test_style_only_synthesis_from_noise_lowers_the_gram_loss_a_thousandfold():
    result = run(content_weight=0.0, tv_weight=0.0, style_layers=["relu1", "relu2"], init="noise",
                 iterations=150, scales=[20], seed=3)
    start, end = result.initial_losses["style"], result.losses["style"]
    assert start > 0 and end * 1e3 <= start, (start, end)
    # checked independently of the optimiser's own bookkeeping, on the image it returned
    style = imagenet_encode(textured_image(20, 20, 2))
    image = imagenet_encode(result.image)
    with FeatureProbe(small_net(), ["relu1", "relu2"]) as probe:
        targets = {name: gram_matrix(out) for name, out in probe.forward(style).items()}
        outputs = probe.forward(image)
        recomputed = sum(StyleLoss(targets[n], 100.0).forward(outputs[n]) for n in targets)
    assert recomputed * 1e3 <= start
    assert len(result.log.rows) == 150 and result.log.columns[:3] == ["step", "scale", "content"]


def test_content_only_reconstruction_from_a_shallow_layer_reaches_30_db():
    content = smooth_image(20, 24, 1)
    result = run(content=content, style_weight=0.0, tv_weight=0.0, content_layers=["relu1"],
                 style_layers=["relu1"], init="noise", iterations=300, scales=[24], seed=0)
    assert psnr(result.image, content) > 30.0


def test_original_colors_keep_the_contents_chroma():
    content = smooth_image(20, 24, 1)
    result = run(content=content, original_colors=True, iterations=10, scales=[24], init="noise", seed=1)
    yuv = YUVStep()
    out = yuv.apply(np.transpose(result.image, (2, 0, 1))[None].astype(np.float32))[0]
    ref = yuv.apply(np.transpose(content, (2, 0, 1))[None])[0]
    np.testing.assert_allclose(out[1:], ref[1:], atol=2e-6)
    assert not np.allclose(out[0], ref[0], atol=1e-2)  # the luminance is the generated one
    assert result.image.min() >= 0.0 and result.image.max() <= 1.0
    plain = run(content=content, iterations=10, scales=[24], init="noise", seed=1)
    plain_yuv = yuv.apply(np.transpose(plain.image, (2, 0, 1))[None].astype(np.float32))[0]
    assert not np.allclose(plain_yuv[1:], ref[1:], atol=1e-2)  # without the option the chroma differs


def test_keep_original_colors_clamps_luminance_into_gamut():
    rng = np.random.default_rng(4)
    content, generated = rng.uniform(0, 1, (6, 5, 3)), rng.uniform(0, 1, (6, 5, 3))
    generated[0, 0] = 1.0
    out = keep_original_colors(content, generated)
    assert out.min() >= -1e-12 and out.max() <= 1 + 1e-12
    chroma = lambda img: img - (img @ np.array([0.299, 0.587, 0.114]))[:, :, None]
    np.testing.assert_allclose(chroma(out), chroma(content), atol=1e-12)


def test_same_seed_gives_identical_bytes_and_another_seed_different(tmp_path):
    paths = []
    for name, seed in (("a.png", 5), ("b.png", 5), ("c.png", 6)):
        run(output=tmp_path / name, init="noise", iterations=8, scales=[16], seed=seed)
        paths.append(tmp_path / name)
    a, b, c = (p.read_bytes() for p in paths)
    assert a == b
    assert a != c
    assert (tmp_path / "a.csv").read_text() == (tmp_path / "b.csv").read_text()
    header = (tmp_path / "a.csv").read_text().splitlines()[0]
    assert header.startswith("step,scale,content,style,tv,total")


def test_coarse_to_fine_adam_and_average_pooling_run_and_lower_the_loss(tmp_path):
    result = run(scales=[12, 24], optimizer="adam", learning_rate=5.0, iterations=15, pooling="avg",
                 init="noise", seed=2, style_scale=0.8)
    assert result.image.shape == (20, 24, 3)
    assert result.log.column("scale") == [12] * 15 + [24] * 15
    totals = result.log.column("total")
    assert totals[14] < totals[0]
    net = small_net()
    style_transfer(net, smooth_image(8, 8, 1), [textured_image(8, 8, 2)], encode=imagenet_encode, pooling="avg",
                   content_layers=["relu2"], style_layers=["relu1"],
                   iterations=1, scales=[8], progress=False)
    assert isinstance(net[2], AvgPool2D)


def test_style_blend_changes_the_result_and_mismatched_blends_are_refused(tmp_path):
    styles = [textured_image(16, 16, 2), smooth_image(16, 16, 7)]
    a = run(styles=styles, style_blend=[0.9, 0.1], iterations=6, scales=[16])
    b = run(styles=styles, style_blend=[0.1, 0.9], iterations=6, scales=[16])
    assert not np.array_equal(a.pixels, b.pixels)
    with pytest.raises(ConfigError, match="3 weight.*for 2 style image"):
        run(styles=styles, style_blend=[0.5, 0.3, 0.2], output=tmp_path / "x.png")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("change,error,message", [
    ({"content": "missing.jpg"}, DataError, "missing.jpg: image file not found"),
    ({"styles": ["broken.png"]}, DataError, "broken.png"),
    ({"init": "missing-init.png"}, DataError, "missing-init.png: image file not found"),
    ({"style_layers": ["relu1", "relu9"]}, ConfigError, "no layer named 'relu9'.*nearest: relu2, relu1"),
    ({"content_layers": ["conv7"]}, ConfigError, "no layer named 'conv7'"),
    ({"optimizer": "sgd"}, ConfigError, "optimizer 'sgd': expected one of lbfgs, adam"),
    ({"pooling": "min"}, ConfigError, "pooling 'min'"),
])
def test_bad_inputs_are_one_line_errors_and_write_nothing(tmp_path, monkeypatch, change, error, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(error, match=message) as caught:
        run(output=tmp_path / "out.png", iterations=2, scales=[8], **change)
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "out.png").exists() and not (tmp_path / "out.csv").exists()


def test_a_model_that_is_not_a_model_is_refused():
    with pytest.raises(ConfigError, match="not a model"):
        style_transfer(object(), smooth_image(8, 8, 1), [textured_image(8, 8, 2)], iterations=1, scales=[8])


def test_output_png_and_csv_are_written_together(tmp_path):
    result = run(output=tmp_path / "out.png", iterations=3, scales=[12])
    assert result.files == (tmp_path / "out.png", tmp_path / "out.csv")
    loaded = common.load_image(tmp_path / "out.png")
    np.testing.assert_array_equal(loaded, result.pixels)
    assert len((tmp_path / "out.csv").read_text().splitlines()) == 4


def test_the_whole_objective_matches_finite_differences_in_float64():
    """Content, style at two depths (gradients injected and summed through the probe) and TV,
    through conv, ReLU and max pooling: the gradient scipy receives, against central differences."""
    from rabbitkit.layers.style_losses import ContentLoss, TotalVariationLoss
    from rabbitkit.visualize.style import _Objective

    rng = np.random.default_rng(5)
    net = Sequential([Conv2D(3, 4, 3, padding=1, dtype=np.float64), ReLU(dtype=np.float64),
                      MaxPool2D(2, dtype=np.float64), Conv2D(4, 5, 3, padding=1, dtype=np.float64),
                      ReLU(dtype=np.float64)], names=["conv1", "relu1", "pool1", "conv2", "relu2"], dtype=np.float64)
    content, style, x = (rng.normal(size=(1, 3, 6, 8)) for _ in range(3))
    with FeatureProbe(net, ["relu2", "relu1"]) as probe:
        target = np.array(probe.forward(content)["relu2"])
        grams = {n: gram_matrix(f) for n, f in probe.forward(style).items()}
        objective = _Objective(probe, [("relu2", ContentLoss(target, 5.0))],
                               [("relu1", StyleLoss(grams["relu1"], 100.0)), ("relu2", StyleLoss(grams["relu2"], 100.0))],
                               TotalVariationLoss(0.1), x.shape, np.float64)
        value, grad = objective(x.reshape(-1))
        assert objective.terms["content"] > 0 and objective.terms["style"] > 0 and objective.terms["tv"] > 0
        flat = x.reshape(-1).copy()
        numeric = np.zeros_like(flat)
        for i in range(flat.size):
            saved = flat[i]
            flat[i] = saved + 1e-6
            up = objective(flat)[0]
            flat[i] = saved - 1e-6
            down = objective(flat)[0]
            flat[i] = saved
            numeric[i] = (up - down) / 2e-6
    np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-8)


def test_style_transfer_on_cuda_gives_the_cpu_result():
    """The device path (probe outputs and losses on the GPU, Numba's simulator here) on a net
    of layers with CUDA kernels (ReLU, max pooling); gradients come back to scipy on the host."""
    def net():
        return Sequential([ReLU(), MaxPool2D(2), ReLU()], names=["relu1", "pool1", "relu2"])

    options = dict(encode=imagenet_encode, content_layers=["relu2"], style_layers=["relu1", "relu2"],
                   iterations=3, scales=[6], progress=False, init="noise", seed=1)
    content, style = smooth_image(6, 6, 1), textured_image(6, 6, 2)
    cpu = style_transfer(net(), content, [style], **options)
    device_net = net()
    device_net.to("cuda")
    gpu = style_transfer(device_net, content, [style], **options)
    assert set(gpu.losses) == set(cpu.losses)
    for key, value in cpu.losses.items():
        np.testing.assert_allclose(gpu.losses[key], value, rtol=1e-5, err_msg=key)
    np.testing.assert_allclose(gpu.image, cpu.image, atol=1e-5)


def test_init_from_an_image_starts_there():
    content = smooth_image(20, 24, 1)
    from_content = run(content=content, init="content", iterations=4, scales=[24])
    from_array = run(content=content, init=content.copy(), iterations=4, scales=[24])
    np.testing.assert_array_equal(from_array.pixels, from_content.pixels)
    other = run(content=content, init=textured_image(10, 12, 9), iterations=4, scales=[24])
    assert other.initial_losses["content"] > from_content.initial_losses["content"]
    assert from_content.initial_losses["content"] == 0.0  # the content image itself
