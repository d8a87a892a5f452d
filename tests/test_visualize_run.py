"""Class models, saliency and the rabbit layers / dream / visualize commands on a small
ConvNet trained in the test (tests/visualize_fixtures.py), plus third-party objective
and image-regulariser plugins."""
import sys
import textwrap

import numpy as np
import pytest
from click.testing import CliRunner

from rabbitkit.cli import main
from rabbitkit.errors import ConfigError
from rabbitkit.plugins import reset_manager
from rabbitkit.pretrained import open_model
from rabbitkit.visualize import class_models, common, saliency

import visualize_fixtures as fixtures


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    result = fixtures.train_tiny_run(tmp_path_factory)
    assert result.metrics["val_accuracy"] == 1.0  # the patterns are easy: the net must know them
    return result.run_dir


@pytest.fixture(scope="module")
def loaded(trained):
    return open_model(trained)


@pytest.fixture
def photo(tmp_path):
    """A 40x40 'blob' picture (larger than the net's 16 px input)."""
    image = np.kron(fixtures.pattern("blob", np.random.default_rng(5)), np.ones((3, 3, 1), np.uint8))[4:44, 4:44]
    return common.write_png(tmp_path / "blob.png", image)


def rabbit(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result


# -- class models and saliency ------------------------------------------------------------
@pytest.mark.parametrize("preset", [1, 2, 3])
def test_class_models_reach_softmax_above_0_9_with_the_regularisers_on(loaded, preset):
    log = common.StepLog()
    result = class_models(loaded, "all", preset=preset, steps=40, seed=0, log=log, progress=False)
    assert result.classes == [0, 1, 2] and result.names == list(fixtures.CLASSES)
    assert np.all(result.probabilities > 0.9), result.probabilities
    assert log.column("mean_probability")[0] < 0.6  # it started from noise, not from a class image
    assert all(image.shape == (16, 16, 3) and image.dtype == np.uint8 for image in result.images)


def test_norm_clipping_preset_leaves_half_the_pixels_at_zero(loaded):
    net = loaded.model
    result = class_models(net, [1], preset=1, steps=8, seed=0, input_shape=(3, 16, 16), progress=False)
    pixels = np.abs(result.images[0]).sum(axis=0)
    assert (pixels == 0).mean() >= 0.5


def test_class_models_same_seed_same_images_other_seed_other(loaded):
    first, again, other = (class_models(loaded, [2], steps=5, seed=s, progress=False).images[0] for s in (1, 1, 2))
    assert np.array_equal(first, again) and not np.array_equal(first, other)


def test_class_models_in_batches_match_one_batch(loaded):
    together, apart = common.StepLog(), common.StepLog()
    one = class_models(loaded.model, "all", steps=6, seed=3, input_shape=(3, 16, 16), log=together, progress=False)
    split = class_models(loaded.model, "all", steps=6, seed=3, input_shape=(3, 16, 16), batch_size=2, log=apart,
                         progress=False)
    for a, b in zip(one.images, split.images):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    assert apart.column("batch") == [1] * 6 + [2] * 6 and "batch" not in together.columns


def test_class_out_of_range_is_one_line(loaded):
    with pytest.raises(ConfigError, match=r"^class 3 is out of range: the model has 3 classes \(expected 0\.\.2\)$"):
        class_models(loaded, "0,3", steps=1, progress=False)


def test_saliency_maps_and_predicted_classes(loaded):
    rng = np.random.default_rng(9)
    pictures = [fixtures.pattern(kind, rng) for kind in fixtures.CLASSES]
    maps, classes = saliency(loaded, pictures)
    assert classes == [0, 1, 2]
    assert maps.shape == (3, 16, 16) and maps.min() >= 0 and np.allclose(maps.max(axis=(1, 2)), 1.0)


def test_class_models_and_saliency_on_cuda_give_the_cpu_result(trained):
    """The run's net on the device (Numba's CUDA simulator here): class models (regularisers
    on the host, forward and input gradient on the device) and saliency maps match the CPU's."""
    model = open_model(trained)
    pictures = [fixtures.pattern(kind, np.random.default_rng(9)) for kind in fixtures.CLASSES]
    on_cpu = class_models(model, [0, 2], steps=3, seed=4, progress=False)
    cpu_maps, cpu_classes = saliency(model, pictures)
    model.model.to("cuda")
    on_cuda = class_models(model, [0, 2], steps=3, seed=4, progress=False)
    cuda_maps, cuda_classes = saliency(model, pictures)
    assert all(layer.device == "cuda" for layer in model.model.layers)  # not moved back to run on the host
    for cpu_image, cuda_image in zip(on_cpu.images, on_cuda.images):
        np.testing.assert_allclose(cuda_image, cpu_image, rtol=1e-4, atol=1e-4)
    assert cuda_classes == cpu_classes
    np.testing.assert_allclose(cuda_maps, cpu_maps, rtol=1e-4, atol=1e-5)


# -- the commands ------------------------------------------------------------------------------
def test_rabbit_layers_lists_names_types_shapes_parameters(trained):
    result = rabbit("layers", trained)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["0", "Conv2D", "8x16x16", "216"]
    assert lines[-1].split() == ["12", "Dense", "3", "51"]


def test_rabbit_dream_writes_png_and_csv(trained, photo, tmp_path):
    out = tmp_path / "dream.png"
    result = rabbit("dream", trained, photo, "-o", out, "--layer", "4", "--octaves", 2, "--steps", 3, "--seed", 1)
    assert result.exit_code == 0, result.output
    image = common.load_image(out)
    assert image.shape == (40, 40, 3)
    lines = (tmp_path / "dream.csv").read_text().splitlines()
    assert lines[0] == "step,octave,objective" and len(lines) == 1 + 2 * 3


def test_rabbit_dream_same_seed_same_bytes_other_seed_other_bytes(trained, photo, tmp_path):
    def run(seed, name):
        out = tmp_path / name
        assert rabbit("dream", trained, photo, "-o", out, "--layer", "6", "--steps", 2, "--octaves", 2,
                      "--tile-size", 16, "--seed", seed).exit_code == 0
        return out.read_bytes()

    assert run(3, "a.png") == run(3, "b.png")
    assert run(3, "a.png") != run(4, "c.png")


def test_rabbit_dream_objectives_and_frames(trained, photo, tmp_path):
    for args in (["--layer", "4", "--channel", 2], ["--layer", "4", "--unit", "1,4,4"],
                 ["--layer", "2", "--layer", "6", "--layer-weights", "1,0.5"], ["--class", 1],
                 ["--layer", "6", "--minimise"], ["--layer", "6", "--guide", photo]):
        result = rabbit("dream", trained, photo, "-o", tmp_path / "x.png", "--steps", 2, "--octaves", 1, *args)
        assert result.exit_code == 0, (args, result.output)
    result = rabbit("dream", trained, photo, "-o", tmp_path / "zoom.png", "--layer", "4", "--steps", 1,
                    "--octaves", 1, "--frames", 3, "--zoom", 0.1)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.glob("zoom_*.png")) == ["zoom_0000.png", "zoom_0001.png", "zoom_0002.png"]
    assert "frame" in (tmp_path / "zoom.csv").read_text().splitlines()[0]


