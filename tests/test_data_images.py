"""CIFAR-10 binary batches (written here in exactly that format) and class-folder trees,
including the 200 real CIFAR-10 PNGs."""
import io
import tarfile
import zipfile

import numpy as np
import pytest
from PIL import Image

from rabbitkit.data.datasets.cifar10 import load_cifar10
from rabbitkit.data.datasets.image_folder import load_image_folder
from rabbitkit.errors import DataError


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("RABBIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("RABBIT_OFFLINE", "1")
    monkeypatch.delenv("RABBIT_DATA", raising=False)


def cifar_batch(rng, n):
    """n records of 1 label byte + 3072 pixel bytes (R plane, G plane, B plane, row-major)."""
    labels = rng.integers(0, 10, n).astype(np.uint8)
    pixels = rng.integers(0, 256, (n, 3072)).astype(np.uint8)
    return np.concatenate([labels[:, None], pixels], axis=1).tobytes(), labels, pixels


@pytest.fixture
def cifar(tmp_path, rng):
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    expected = {"train_y": [], "train_pixels": []}
    for b in range(1, 4):
        data, labels, pixels = cifar_batch(rng, 12)
        (folder / f"data_batch_{b}.bin").write_bytes(data)
        expected["train_y"].append(labels)
        expected["train_pixels"].append(pixels)
    data, labels, pixels = cifar_batch(rng, 10)
    (folder / "test_batch.bin").write_bytes(data)
    expected["test_y"], expected["test_pixels"] = labels, pixels
    names = ["plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (folder / "batches.meta.txt").write_text("\n".join(names) + "\n\n")
    archive = tmp_path / "cifar-10-binary.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-bin")
    return folder, archive, expected, names


def test_cifar_binary_folder_and_archive(cifar):
    folder, archive, expected, names = cifar
    train_y = np.concatenate(expected["train_y"])
    train_pixels = np.concatenate(expected["train_pixels"])
    for path in (folder, folder.parent, archive):
        ds = load_cifar10(path=str(path), val_fraction=0.25)
        assert ds.input_shape == (3, 32, 32) and ds.class_names == names
        train, val, test = ds.splits["train"], ds.splits["val"], ds.splits["test"]
        assert len(train) + len(val) == 36 and len(val) == 9
        np.testing.assert_array_equal(test.y, expected["test_y"])
        # record byte 1 + c*1024 + i*32 + j is channel c, row i, column j
        np.testing.assert_array_equal(test.x.reshape(10, 3072), expected["test_pixels"])
        assert test.x[0, 1, 2, 3] == expected["test_pixels"][0, 1024 + 2 * 32 + 3]
        pool = np.concatenate([train.x, val.x]).reshape(36, 3072)
        pool_y = np.concatenate([train.y, val.y])
        order = np.lexsort(pool.T[::-1])
        reference = np.lexsort(train_pixels.T[::-1])
        np.testing.assert_array_equal(pool[order], train_pixels[reference])
        np.testing.assert_array_equal(pool_y[order], train_y[reference])


def test_cifar_bad_inputs(cifar, tmp_path):
    folder, _, _, _ = cifar
    (folder / "data_batch_2.bin").write_bytes((folder / "data_batch_2.bin").read_bytes()[:-100])
    with pytest.raises(DataError, match=r"data_batch_2\.bin: \d+ bytes is not a whole number of 3073-byte records"):
        load_cifar10(path=str(folder))
    data = bytearray((folder / "data_batch_1.bin").read_bytes())
    (folder / "data_batch_2.bin").write_bytes(bytes(data))
    data[3073 * 4] = 12
    (folder / "data_batch_1.bin").write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"data_batch_1\.bin record 4: label 12 out of range; expected 0\.\.9"):
        load_cifar10(path=str(folder))
    pickled = tmp_path / "cifar-10-batches-py"
    pickled.mkdir()
    (pickled / "data_batch_1").write_bytes(b"\x80\x04 pickle")
    with pytest.raises(DataError, match="python \\(pickle\\) version"):
        load_cifar10(path=str(pickled))
    wrong = tmp_path / "wrong.tar.gz"
    with zipfile.ZipFile(wrong, "w") as z:
        z.writestr("a.txt", "x")
    with pytest.raises(DataError, match="not a tar archive; expected cifar-10-binary.tar.gz"):
        load_cifar10(path=str(wrong))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no data_batch_N.bin found"):
        load_cifar10(path=str(empty))


