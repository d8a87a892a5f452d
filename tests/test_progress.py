"""rabbitkit.progress: bars on a terminal only, and the trainer's epoch bar going through it."""
import io

import pytest

import rabbitkit
from rabbitkit.progress import bar


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_bar_on_a_terminal_shows_its_label_count_and_postfix():
    stream = Terminal()
    with bar(4, "decoding", stream=stream, mininterval=0) as progress:
        for _ in range(4):
            progress.update(1, loss=0.123456)
    text = stream.getvalue()
    assert "decoding" in text and "4/4" in text and "loss=0.1235" in text
    assert progress.n == 4


@pytest.mark.parametrize("stream,enabled", [(io.StringIO(), None), (io.StringIO(), True), (Terminal(), False)])
def test_silent_off_a_terminal_or_when_disabled(stream, enabled):
    with bar(3, "quiet", enabled, stream=stream) as progress:
        progress.update(3, loss=1.0)
    assert stream.getvalue() == "" and progress.n == 3


def test_rabbit_progress_0_silences_every_bar(monkeypatch):
    monkeypatch.setenv("RABBIT_PROGRESS", "0")
    stream = Terminal()
    with bar(2, "x", stream=stream) as progress:
        progress.update(2)
    assert stream.getvalue() == ""


def test_training_shows_the_epoch_bar_on_a_terminal_only(tmp_path, monkeypatch):
    experiment = {"data": {"dataset": "function1d", "n_train": 32, "n_val": 8, "n_test": 8},
                  "model": {"architecture": "mlp", "hidden": [4]}, "train": {"epochs": 1, "batch_size": 8},
                  "output": {"visualizers": []}}
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    monkeypatch.setattr("rabbitkit.progress.MININTERVAL", 0)  # draw every step, not 5 a second
    rabbitkit.run(experiment, out=tmp_path, quiet=True)
    shown = terminal.getvalue()
    assert "epoch 1/1" in shown and "4/4" in shown and "loss=" in shown and "samples/s=" in shown
    assert "evaluating val" in shown
    piped = io.StringIO()
    monkeypatch.setattr("sys.stderr", piped)
    rabbitkit.run(experiment, out=tmp_path, quiet=True)
    assert piped.getvalue() == ""