def test_rabbit_visualize_class_models_and_saliency(trained, photo, tmp_path):
    result = rabbit("visualize", trained, "--classes", "0,2", "-o", tmp_path / "classes.png", "--steps", 4)
    assert result.exit_code == 0, result.output
    assert common.load_image(tmp_path / "classes.png").shape[1] > 2 * 96
    assert len((tmp_path / "classes.csv").read_text().splitlines()) == 1 + 4
    result = rabbit("visualize", trained, "--saliency", photo, "-o", tmp_path / "saliency.png")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "saliency.csv").read_text().splitlines()[1] == "1,blob.png,1,blob"


def test_rabbit_dream_and_visualize_with_device_cuda(trained, photo, tmp_path):
    """The commands with ``--device cuda`` (Numba's CUDA simulator here) write the CPU's
    pictures (pixels within one level: float32 sums in another order may round
    across a level) and logs; a device that does not exist is one line."""
    import csv

    for device in ("cpu", "cuda"):
        result = rabbit("dream", trained, photo, "-o", tmp_path / f"dream-{device}.png", "--layer", "4",
                        "--octaves", 2, "--steps", 2, "--seed", 1, "--device", device)
        assert result.exit_code == 0, result.output
        result = rabbit("visualize", trained, "--classes", "1", "-o", tmp_path / f"classes-{device}.png",
                        "--steps", 2, "--device", device)
        assert result.exit_code == 0, result.output
    for name in ("dream", "classes"):
        cpu, cuda = (common.load_image(tmp_path / f"{name}-{d}.png").astype(int) for d in ("cpu", "cuda"))
        assert cpu.shape == cuda.shape and np.abs(cpu - cuda).max() <= 1, name
        logs = [list(csv.DictReader(open(tmp_path / f"{name}-{d}.csv"))) for d in ("cpu", "cuda")]
        assert len(logs[0]) == len(logs[1]) > 0
        for cpu_row, cuda_row in zip(*logs):
            value = "objective" if name == "dream" else next(k for k in cpu_row if k not in ("step", "batch"))
            assert float(cuda_row[value]) == pytest.approx(float(cpu_row[value]), rel=1e-4), (name, value)
    result = CliRunner().invoke(main, ["dream", str(trained), str(photo), "-o", str(tmp_path / "x.png"),
                                       "--layer", "4", "--device", "tpu"])
    assert result.exit_code != 0 and "--device 'tpu': expected one of cpu, cuda" in result.output
    assert not (tmp_path / "x.png").exists()


