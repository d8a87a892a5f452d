"""open_model on every kind of MODEL, preprocessing there and back, prediction, loading errors."""
import numpy as np
import pytest
from PIL import Image

import rabbitkit
from rabbitkit import model_input, pretrained
from rabbitkit.errors import CheckpointError, RabbitError
from rabbitkit.train.trainer import BEST


def make_image_folder(root, classes=("dark", "light"), count=10, size=12):
    """Class folders of small RGB PNGs: dark images in the first class, light ones in the second."""
    rng = np.random.default_rng(0)
    for k, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(count):
            base = 40 + 170 * k
            pixels = np.clip(base + rng.integers(-30, 30, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def image_run(tmp_path, preprocess=("scale", "standardize"), grayscale=False):
    folder = make_image_folder(tmp_path / "images")
    experiment = {
        "experiment": {"name": "img", "seed": 3},
        "data": {"dataset": "image_folder", "path": str(folder), "image_size": 8, "val_fraction": 0.2,
                 "cache": False, "grayscale": grayscale, "preprocess": list(preprocess)},
        "model": {"layers": [{"type": "Flatten"}, {"type": "Dense", "out_features": 2}]},
        "train": {"epochs": 2, "batch_size": 4, "lr": 0.05},
        "output": {"visualizers": []},
    }
    return rabbitkit.run(experiment, out=tmp_path / "runs", quiet=True).run_dir


@pytest.fixture
def run_dir(tmp_path):
    return image_run(tmp_path)


def test_open_model_on_a_run_directory(run_dir, tmp_path):
    loaded = pretrained.open_model(run_dir)
    assert loaded.input_shape == (3, 8, 8) and loaded.class_names == ["dark", "light"]
    assert loaded.name == run_dir.name and loaded.preprocessing.kind == "pipeline"
    image = Image.open(tmp_path / "images" / "light" / "0.png")
    x = loaded.preprocess([image, np.asarray(image)])
    assert x.shape == (2, 3, 8, 8) and x.dtype == np.float32
    np.testing.assert_array_equal(x[0], x[1])
    # The run's own pipeline: the same numbers the trainer fed the model.
    pixels = np.asarray(image.resize((8, 8), Image.BILINEAR)).transpose(2, 0, 1)[None]
    np.testing.assert_allclose(x[:1], loaded.run.feeder.pipeline.apply(pixels), rtol=1e-6)
    # scale + standardize is invertible: deprocess gives the pixels back.
    back = loaded.deprocess(x[:1])[0]
    assert back.shape == (8, 8, 3) and back.dtype == np.uint8
    np.testing.assert_array_equal(back, pixels[0].transpose(1, 2, 0))
    low, high = zip(*loaded.input_range)
    assert np.all(x >= np.array(low)[:, None, None] - 1e-6) and np.all(x <= np.array(high)[:, None, None] + 1e-6)
    # size=None keeps an image's own size (conv-only use)
    assert loaded.preprocess(image, size=None).shape == (1, 3, 12, 12)
    top = loaded.predict([image], top=2)[0]
    assert [name for name, _ in top] == sorted(["dark", "light"], key=lambda n: -dict(top)[n])
    assert abs(sum(p for _, p in top) - 1.0) < 1e-9


def test_open_model_on_the_runs_checkpoint_file(run_dir):
    loaded = pretrained.open_model(run_dir / "checkpoints" / BEST)
    assert loaded.class_names == ["dark", "light"] and loaded.name == run_dir.name


def test_non_invertible_pipeline_deprocess_rescales_for_display(tmp_path):
    loaded = pretrained.open_model(image_run(tmp_path, preprocess=["grayscale", "lcn", "standardize"]))
    assert loaded.input_shape == (1, 8, 8) and not loaded.preprocessing.invertible
    x = loaded.preprocess(tmp_path / "images" / "dark" / "1.png")
    image = loaded.deprocess(x)[0]
    assert image.shape == (8, 8, 1) and image.min() == 0 and image.max() == 255
    (low, high), = loaded.input_range  # what the model saw on training images
    assert low < 0 < high


@pytest.mark.parametrize("what,message", [
    ("missing", "no such run directory or file"),
    ("folder", "is a folder but not a run directory"),
    ("text", "is neither a run directory, a rabbitkit checkpoint, nor a weights file (pass --arch with weights)"),
    ("weights", "is a safetensors weights file: pass --arch NAME"),
    ("orphan", "is a run's checkpoint outside its run directory"),
])
def test_bad_model_is_one_line(what, message, tmp_path, run_dir):
    spec = {"missing": tmp_path / "nope", "folder": tmp_path / "images", "text": tmp_path / "notes.txt",
            "weights": tmp_path / "w.safetensors", "orphan": tmp_path / "orphan.safetensors"}[what]
    (tmp_path / "notes.txt").write_text("hello\n")
    from safetensors.numpy import save_file

    save_file({"a": np.zeros(3, np.float32)}, str(tmp_path / "w.safetensors"))
    (tmp_path / "orphan.safetensors").write_bytes((run_dir / "checkpoints" / BEST).read_bytes())
    with pytest.raises(RabbitError) as info:
        pretrained.open_model(spec)
    text = str(info.value)
    assert message in text and str(spec) in text and "\n" not in text


def test_affine_input_round_trip_and_range():
    prep = model_input.AffineInput((4, 6), mean=[104.0, 117.0, 123.0], std=[1, 1, 1], order="BGR", value_range=255.0)
    pixels = np.random.default_rng(0).integers(0, 256, (4, 6, 3)).astype(np.uint8)
    x = prep.preprocess(pixels)
    np.testing.assert_allclose(x[0, 0], pixels[:, :, 2] - 104.0)  # channel 0 is blue
    np.testing.assert_array_equal(prep.deprocess(x)[0], pixels)
    assert prep.input_range[0] == (-104.0, 151.0)
    assert prep.mean_pixel == [123.0, 117.0, 104.0]  # RGB
    torch_like = model_input.from_dict(prep.to_dict() | {"order": "RGB", "mean": [0.485, 0.456, 0.406],
                                                          "std": [0.229, 0.224, 0.225], "value_range": 1.0})
    y = torch_like.preprocess(pixels)
    np.testing.assert_allclose(y[0, 1], (pixels[:, :, 1] / 255.0 - 0.456) / 0.224, rtol=1e-5)
    np.testing.assert_array_equal(torch_like.deprocess(y)[0], pixels)


def test_resize_then_centre_crop():
    prep = model_input.AffineInput((4, 4), [0, 0, 0], [1, 1, 1], value_range=255.0, resize=8)
    wide = np.random.default_rng(1).integers(0, 256, (10, 20, 3)).astype(np.uint8)
    x = prep.preprocess(wide)
    # shorter side 10 -> 8 (so 20 -> 16), then the central 4x4: rows 2..5, columns 6..9
    resized = np.asarray(Image.fromarray(wide).resize((16, 8), Image.BILINEAR))
    np.testing.assert_array_equal(x[0].transpose(1, 2, 0), resized[2:6, 6:10])


def test_load_into_names_the_first_tensor_that_does_not_fit():
    from rabbitkit.layers.dense import Dense

    model = rabbitkit.Sequential([Dense(3, 4), Dense(4, 2)])
    good = model.state_dict()
    report = pretrained.load_into(model, good, "f.pth", "tiny")
    assert len(report.loaded) == 4 and not report.missing
    bad_shape = dict(good, **{"1.weight": np.zeros((2, 5), np.float32)})
    with pytest.raises(CheckpointError, match=r"^f.pth: '1.weight' has shape \(2, 5\), tiny expects \(2, 4\)$"):
        pretrained.load_into(model, bad_shape, "f.pth", "tiny")
    missing = {k: v for k, v in good.items() if k != "0.bias"}
    with pytest.raises(CheckpointError, match=r"no tensor '0.bias' in the file \(tiny expects shape \(4,\)\)"):
        pretrained.load_into(model, missing, "f.pth", "tiny")
    extra = dict(good, **{"2.weight": np.zeros(1, np.float32)})
    with pytest.raises(CheckpointError, match="tensor '2.weight' of shape \\(1,\\) is not a parameter of tiny"):
        pretrained.load_into(model, extra, "f.pth", "tiny")
    loose = pretrained.load_into(model, dict(missing, **{"2.weight": np.zeros(1)}), "f.pth", "tiny", strict=False)
    assert loose.missing == ["0.bias"] and loose.unexpected == ["2.weight"]
    # A head of another size is re-initialised, not an error, when the head is named.
    before = np.array(model[1].params["weight"])
    head = pretrained.load_into(model, bad_shape, "f.pth", "tiny", head="1")
    assert head.new_head == ["1"] and np.array_equal(model[1].params["weight"], before)
