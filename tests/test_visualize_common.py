import numpy as np
import pytest

from rabbitkit.errors import DataError
from rabbitkit.visualize import common


def _png(tmp_path, name="img.png", shape=(6, 9, 3), seed=0):
    image = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    return common.write_png(tmp_path / name, image), image


def test_png_round_trip(tmp_path):
    path, image = _png(tmp_path)
    np.testing.assert_array_equal(common.load_image(path), image)
    assert [p.name for p in tmp_path.iterdir()] == ["img.png"]  # no temporary left behind


def test_load_image_resizes_shorter_side_and_exact_size(tmp_path):
    path, _ = _png(tmp_path, shape=(10, 20, 3))
    assert common.load_image(path, size=5).shape == (5, 10, 3)
    assert common.load_image(path, size=(7, 3)).shape == (3, 7, 3)
    assert common.load_image(path, grayscale=True).shape == (10, 20)


@pytest.mark.parametrize("make", ["missing", "directory", "corrupt", "truncated"])
def test_bad_images_raise_one_line_naming_the_file(tmp_path, make):
    path = tmp_path / "bad.png"
    if make == "directory":
        path.mkdir()
    elif make == "corrupt":
        path.write_bytes(b"not an image at all")
    elif make == "truncated":
        good, _ = _png(tmp_path, "good.png", shape=(64, 64, 3))
        path.write_bytes(good.read_bytes()[:200])
    with pytest.raises(DataError) as info:
        common.load_image(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message


def test_write_png_rejects_float_and_leaves_nothing(tmp_path):
    with pytest.raises(ValueError):
        common.write_png(tmp_path / "x.png", np.zeros((4, 4, 3), np.float32))
    assert list(tmp_path.iterdir()) == []


def test_write_png_into_missing_folder_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        common.write_png(tmp_path / "nope" / "x.png", np.zeros((4, 4, 3), np.uint8))


def test_png_bytes_are_deterministic():
    image = np.random.default_rng(1).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    assert common.png_bytes(image) == common.png_bytes(image.copy())


def test_step_log_csv_and_save_beside_png(tmp_path):
    log = common.StepLog()
    log.record(objective=1.5)
    log.record({"octave": 2}, objective=2.25, tv=0.125)
    assert log.columns == ["step", "objective", "octave", "tv"]
    assert log.column("objective") == [1.5, 2.25]
    png, csv_path = common.save_image_and_log(tmp_path / "out.png", np.zeros((2, 2, 3), np.uint8), log)
    assert csv_path == tmp_path / "out.csv"
    lines = csv_path.read_text().splitlines()
    assert lines == ["step,objective,octave,tv", "1,1.5,,", "2,2.25,2,0.125"]
    assert png.is_file()


def test_save_image_and_log_writes_nothing_when_the_image_is_bad(tmp_path):
    with pytest.raises(ValueError):
        common.save_image_and_log(tmp_path / "out.png", np.zeros((2, 2, 3)), common.StepLog())
    assert list(tmp_path.iterdir()) == []


def test_make_rng_same_seed_same_draws():
    assert np.array_equal(common.make_rng(3).normal(size=5), common.make_rng(3).normal(size=5))
    assert not np.array_equal(common.make_rng(3).normal(size=5), common.make_rng(4).normal(size=5))
    generator = np.random.default_rng(0)
    assert common.make_rng(generator) is generator


def test_image_adam_matches_the_adam_rule():
    x = np.array([1.0, -2.0, 0.5], np.float64)
    adam = common.ImageAdam(x, lr=0.1)
    grads = [np.array([0.3, -1.0, 2.0]), np.array([0.1, 0.5, -0.2])]
    ref, m, v = np.array([1.0, -2.0, 0.5]), np.zeros(3), np.zeros(3)
    for t, g in enumerate(grads, start=1):
        adam.step(g)
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        ref -= 0.1 / (1 - 0.9**t) * m / (np.sqrt(v) / np.sqrt(1 - 0.999**t) + 1e-8)
    np.testing.assert_allclose(x, ref, rtol=1e-12)
    assert adam.steps == 2


def test_image_adam_maximise_goes_uphill():
    x = np.zeros(4, np.float32)
    common.ImageAdam(x, lr=0.5).step(np.ones(4, np.float32), maximise=True)
    np.testing.assert_allclose(x, 0.5, rtol=1e-5)


def test_objective_bar_is_silent_off_a_terminal(capsys):
    with common.objective_bar(3, "dream") as progress:
        progress.update(1, objective=0.5)
    assert capsys.readouterr().err == ""