@pytest.fixture
def corrupt(tmp_path):
    path = tmp_path / "inputs" / "corrupt.png"
    path.parent.mkdir()
    path.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return path


@pytest.mark.parametrize("case, message", [
    ("missing image", r"nothere\.png: image file not found"),
    ("corrupt image", r"corrupt\.png: cannot decode image"),
    ("unknown layer", r"no layer named 'features\.3'"),
    ("layer deeper than the model", r"layer '30' is deeper than the model: Sequential has layers 0\.\.12"),
    ("class out of range", r"class 7 is out of range: the model has 3 classes"),
    ("channel out of range", r"channel 8 is out of range: layer '4' has 8 channels"),
    ("not a model: a folder", r"is a folder but not a run directory"),
    ("not a model: a text file", r"neither a run directory, a rabbitkit checkpoint, nor a weights file"),
    ("missing output folder", r"output folder '.*nofolder' does not exist"),
    ("two objectives", r"--channel and --class exclude each other"),
    ("channel without a layer", r"--channel needs exactly one --layer, got 2"),
])
def test_bad_input_is_one_line_nonzero_exit_nothing_written(trained, photo, corrupt, tmp_path, case, message):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "o.png"
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    args = {
        "missing image": ["dream", trained, tmp_path / "nothere.png", "-o", out, "--layer", "4"],
        "corrupt image": ["dream", trained, corrupt, "-o", out, "--layer", "4"],
        "unknown layer": ["dream", trained, photo, "-o", out, "--layer", "features.3"],
        "layer deeper than the model": ["dream", trained, photo, "-o", out, "--layer", "30"],
        "class out of range": ["visualize", trained, "--classes", "0,7", "-o", out],
        "channel out of range": ["dream", trained, photo, "-o", out, "--layer", "4", "--channel", 8],
        "not a model: a folder": ["dream", tmp_path / "inputs", photo, "-o", out, "--layer", "4"],
        "not a model: a text file": ["layers", text],
        "missing output folder": ["dream", trained, photo, "-o", tmp_path / "nofolder" / "o.png", "--layer", "4"],
        "two objectives": ["dream", trained, photo, "-o", out, "--layer", "4", "--channel", 1, "--class", 0],
        "channel without a layer": ["dream", trained, photo, "-o", out, "--layer", "4", "--layer", "6", "--channel", 1],
    }[case]
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert __import__("re").search(message, lines[0]), lines[0]
    assert list(out_dir.iterdir()) == []


# -- third-party objectives and regularisers -------------------------------------------------
PLUGIN = textwrap.dedent('''
    import numpy as np
    import rabbitkit

    calls = {"objective": 0, "regularizer": 0}


    class NegativeMean:
        """Minimise the mean of a layer (a toy objective)."""
        tileable = True

        def __init__(self, layer, scale=1.0):
            self.layers, self.scale = (layer,), float(scale)

        def __call__(self, features):
            calls["objective"] += 1
            y = features[self.layers[0]]
            return -self.scale * float(y.mean()), {self.layers[0]: np.full(y.shape, -self.scale / y.size)}


    class Quantise:
        """Round pixels to a grid of `step` after every step."""
        def __init__(self, step=0.5):
            self.step = float(step)

        def __call__(self, images, grad, step):
            calls["regularizer"] += 1
            images[...] = np.round(images / self.step) * self.step


    @rabbitkit.hookimpl
    def rabbit_objectives():
        return {"negative_mean": NegativeMean}


    @rabbitkit.hookimpl
    def rabbit_image_regularizers():
        return {"quantise": Quantise}
''')


