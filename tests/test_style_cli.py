"""``rabbit style`` end to end on a small conv net's run directory."""
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import rabbitkit
from rabbitkit.cli import main


def _images(root, count=6, size=12):
    rng = np.random.default_rng(0)
    for k, name in enumerate(("dark", "light")):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(count):
            pixels = np.clip(40 + 170 * k + rng.integers(-30, 30, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("style_cli")
    experiment = {
        "experiment": {"name": "convnet", "seed": 3},
        "data": {"dataset": "image_folder", "path": str(_images(root / "images")), "image_size": 8,
                 "val_fraction": 0.2, "cache": False, "preprocess": ["scale", "standardize"]},
        "model": {"layers": [{"type": "Conv2D", "out_channels": 8, "kernel_size": 3, "padding": 1}, {"type": "ReLU"},
                             {"type": "MaxPool2D", "kernel_size": 2},
                             {"type": "Conv2D", "out_channels": 8, "kernel_size": 3, "padding": 1}, {"type": "ReLU"},
                             {"type": "Flatten"}, {"type": "Dense", "out_features": 2}]},
        "train": {"epochs": 1, "batch_size": 4, "lr": 0.05},
        "output": {"visualizers": []},
    }
    run_dir = rabbitkit.run(experiment, out=root / "runs", quiet=True).run_dir
    yy, xx = np.mgrid[0:14, 0:18]
    content = np.stack([xx * 14, yy * 18, 255 - xx * 7 - yy * 5], axis=2).clip(0, 255).astype(np.uint8)
    Image.fromarray(content).save(root / "content.png")
    stripes = (127 + 120 * np.sin(xx * 1.7 + yy * 0.3))[:, :, None] * np.array([1.0, 0.4, 0.8])
    Image.fromarray(stripes.clip(0, 255).astype(np.uint8)).save(root / "style.png")
    Image.fromarray(255 - content).save(root / "style2.png")
    (root / "notes.txt").write_text("not a model\n")
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff broken")
    return root, run_dir


def _style(workdir, out, *extra):
    root, run_dir = workdir
    args = ["style", str(run_dir), "--content", str(root / "content.png"), "--style", str(root / "style.png"),
            "-o", str(out), "--content-layers", "1", "--style-layers", "1,4", "--image-size", "16",
            "--iterations", "6", "--quiet", *extra]
    return CliRunner().invoke(main, args)


def test_style_end_to_end_writes_png_and_csv(workdir, tmp_path):
    result = _style(workdir, tmp_path / "out.png", "--style", str(workdir[0] / "style2.png"),
                    "--style-blend", "0.7,0.3", "--scales", "10,16", "--pooling", "avg", "--original-colors")
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and "content" in result.output
    image = np.asarray(Image.open(tmp_path / "out.png"))
    assert image.shape == (12, 16, 3) and image.dtype == np.uint8  # 14x18 content, longest side 16
    lines = (tmp_path / "out.csv").read_text().splitlines()
    assert lines[0].startswith("step,scale,content,style,tv,total") and len(lines) == 1 + 2 * 6


def test_same_seed_same_bytes_other_seed_other_bytes(workdir, tmp_path):
    for name, seed in (("a.png", "1"), ("b.png", "1"), ("c.png", "2")):
        result = _style(workdir, tmp_path / name, "--init", "noise", "--seed", seed, "--optimizer", "adam")
        assert result.exit_code == 0, result.output
    a, b, c = ((tmp_path / n).read_bytes() for n in ("a.png", "b.png", "c.png"))
    assert a == b and a != c


@pytest.mark.parametrize("extra,message", [
    (["--content", "missing.png"], "missing.png: image file not found"),
    (["--style", "BROKEN"], "broken.jpg"),
    (["--style-layers", "1,44"], "no layer named '44'"),
    (["--style-blend", "0.7,0.3"], "2 weight(s) for 1 style image(s)"),
    (["--style-blend", "a,b"], "--style-blend 'a,b': expected comma-separated numbers"),
    (["--scales", "16,x"], "--scales '16,x'"),
    (["--init", "nowhere.png"], "nowhere.png: image file not found"),
    (["--optimizer", "sgd"], "optimizer 'sgd'"),
    (["MODEL", "NOTES"], "neither a run directory"),
])
def test_bad_input_is_one_line_and_writes_nothing(workdir, tmp_path, extra, message):
    root, run_dir = workdir
    extra = [str(root / "broken.jpg") if e == "BROKEN" else e for e in extra]
    if extra[0] == "MODEL":
        args = ["style", str(root / "notes.txt"), "--content", str(root / "content.png"),
                "--style", str(root / "style.png"), "-o", str(tmp_path / "out.png")]
        result = CliRunner().invoke(main, args)
    else:
        result = _style(workdir, tmp_path / "out.png", *extra)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
    assert list(tmp_path.iterdir()) == []


def test_neural_style_defaults_on_the_zoos_vgg19_checkpoint(tmp_path):
    """The defaults (relu4_2 / relu1_1 … relu5_1) resolve on the zoo's VGG-19 (random weights, a small
    classifier) read back from a standalone checkpoint with torchvision's preprocessing."""
    from rabbitkit import model_input, pretrained
    from rabbitkit.models._zoo import TORCHVISION_INPUT
    from rabbitkit.models.vgg import vgg19

    net = vgg19((3, 32, 32), 10, fc_width=16, pool_size=0)
    loaded = pretrained.LoadedModel(net, "vgg19-small", (3, 32, 32), None, model_input.from_dict(TORCHVISION_INPUT),
                                    "vgg19", {"fc_width": 16, "pool_size": 0}, 10)
    checkpoint = pretrained.save_model(tmp_path / "vgg19.safetensors", loaded)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (30, 40, 3)).astype(np.uint8)).save(tmp_path / "c.png")
    Image.fromarray(rng.integers(0, 255, (30, 30, 3)).astype(np.uint8)).save(tmp_path / "s.png")
    result = CliRunner().invoke(main, ["style", str(checkpoint), "--content", str(tmp_path / "c.png"),
                                       "--style", str(tmp_path / "s.png"), "-o", str(tmp_path / "o.png"),
                                       "--image-size", "32", "--iterations", "3", "--quiet"])
    assert result.exit_code == 0, result.output
    header = (tmp_path / "o.csv").read_text().splitlines()[0].split(",")
    assert "content:features.22" in header
    assert [h for h in header if h.startswith("style:")] == [f"style:features.{i}" for i in (1, 6, 11, 20, 29)]
    assert np.asarray(Image.open(tmp_path / "o.png")).shape == (24, 32, 3)
