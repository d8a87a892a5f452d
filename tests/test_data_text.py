"""Character corpora: vocabulary, encoding, contiguous splits and stateful batches."""
import numpy as np
import pytest

from rabbitkit.data.datasets.text import load_text
from rabbitkit.errors import DataError

CORPUS = "To be, or not to be: that is the question.\n" * 7 + "Ünïcode ok.\n"


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("RABBIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("RABBIT_DATA", raising=False)


@pytest.fixture
def corpus(tmp_path):
    file = tmp_path / "corpus.txt"
    file.write_text(CORPUS, encoding="utf-8")
    return file


def test_vocab_encode_decode_and_splits(corpus):
    ds = load_text(path=str(corpus))
    assert ds.task == "language_model" and ds.vocab == sorted(set(CORPUS))
    assert ds.num_classes == len(ds.vocab) and ds.input_shape == (len(ds.vocab),)
    ids = ds.encode(CORPUS)
    assert ids.dtype == np.int64 and ds.decode(ids) == CORPUS
    pieces = [ds.splits[name].x for name in ("train", "val", "test")]
    np.testing.assert_array_equal(np.concatenate(pieces), ids)  # contiguous, in order
    n = len(CORPUS)
    assert len(pieces[0]) == round(0.9 * n) and abs(len(pieces[1]) - 0.05 * n) <= 1
    with pytest.raises(DataError, match="'#' .* not in the corpus vocabulary"):
        ds.encode("ab#")


def test_stream_batches_continue_each_row(corpus):
    ds = load_text(path=str(corpus), split=[0.8, 0.2, 0.0])
    assert "test" not in ds.splits
    data = ds.splits["train"].x
    batches = list(ds.stream_batches("train", batch_size=3, seq_len=5))
    assert len(batches) == ds.batch_count("train", 3, 5) == (len(data) - 1) // 15
    rows = len(batches) * 5
    for k, (x, y) in enumerate(batches):
        assert x.shape == y.shape == (3, 5) and x.dtype == y.dtype == np.int64
        for i in range(3):
            start = i * rows + k * 5  # row i continues where it stopped in batch k - 1
            np.testing.assert_array_equal(x[i], data[start:start + 5])
            np.testing.assert_array_equal(y[i], data[start + 1:start + 6])
    shifted = next(ds.stream_batches("train", 3, 5, offset=2))[0]
    np.testing.assert_array_equal(shifted[0], data[2:7])
    with pytest.raises(DataError, match="too short"):
        next(ds.stream_batches("val", 50, 50))


def test_bad_inputs(tmp_path, corpus, monkeypatch):
    with pytest.raises(DataError, match="three fractions"):
        load_text(path=str(corpus), split=[0.5, 0.2])
    (tmp_path / "second.txt").write_text("x")
    with pytest.raises(DataError, match="exactly one .txt"):
        load_text(path=str(tmp_path))
    latin = tmp_path / "latin1.bin"
    latin.write_bytes("café".encode("latin-1"))
    with pytest.raises(DataError, match="not valid utf-8"):
        load_text(path=str(latin))
    assert load_text(path=str(latin), encoding="latin-1").decode(load_text(path=str(latin), encoding="latin-1").splits["train"].x)
    monkeypatch.setenv("RABBIT_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match=r"dataset 'text' not found \(looked in .*nowhere/text"):
        load_text()


def test_rabbit_data_folder(tmp_path, monkeypatch):
    (tmp_path / "data" / "text").mkdir(parents=True)
    (tmp_path / "data" / "text" / "input.txt").write_text(CORPUS)
    monkeypatch.setenv("RABBIT_DATA", str(tmp_path / "data"))
    assert load_text().decode(load_text().splits["train"].x[:5]) == CORPUS[:5]


def test_tiny_shakespeare(shared_data):
    ds = load_text(path=str(shared_data / "text" / "tinyshakespeare.txt"))
    assert len(ds.vocab) == 65 and ds.vocab[0] == "\n"
    assert sum(len(s) for s in ds.splits.values()) == 1115394
    assert ds.decode(ds.splits["train"].x[:14]) == "First Citizen:"
    assert "65 characters" in ds.summary()
