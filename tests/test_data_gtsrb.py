"""GTSRB reader: the official PPM layout (written here in exactly that format), the
Kaggle layout, the real shared subset, the track-wise validation split, the cache
and every bad-input case."""
import os
import zipfile

import numpy as np
import pytest
from PIL import Image

from rabbitkit.data import images as images_module
from rabbitkit.data.datasets.gtsrb import HFLIP_CLASS_MAP, load_gtsrb
from rabbitkit.errors import DataError

CLASSES = (0, 7, 42)
TRACKS = 3
PER_TRACK = 4
BORDER = (200, 0, 0)


def class_colour(c):
    return (c * 5 % 256, 100 + c, 255 - c * 3)


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("RABBIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("RABBIT_OFFLINE", "1")
    monkeypatch.delenv("RABBIT_DATA", raising=False)


def sign(width, height, roi, colour):
    """A red frame with the ROI (inclusive corners) filled with ``colour``."""
    img = Image.new("RGB", (width, height), BORDER)
    x1, y1, x2, y2 = roi
    img.paste(Image.new("RGB", (x2 - x1 + 1, y2 - y1 + 1), colour), (x1, y1))
    return img


def write_official(root):
    """GTSRB/Final_Training/Images/000CC/TTTTT_IIIII.ppm + GT-000CC.csv and the test set."""
    expected = {"train": [], "test": []}
    rng = np.random.default_rng(0)
    for c in CLASSES:
        folder = root / "GTSRB" / "Final_Training" / "Images" / f"{c:05d}"
        folder.mkdir(parents=True)
        lines = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
        for t in range(TRACKS):
            for i in range(PER_TRACK):
                w, h = int(rng.integers(20, 40)), int(rng.integers(20, 40))
                roi = (5, 5, w - 6, h - 6)
                name = f"{t:05d}_{i:05d}.ppm"
                sign(w, h, roi, class_colour(c)).save(folder / name, format="PPM")
                lines.append(f"{name};{w};{h};{roi[0]};{roi[1]};{roi[2]};{roi[3]};{c}")
                expected["train"].append((c, c * 100_000 + t))
        (folder / f"GT-{c:05d}.csv").write_text("\n".join(lines) + "\n")
    test_dir = root / "GTSRB" / "Final_Test" / "Images"
    test_dir.mkdir(parents=True)
    lines = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
    for k, c in enumerate([42, 0, 7, 7, 0]):
        name = f"{k:05d}.ppm"
        sign(30, 31, (5, 5, 24, 25), class_colour(c)).save(test_dir / name, format="PPM")
        lines.append(f"{name};30;31;5;5;24;25;{c}")
        expected["test"].append(c)
    (root / "GT-final_test.csv").write_text("\n".join(lines) + "\n")
    return expected


def zip_tree(folder, file, members):
    with zipfile.ZipFile(file, "w") as z:
        for path in members:
            z.write(path, path.relative_to(folder).as_posix())


@pytest.fixture
def official(tmp_path):
    root = tmp_path / "extracted"
    expected = write_official(root)
    return root, expected


def official_zips(root, dest):
    """The three official archives, built from an extracted tree."""
    dest.mkdir(parents=True)
    files = sorted(p for p in root.rglob("*") if p.is_file())
    zip_tree(root, dest / "GTSRB_Final_Training_Images.zip", [p for p in files if "Final_Training" in p.parts])
    zip_tree(root, dest / "GTSRB_Final_Test_Images.zip", [p for p in files if "Final_Test" in p.parts])
    zip_tree(root, dest / "GTSRB_Final_Test_GT.zip", [root / "GT-final_test.csv"])
    return dest


def assert_colours_match_labels(split):
    """Every image is its class colour (ROI cropped), so images and labels line up."""
    for img, label in zip(split.x, split.y):
        expected = np.array(class_colour(int(label)), np.uint8)[:, None, None]
        assert np.abs(img.astype(int) - expected).max() <= 1


def test_official_extracted_folder(official):
    root, expected = official
    ds = load_gtsrb(path=str(root), image_size=16, val_fraction=0.34, seed=3)
    assert ds.name == "gtsrb" and ds.task == "classification"
    assert ds.input_shape == (3, 16, 16) and ds.num_classes == 43 and len(ds.class_names) == 43
    train, val, test = ds.splits["train"], ds.splits["val"], ds.splits["test"]
    assert train.x.dtype == np.uint8 and train.y.dtype == np.int64
    assert len(train) + len(val) == len(expected["train"])
    assert sorted(zip(np.concatenate([train.y, val.y]), np.concatenate([train.groups, val.groups]))) == sorted(expected["train"])
    np.testing.assert_array_equal(test.y, expected["test"])
    for split in (train, val, test):
        assert_colours_match_labels(split)
    # whole tracks: no track on both sides, and a third of the tracks of each class in validation
    assert not set(train.groups) & set(val.groups)
    assert len(set(val.groups)) == 3
    # mirrored classes, for flip_class_map = "dataset": "turn right ahead" <-> "turn left ahead"
    mirror = ds.mirror_classes["hflip"]
    assert ds.class_names[33] == "Turn right ahead" and mirror[33] == 34 and mirror[34] == 33
    assert mirror[13] == 13 and 14 not in mirror  # a yield sign is symmetric, a stop sign's text is not


def test_official_zips_equal_extracted(official, tmp_path):
    root, _ = official
    folder = official_zips(root, tmp_path / "zips")
    from_folder = load_gtsrb(path=str(root), image_size=12, cache=False)
    from_zips = load_gtsrb(path=str(folder), image_size=12, cache=False)
    only_training = load_gtsrb(path=str(folder / "GTSRB_Final_Training_Images.zip"), image_size=12, cache=False)
    for name in ("train", "val", "test"):
        np.testing.assert_array_equal(from_folder.splits[name].x, from_zips.splits[name].x)
        np.testing.assert_array_equal(from_folder.splits[name].y, from_zips.splits[name].y)
    assert "test" not in only_training.splits
    np.testing.assert_array_equal(only_training.splits["train"].x, from_zips.splits["train"].x)


def test_roi_crop_and_grayscale(official):
    root, _ = official
    full = load_gtsrb(path=str(root), image_size=20, roi_crop=False, val_fraction=0.0)
    x = full.splits["train"].x
    # without the crop the red frame is in the corners
    np.testing.assert_array_equal(x[:, :, 0, 0], np.tile(np.array(BORDER, np.uint8), (len(x), 1)))
    gray = load_gtsrb(path=str(root), image_size=20, grayscale=True, val_fraction=0.0)
    assert gray.input_shape == (1, 20, 20)
    r, g, b = np.array([class_colour(int(c)) for c in gray.splits["train"].y]).T
    luma = 0.299 * r + 0.587 * g + 0.114 * b  # ITU-R 601, as Pillow's "L"
    assert np.abs(gray.splits["train"].x[:, 0, 10, 10] - luma).max() <= 1


def test_validation_split_is_seeded(official):
    root, _ = official
    a = load_gtsrb(path=str(root), image_size=8, val_fraction=0.34, seed=1)
    b = load_gtsrb(path=str(root), image_size=8, val_fraction=0.34, seed=1)
    np.testing.assert_array_equal(a.splits["val"].groups, b.splits["val"].groups)
    seen = {tuple(np.unique(load_gtsrb(path=str(root), image_size=8, val_fraction=0.34, seed=s).splits["val"].groups))
            for s in range(8)}
    assert len(seen) > 1


def test_max_per_class_takes_whole_tracks_first(official):
    root, _ = official
    ds = load_gtsrb(path=str(root), image_size=8, val_fraction=0.0, max_per_class=6)
    train = ds.splits["train"]
    assert np.bincount(train.y, minlength=43)[list(CLASSES)].tolist() == [6, 6, 6]
    for c in CLASSES:  # one whole track of 4 plus 2 of another
        counts = sorted(np.unique(train.groups[train.y == c], return_counts=True)[1])
        assert counts == [2, 4]
    assert np.bincount(ds.splits["test"].y, minlength=43)[0] == 2


def test_second_load_comes_from_the_cache(official, monkeypatch, tmp_path):
    root, _ = official
    first = load_gtsrb(path=str(root), image_size=16)
    entries = list((tmp_path / "cache" / "arrays").glob("gtsrb-*.npz"))
    assert len(entries) == 1

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again instead of using the cache")

    monkeypatch.setattr(images_module, "decode_resized", no_decoding)
    second = load_gtsrb(path=str(root), image_size=16)
    np.testing.assert_array_equal(first.splits["train"].x, second.splits["train"].x)
    np.testing.assert_array_equal(first.splits["val"].groups, second.splits["val"].groups)
    # other options or a changed source file: a new entry, decoded again
    with pytest.raises(AssertionError, match="decoded again"):
        load_gtsrb(path=str(root), image_size=17)
    some_file = next(root.rglob("*.ppm"))
    os.utime(some_file, ns=(some_file.stat().st_atime_ns, some_file.stat().st_mtime_ns + 10**9))
    with pytest.raises(AssertionError, match="decoded again"):
        load_gtsrb(path=str(root), image_size=16)


def assert_cache_clean(tmp_path):
    folder = tmp_path / "cache" / "arrays"
    assert not folder.exists() or not list(folder.iterdir())


def test_csv_row_naming_a_missing_file(official, tmp_path):
    root, _ = official
    (root / "GTSRB/Final_Training/Images/00007/00001_00002.ppm").unlink()
    with pytest.raises(DataError) as err:
        load_gtsrb(path=str(root))
    message = str(err.value)
    assert "GT-00007.csv row 8" in message and "00001_00002.ppm" in message and "not found" in message
    assert "\n" not in message
    assert_cache_clean(tmp_path)


def test_class_id_out_of_range(official, tmp_path):
    root, _ = official
    csv = root / "GTSRB/Final_Training/Images/00042/GT-00042.csv"
    lines = csv.read_text().splitlines()
    lines[3] = lines[3].rsplit(";", 1)[0] + ";43"
    csv.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"GT-00042\.csv row 4: ClassId 43 out of range; expected 0\.\.42"):
        load_gtsrb(path=str(root))
    assert_cache_clean(tmp_path)


