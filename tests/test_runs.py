"""rabbit runs / rabbit compare on run directories made here: completed, stopped early,
interrupted (Ctrl-C and killed), diverged, running; status.json; sweep.csv / sweep.png."""
import csv
import io
import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

import rabbitkit
from rabbitkit.cli import main
from rabbitkit.train import status
from rabbitkit.train.runs import find_runs, read_run
from rabbitkit.train.trainer import DivergenceError
from test_trainer import InterruptAtStep

TINY = {
    "experiment": {"name": "tiny", "seed": 1},
    "data": {"dataset": "function1d", "n_train": 32, "n_val": 16, "n_test": 16},
    "model": {"architecture": "mlp", "hidden": [6]},
    "train": {"epochs": 3, "batch_size": 16, "optimizer": "adam", "lr": 0.01},
    "output": {"visualizers": []},
}


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One run directory per state, made by the trainer itself (the 'running' one is re-labelled)."""
    out = tmp_path_factory.mktemp("runs")
    made = {}
    made["completed"] = rabbitkit.run(TINY, {"train.lr": 0.02}, out=out, quiet=True).run_dir
    made["early"] = rabbitkit.run(TINY, {"train.epochs": 30, "train.lr": 1e-9, "train.schedule": "constant",
                                         "train.early_stopping": {"patience": 1, "min_delta": 1.0}},
                                  out=out, quiet=True).run_dir
    manager = rabbitkit.plugins.get_manager()
    plugin = InterruptAtStep(step=3)  # epoch 2 of 3, batch 1
    manager.register(plugin, name="interrupter-runs")
    try:
        made["interrupted"] = rabbitkit.run(TINY, out=out, quiet=True).run_dir
    finally:
        manager.unregister(plugin)
    with pytest.raises(DivergenceError) as err:
        rabbitkit.run(TINY, {"train.lr": 1e9, "train.optimizer": "sgd"}, out=out, quiet=True)
    made["diverged"] = err.value.run_dir
    killed = rabbitkit.run(TINY, {"train.epochs": 2}, out=out, quiet=True).run_dir
    status.write_status(killed, state="running", pid=dead_pid())  # as a SIGKILL leaves it
    (killed / "final_metrics.json").unlink()
    made["killed"] = killed
    running = rabbitkit.run(TINY, {"train.epochs": 1}, out=out, quiet=True).run_dir
    status.write_status(running, state="running", pid=__import__("os").getpid())
    made["running"] = running
    return out, made


def test_status_json_records_every_way_a_run_ends(runs):
    _, made = runs
    expected = {"completed": "completed", "early": "early_stopping", "interrupted": "interrupted",
                "diverged": "diverged", "killed": "interrupted", "running": "running"}
    for key, state in expected.items():
        assert status.read_status(made[key]) == state, key
    record = json.loads((made["completed"] / "status.json").read_text())
    assert record["monitor"] == "val_loss" and record["epochs_done"] == 3 and record["epochs"] == 3
    assert json.loads((made["killed"] / "status.json").read_text())["state"] == "running"  # on disk


def test_runs_lists_each_run_newest_first_with_its_status(runs):
    out, made = runs
    result = invoke("runs", out)
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[0].split() == ["run", "started", "status", "epochs", "best", "test", "wall"]
    by_name = {line.split()[0]: line for line in lines[1:]}
    assert len(by_name) == 6
    words = {key: by_name[path.name] for key, path in made.items()}
    assert "completed" in words["completed"] and " 3/3 " in words["completed"]
    assert "stopped early" in words["early"] and " 2/30 " in words["early"]
    assert "interrupted" in words["interrupted"] and " 1/3 " in words["interrupted"]
    assert "diverged" in words["diverged"] and " 0/3 " in words["diverged"]
    assert "interrupted" in words["killed"] and "running" in words["running"]
    completed = read_run(made["completed"])
    assert f"val_loss {completed.final['best_val_loss']:.4f}" in words["completed"]
    assert f"loss {completed.final['test_loss']:.4f}" in words["completed"]
    # newest first: the order the fixture made them, reversed
    order = [line.split()[0] for line in lines[1:]]
    made_order = [p.name for p in made.values()]
    assert order == made_order[::-1]


def test_runs_csv_sort_and_filter(runs):
    out, made = runs
    result = invoke("runs", out, "--csv", "--sort", "best")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.output)))
    assert len(rows) == 6
    bests = [float(r["best"]) for r in rows if r["best"]]
    assert bests == sorted(bests) and len(bests) == 5  # the diverged run has no epoch
    assert rows[-1]["run"] == made["diverged"].name  # runs without a value come last
    completed = next(r for r in rows if r["run"] == made["completed"].name)
    assert float(completed["best"]) == read_run(made["completed"]).final["best_val_loss"]  # full precision
    filtered = invoke("runs", out, "--filter", "train.lr=0.02", "--csv")
    assert [r["run"] for r in csv.DictReader(io.StringIO(filtered.output))] == [made["completed"].name]
    by_optimizer = invoke("runs", out, "--filter", "train.optimizer=sgd", "--csv")
    assert [r["run"] for r in csv.DictReader(io.StringIO(by_optimizer.output))] == [made["diverged"].name]
    by_epochs = invoke("runs", out, "--sort", "train.epochs", "--csv")
    epochs = [r["epochs"] for r in csv.DictReader(io.StringIO(by_epochs.output))]
    assert epochs == sorted(epochs, key=int)


@pytest.mark.parametrize("args,message", [
    (["--filter", "train.lrr=0.1"], "no run has the config key 'train.lrr' (did you mean 'train.lr'?)"),
    (["--filter", "train.lr"], "--filter 'train.lr': expected key=value"),
    (["--sort", "bestt"], "--sort 'bestt': expected one of started, name"),
])
def test_runs_user_errors_are_one_line(runs, args, message):
    out, _ = runs
    result = invoke("runs", out, *args)
    assert result.exit_code == 2 and message in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output


def test_runs_on_a_missing_folder(tmp_path):
    result = invoke("runs", tmp_path / "nope")
    assert result.exit_code == 2 and "nope: folder not found" in result.output


def test_compare_overlays_curves_and_lists_only_differing_keys(runs, tmp_path):
    _, made = runs
    png = tmp_path / "compare.png"
    result = invoke("compare", made["completed"], made["early"], "-o", png)
    assert result.exit_code == 0, result.output
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config_block, final_block = result.output.split("\n\n")[:2]
    keys = [line.split()[0] for line in config_block.splitlines()[1:]]
    assert keys == ["train.early_stopping.min_delta", "train.early_stopping.patience", "train.epochs", "train.lr",
                    "train.schedule"]
    final = {line.split()[0]: line.split()[1:] for line in final_block.splitlines()[1:]}
    assert final["epochs"] == ["3", "2"]
    completed = read_run(made["completed"])
    assert final["test_loss"][0] == f"{completed.final['test_loss']:.4f}"
    assert final["status"] == ["completed", "stopped", "early"]


def test_compare_takes_a_folder_of_runs_such_as_a_sweeps(runs, tmp_path):
    folder, made = runs
    result = invoke("compare", folder, "-o", tmp_path / "all.png")
    assert result.exit_code == 0, result.output
    header = result.output.split("\n\n")[1].splitlines()[0].split()
    assert header[0] == "final" and sorted(header[1:]) == sorted(path.name for path in made.values())


def test_compare_needs_run_directories(tmp_path):
    result = invoke("compare", tmp_path)
    assert result.exit_code == 2 and "not a run directory (no config.toml)" in result.output


def test_find_runs_takes_the_folder_of_one_run(runs):
    _, made = runs
    assert [r.path for r in find_runs(made["completed"])] == [made["completed"]]


def test_an_unexpected_error_is_recorded_as_failed(tmp_path):
    class Broken:
        @rabbitkit.hookimpl
        def rabbit_epoch_end(self, run, epoch, metrics):
            raise RuntimeError("a bug in a plugin")

    manager = rabbitkit.plugins.get_manager()
    plugin = Broken()
    manager.register(plugin, name="broken")
    try:
        with pytest.raises(RuntimeError, match="a bug in a plugin"):
            rabbitkit.run(TINY, out=tmp_path, quiet=True)
    finally:
        manager.unregister(plugin)
    (run_dir,) = tmp_path.iterdir()
    assert status.read_status(run_dir) == "failed"
    assert "failed" in invoke("runs", tmp_path).output


def test_a_damaged_run_directory_is_listed_not_fatal(tmp_path):
    good = rabbitkit.run(TINY, {"train.epochs": 1}, out=tmp_path, quiet=True).run_dir
    damaged = rabbitkit.run(TINY, {"train.epochs": 1}, out=tmp_path, quiet=True).run_dir
    (damaged / "config.toml").write_text("[train\n")
    result = invoke("runs", tmp_path, "--sort", "name")
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line for line in result.output.splitlines()[1:]}
    assert "completed" in lines[good.name] and "unreadable" in lines[damaged.name]
    compared = invoke("compare", good, damaged)
    assert compared.exit_code == 2 and "config.toml: not valid TOML" in compared.output