def save_png(path, colour, size=(8, 6)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_image_folder_tree_and_presplit(tmp_path):
    root = tmp_path / "plankton"
    for k in range(6):
        save_png(root / "copepod" / f"{k}.png", (10, 20, 30))
        save_png(root / "diatom" / f"{k}.jpg", (200, 100, 50))
    (root / "notes.csv").write_text("not an image")
    ds = load_image_folder(path=str(root), val_fraction=1 / 3, image_size=4)
    assert ds.class_names == ["copepod", "diatom"] and ds.input_shape == (3, 4, 4)
    assert len(ds.splits["train"]) == 8 and len(ds.splits["val"]) == 4
    colours = {0: (10, 20, 30), 1: (200, 100, 50)}
    for split in ds.splits.values():
        for img, label in zip(split.x, split.y):
            assert np.abs(img[:, 0, 0].astype(int) - colours[int(label)]).max() <= 3  # JPEG is lossy
    pre = tmp_path / "presplit"
    for split, n in (("train", 3), ("val", 2), ("test", 1)):
        for cls in ("a", "b"):
            for k in range(n):
                save_png(pre / split / cls / f"{k}.png", (k, 0, 0))
    ds = load_image_folder(path=str(pre))
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 6, "val": 4, "test": 2}
    assert ds.input_shape == (3, 6, 8)


def test_image_folder_bad_inputs(tmp_path):
    empty = tmp_path / "empty"
    (empty / "cls").mkdir(parents=True)
    with pytest.raises(DataError, match="no images in class folders"):
        load_image_folder(path=str(empty))
    root = tmp_path / "tree"
    save_png(root / "a" / "1.png", (1, 2, 3))
    save_png(root / "b" / "2.png", (1, 2, 3), size=(9, 9))
    with pytest.raises(DataError, match=r"b/2\.png: image is 9x9 but the first one is 8x6; set the image_size option"):
        load_image_folder(path=str(root))
    buffer = io.BytesIO()
    Image.new("RGB", (8, 6)).save(buffer, format="PNG")
    (root / "b" / "2.png").write_bytes(buffer.getvalue()[:30])
    with pytest.raises(DataError, match=r"b/2\.png: cannot decode image"):
        load_image_folder(path=str(root))
    assert not list((tmp_path / "cache").rglob("*.npz")) and not list((tmp_path / "cache").rglob("*.tmp"))


def test_real_cifar_pngs(shared_data):
    archive = shared_data / "cifar10" / "small_cifar10_first200.zip"
    ds = load_image_folder(path=f"{archive}/image_data_format_2", val_fraction=0.0)
    train = ds.splits["train"]
    assert len(train) == 200 and ds.input_shape == (3, 32, 32)
    counts = dict(zip(ds.class_names, np.bincount(train.y).tolist()))
    assert counts == {"airplane": 14, "automobile": 28, "bird": 22, "cat": 21, "deer": 19, "dog": 19, "frog": 18,
                      "horse": 21, "ship": 15, "truck": 23}
    same = load_image_folder(path=str(archive), subdir="image_data_format_2", val_fraction=0.0)
    np.testing.assert_array_equal(same.splits["train"].x, train.x)


class PNGs:
    """A minimal image source: member name -> PNG bytes."""

    label = "memory"

    def __init__(self, images):
        self.files = {}
        for name, array in images.items():
            buffer = io.BytesIO()
            Image.fromarray(array).save(buffer, format="PNG")
            self.files[name] = buffer.getvalue()

    def read(self, name):
        return self.files[name]

    def member_label(self, name):
        return f"memory:{name}"


def test_decoding_runs_on_a_thread_pool_and_shows_progress_on_a_terminal(monkeypatch):
    import threading

    from rabbitkit.data import images

    rng = np.random.default_rng(0)
    arrays = {f"{i}.png": rng.integers(0, 256, (9, 7, 3), dtype=np.uint8) for i in range(300)}
    source = PNGs(arrays)
    items = [(source, name) for name in arrays]
    threads = set()
    original = images.decode_resized
    # The first call of each of two pool threads waits for the other: a pool decodes
    # on at least two threads at once, however loaded the machine (a serial decoder
    # breaks the barrier after its timeout and fails the assertion below).  The
    # first image is decoded by the calling thread, which does not wait.
    meeting = threading.Barrier(2, timeout=10)
    lock = threading.Lock()
    caller = threading.get_ident()

    def recording(*args, **kwargs):
        with lock:
            first = threading.get_ident() not in threads
            threads.add(threading.get_ident())
            waits = first and threading.get_ident() != caller and len(threads - {caller}) <= 2
        if waits:
            try:
                meeting.wait()
            except threading.BrokenBarrierError:
                pass
        return original(*args, **kwargs)

    monkeypatch.setattr(images, "decode_resized", recording)

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    monkeypatch.setattr("rabbitkit.progress.MININTERVAL", 0)
    pooled = images.load_images(items, workers=4)
    assert len(threads - {threading.get_ident()}) >= 2  # decoded by several pool threads
    assert "decoding images" in terminal.getvalue() and "300/300" in terminal.getvalue()
    serial = images.load_images(items, workers=1, progress=False)
    expected = np.stack([a.transpose(2, 0, 1) for a in arrays.values()])
    np.testing.assert_array_equal(pooled, expected)
    np.testing.assert_array_equal(serial, expected)