def test_truncated_image_in_a_zip(official, tmp_path):
    root, _ = official
    victim = root / "GTSRB/Final_Training/Images/00000/00002_00001.ppm"
    victim.write_bytes(victim.read_bytes()[:-40])
    folder = official_zips(root, tmp_path / "zips")
    with pytest.raises(DataError) as err:
        load_gtsrb(path=str(folder / "GTSRB_Final_Training_Images.zip"))
    message = str(err.value)
    assert "GTSRB_Final_Training_Images.zip:GTSRB/Final_Training/Images/00000/00002_00001.ppm" in message
    assert "GT-00000.csv row 11" in message and "cannot decode image" in message and "\n" not in message
    assert_cache_clean(tmp_path)


def test_wrong_archive_and_missing_dataset(tmp_path, monkeypatch):
    other = tmp_path / "other.zip"
    with zipfile.ZipFile(other, "w") as z:
        z.writestr("readme.txt", "hello")
    with pytest.raises(DataError, match="no GTSRB training data found"):
        load_gtsrb(path=str(other))
    not_zip = tmp_path / "file.zip"
    not_zip.write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a readable zip archive"):
        load_gtsrb(path=str(not_zip))
    with pytest.raises(DataError, match="does not exist"):
        load_gtsrb(path=str(tmp_path / "typo"))
    monkeypatch.setenv("RABBIT_DATA", str(tmp_path / "data"))
    with pytest.raises(DataError) as err:
        load_gtsrb()
    message = str(err.value)
    for hint in ("data.path", str(tmp_path / "data" / "gtsrb"), "GTSRB_Final_Training_Images.zip"):
        assert hint in message
    assert len(message.splitlines()) == 2 and len(message) < 500


