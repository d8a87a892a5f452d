"""The rabbit command: listing, running, and one-line errors with non-zero exit codes."""
import subprocess
import sys

import pytest
from click.testing import CliRunner

from rabbitkit import __version__
from rabbitkit.cli import main

SINE = """
[experiment]
name = "cli"
[data]
dataset = "function1d"
n_train = 64
n_val = 32
n_test = 32
[model]
architecture = "mlp"
hidden = [8]
[train]
epochs = 2
batch_size = 16
optimizer = "adam"
"""


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_version():
    from rabbitkit.backend import tuning

    result = invoke("--version")
    assert result.exit_code == 0
    first, machine = result.output.strip().splitlines()
    assert first == f"rabbit, version {__version__}"
    assert machine.startswith(f"CPU: {tuning.cpu_model()}; kernel BLAS: {tuning.blas_description()}; numba ")


def test_plugins_lists_every_kind_with_providers():
    result = invoke("plugins")
    assert result.exit_code == 0
    for kind in ("layers:", "architectures:", "initializers:", "regularizers:", "optimizers:", "datasets:",
                 "visualizers:"):
        assert kind in result.output
    assert any(line.split() == ["Dense", "rabbitkit.layers.dense"] for line in result.output.splitlines())
    assert any(line.split() == ["mlp", "rabbitkit.models.mlp"] for line in result.output.splitlines())


def test_run_writes_a_complete_run_directory(tmp_path):
    experiment = tmp_path / "sine.toml"
    experiment.write_text(SINE)
    result = invoke("run", experiment, "--out", tmp_path / "runs", "--seed", "3", "--set", "train.lr=0.02")
    assert result.exit_code == 0, result.output
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name.startswith("cli-")
    for name in ("config.toml", "metrics.csv", "log.txt", "final_metrics.json", "curves.png", "filters.png"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "checkpoints" / "last.safetensors").is_file()
    assert "seed = 3" in (run_dir / "config.toml").read_text()
    assert "lr = 0.02" in (run_dir / "config.toml").read_text()
    rows = (run_dir / "metrics.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[0].startswith("epoch,lr,train_loss")
    again = invoke("run", experiment, "--out", tmp_path / "runs")
    assert again.exit_code == 0
    assert len(list((tmp_path / "runs").iterdir())) == 2  # runs never overwrite each other


def test_dry_run_prints_config_and_summary(tmp_path):
    experiment = tmp_path / "sine.toml"
    experiment.write_text(SINE)
    result = invoke("run", experiment, "--dry-run", "--set", "model.hidden=[5]")
    assert result.exit_code == 0, result.output
    assert "[train]" in result.output and "hidden = [5]" in result.output
    assert "total parameters 16" in result.output and "FLOPs" in result.output
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("args,expected", [
    (["run", "{missing}"], "experiment file not found"),
    (["run", "{exp}", "--set", "train.lrr=1"], "unknown key 'train.lrr' (did you mean 'train.lr'?)"),
    (["run", "{exp}", "--set", "train.epochs=\"x\""], "train.epochs: expected an integer >= 1, got 'x'"),
    (["run", "{exp}", "--set", "model.architecture=\"mpl\""], "unknown architecture 'mpl' (did you mean 'mlp'?)"),
    (["run", "{exp}", "--set", "nonsense"], "expected key.path=value"),
    (["resume", "{tmp}"], "not a run directory"),
    (["-p", "no_such_module_xyz", "plugins"], "cannot import plugin module 'no_such_module_xyz'"),
])
def test_user_errors_are_one_line_without_traceback(tmp_path, args, expected):
    experiment = tmp_path / "sine.toml"
    experiment.write_text(SINE)
    args = [a.format(missing=tmp_path / "missing.toml", exp=experiment, tmp=tmp_path) for a in args]
    done = subprocess.run([sys.executable, "-m", "rabbitkit.cli", *args], capture_output=True, text=True,
                          cwd=tmp_path)
    assert done.returncode == 2
    assert expected in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "Traceback" not in done.stderr