@pytest.fixture
def plugin_module(tmp_path, monkeypatch):
    (tmp_path / "toy_visual_plugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    reset_manager()
    yield "toy_visual_plugin"
    sys.modules.pop("toy_visual_plugin", None)
    reset_manager()


def test_third_party_objective_and_regulariser_through_dash_p(trained, photo, tmp_path, plugin_module):
    listing = rabbit("-p", plugin_module, "plugins").output
    assert "negative_mean" in listing and "quantise" in listing
    out = tmp_path / "p.png"
    result = rabbit("-p", plugin_module, "dream", trained, photo, "-o", out, "--layer", "6",
                    "--objective", "negative_mean", "--option", "scale=2", "--steps", 3, "--octaves", 1,
                    "--jitter", 0, "--step-size", 0.02)
    assert result.exit_code == 0, result.output
    plugin = sys.modules[plugin_module]
    assert plugin.calls["objective"] == 3
    values = [float(line.split(",")[-1]) for line in (tmp_path / "p.csv").read_text().splitlines()[1:]]
    assert all(v < 0 for v in values) and values[-1] > values[0]  # minus the mean of a ReLU layer, rising
    result = rabbit("-p", plugin_module, "visualize", trained, "-o", tmp_path / "q.png", "--steps", 2,
                    "--regularizer", "quantise:step=0.25", "--regularizer", "blur:sigma=0.5,every=1")
    assert result.exit_code == 0, result.output
    assert plugin.calls["regularizer"] == 2


def test_unknown_objective_is_one_line(trained, photo, tmp_path):
    result = CliRunner().invoke(main, ["dream", str(trained), str(photo), "-o", str(tmp_path / "x.png"),
                                       "--layer", "4", "--objective", "l3"])
    assert result.exit_code == 2
    assert result.output.strip().startswith("error: unknown objective 'l3'")


# -- end-of-run visualisers ----------------------------------------------------------------------
def test_class_models_and_saliency_visualizers_at_the_end_of_a_run(tmp_path_factory):
    result = fixtures.train_tiny_run(tmp_path_factory, visualizers=["class_models", "saliency"])
    for name in ("class_models.png", "class_models.csv", "saliency.png", "saliency.csv"):
        assert (result.run_dir / name).is_file(), name


def test_a_model_without_images_is_one_line(tmp_path, photo):
    import rabbitkit

    run = rabbitkit.run({"data": {"dataset": "function1d", "n_train": 32}, "model": {"architecture": "mlp", "hidden": [8]},
                         "train": {"epochs": 1, "batch_size": 16}, "output": {"visualizers": []}},
                        out=tmp_path / "runs", quiet=True)
    result = CliRunner().invoke(main, ["dream", str(run.run_dir), str(photo), "-o", str(tmp_path / "x.png"),
                                       "--layer", "0"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "does not take images" in lines[0], result.output
    assert not (tmp_path / "x.png").exists()


def test_rabbit_visualize_same_seed_same_bytes_other_seed_other_bytes(trained, tmp_path):
    def run(seed, name):
        assert rabbit("visualize", trained, "-o", tmp_path / name, "--steps", 5, "--preset", 1,
                      "--seed", seed).exit_code == 0
        return (tmp_path / name).read_bytes()

    assert run(0, "a.png") == run(0, "b.png")
    assert run(0, "a.png") != run(1, "c.png")


def test_unknown_regulariser_is_one_line(trained, tmp_path):
    result = CliRunner().invoke(main, ["visualize", str(trained), "-o", str(tmp_path / "x.png"),
                                       "--regularizer", "blurr:sigma=1"])
    assert result.exit_code == 2
    assert result.output.strip().startswith("error: unknown image_regularizer 'blurr' (did you mean 'blur'?)")
    assert not (tmp_path / "x.png").exists()