def test_rabbit_data_folder_is_used(official, tmp_path, monkeypatch):
    root, _ = official
    data = tmp_path / "data"
    official_zips(root, data / "gtsrb")
    monkeypatch.setenv("RABBIT_DATA", str(data))
    ds = load_gtsrb(image_size=8)
    assert len(ds.splits["test"]) == 5


def write_kaggle(root):
    """Train.csv / Test.csv (comma-separated, Path column) with PNGs, as in the Kaggle download."""
    header = "Width,Height,Roi.X1,Roi.Y1,Roi.X2,Roi.Y2,ClassId,Path"
    train, test = [header], [header]
    for c in (3, 38):
        (root / "Train" / str(c)).mkdir(parents=True)
        for t in (0, 5):
            for i in range(3):
                rel = f"Train/{c}/{c:05d}_{t:05d}_{i:05d}.png"
                sign(26, 28, (5, 5, 20, 22), class_colour(c)).save(root / rel)
                train.append(f"26,28,5,5,20,22,{c},{rel}")
    (root / "Test").mkdir()
    for k, c in enumerate((38, 3)):
        rel = f"Test/{k:05d}.png"
        sign(26, 28, (5, 5, 20, 22), class_colour(c)).save(root / rel)
        test.append(f"26,28,5,5,20,22,{c},{rel}")
    (root / "Train.csv").write_text("\n".join(train) + "\n")
    (root / "Test.csv").write_text("\n".join(test) + "\n")


