"""char-rnn through the CLI: train on a small corpus, report bits per character, sample."""
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMALL = ["--set", "model.hidden_size=24", "--set", "model.num_layers=1", "--set", "train.seq_len=12",
         "--set", "train.batch_size=4", "--set", "train.epochs=6", "--set", "train.lr=0.02"]


def rabbit(*args, cwd):
    return subprocess.run([sys.executable, "-m", "rabbitkit.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("charrnn")
    corpus = folder / "corpus.txt"
    corpus.write_text("the cat sat on the mat. " * 120)
    done = rabbit("run", ROOT / "experiments" / "char_rnn.toml", "--out", folder / "runs",
                  "--set", f"data.path=\"{corpus}\"", *SMALL, cwd=folder)
    assert done.returncode == 0, done.stderr
    (run_dir,) = (folder / "runs").iterdir()
    return run_dir, done.stdout


def test_reports_loss_in_nats_and_bits_and_learns(trained):
    run_dir, stdout = trained
    rows = (run_dir / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert "val_loss" in header and "val_bpc" in header
    values = [dict(zip(header, r.split(","))) for r in rows[1:]]
    first, last = float(values[0]["val_loss"]), float(values[-1]["val_loss"])
    assert last < 0.5 * first
    assert float(values[-1]["val_bpc"]) == pytest.approx(float(values[-1]["val_loss"]) / 0.6931471805599453, rel=1e-4)
    assert "val_bpc" in stdout


def test_sample_greedy_is_deterministic_and_continues_the_prime(trained):
    run_dir, _ = trained
    first = rabbit("sample", run_dir, "--length", "40", "--temperature", "0", "--prime", "the ", cwd=run_dir)
    second = rabbit("sample", run_dir, "--length", "40", "--temperature", "0", "--prime", "the ", cwd=run_dir)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout
    text = first.stdout.rstrip("\n")
    assert text.startswith("the ") and len(text) == 44
    assert "cat" in text or "mat" in text or "sat" in text


def test_sample_with_seed_and_prime_file(trained, tmp_path):
    run_dir, _ = trained
    prime = tmp_path / "prime.txt"
    prime.write_text("on the ")
    a = rabbit("sample", run_dir, "--length", "30", "--temperature", "0.8", "--prime-file", prime, "--seed", "5", cwd=tmp_path)
    b = rabbit("sample", run_dir, "--length", "30", "--temperature", "0.8", "--prime-file", prime, "--seed", "5", cwd=tmp_path)
    assert a.returncode == 0 and a.stdout == b.stdout and a.stdout.startswith("on the ")


def test_prime_outside_the_vocabulary_is_one_clear_error(trained):
    run_dir, _ = trained
    done = rabbit("sample", run_dir, "--prime", "XYZ", cwd=run_dir)
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
    assert "'X'" in done.stderr and "'Y'" in done.stderr