def test_kaggle_layout_folder_and_zip(tmp_path):
    root = tmp_path / "kaggle"
    write_kaggle(root)
    archive = tmp_path / "kaggle.zip"
    zip_tree(root, archive, sorted(p for p in root.rglob("*") if p.is_file()))
    for path in (root, archive):
        ds = load_gtsrb(path=str(path), image_size=10, val_fraction=0.5, cache=False)
        train, val, test = ds.splits["train"], ds.splits["val"], ds.splits["test"]
        assert len(train) == len(val) == 6 and len(test) == 2
        assert set(np.unique(train.groups)) | set(np.unique(val.groups)) == {300000, 300005, 3800000, 3800005}
        assert not set(train.groups) & set(val.groups)
        for split in (train, val, test):
            assert_colours_match_labels(split)


def test_a_missing_test_split_is_said_before_training(tmp_path):
    import rabbitkit

    root = tmp_path / "kaggle"
    write_kaggle(root)
    (root / "Test.csv").unlink()
    for _ in range(2):  # the decoding run and the cached load alike
        ds = load_gtsrb(path=str(root), image_size=8, val_fraction=0.5)
        assert "test" not in ds.splits
        assert ds.info["test_missing"].startswith(f"looked in {root} for Test.csv beside Train.csv")
    experiment = {"data": {"dataset": "gtsrb", "path": str(root), "image_size": 8, "val_fraction": 0.5},
                  "model": {"architecture": "mlp", "hidden": [4]}, "train": {"epochs": 1, "batch_size": 4},
                  "output": {"visualizers": []}}
    result = rabbitkit.run(experiment, out=tmp_path / "runs", quiet=True)
    log = (result.run_dir / "log.txt").read_text().splitlines()
    warning = next(i for i, line in enumerate(log) if "warning: no test split (looked in" in line)
    first_epoch = next(i for i, line in enumerate(log) if "epoch   1" in line)
    assert warning < first_epoch and "the run will end without test metrics" in log[warning]
    assert not any(k.startswith("test_") for k in result.metrics)
    with_test = tmp_path / "with_test"
    write_kaggle(with_test)
    assert "test_missing" not in load_gtsrb(path=str(with_test), image_size=8).info


def test_flip_map_is_an_involution():
    for c, d in HFLIP_CLASS_MAP.items():
        assert HFLIP_CLASS_MAP[d] == c


_REAL = {}


@pytest.fixture
def real_subset(shared_data, tmp_path_factory):
    """The shared subset, decoded once for this module (the first, uncached load)."""
    if not _REAL:
        cache_dir = tmp_path_factory.mktemp("cache")
        path = shared_data / "gtsrb" / "GTSRB_Kaggle_layout_subset.zip"
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("RABBIT_CACHE", str(cache_dir))
            _REAL["value"] = (path, cache_dir, load_gtsrb(path=str(path), image_size=32, seed=0))
    return _REAL["value"]


def test_real_subset_counts(real_subset):
    _, _, ds = real_subset
    train, val, test = ds.splits["train"], ds.splits["val"], ds.splits["test"]
    assert len(train) + len(val) == 4890 and len(test) == 1475
    assert ds.input_shape == (3, 32, 32) and ds.num_classes == 43
    assert len(np.unique(np.concatenate([train.groups, val.groups]))) == 163
    assert not set(train.groups) & set(val.groups)
    assert set(np.unique(train.y)) == set(range(43)) and set(np.unique(test.y)) == set(range(43))
    # 10% of the 163 tracks, stratified by class
    assert len(np.unique(val.groups)) == 16
    assert "1475" in ds.summary()


def test_real_subset_cached_load(real_subset, monkeypatch):
    import time

    path, cache_dir, first = real_subset
    monkeypatch.setenv("RABBIT_CACHE", str(cache_dir))

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again instead of using the cache")

    monkeypatch.setattr(images_module, "decode_resized", no_decoding)
    start = time.perf_counter()
    again = load_gtsrb(path=str(path), image_size=32, seed=0)
    elapsed = time.perf_counter() - start
    assert elapsed < 3, f"cached load took {elapsed:.2f} s"  # well under 1 s on an idle machine
    for name in ("train", "val", "test"):
        np.testing.assert_array_equal(again.splits[name].x, first.splits[name].x)
        np.testing.assert_array_equal(again.splits[name].y, first.splits[name].y)
