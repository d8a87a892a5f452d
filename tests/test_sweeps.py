"""Sweeps: a grid of overrides run in order, locally or on a dask.distributed cluster."""
import csv

import pytest
from click.testing import CliRunner

from rabbitkit.cli import main
from rabbitkit.errors import ConfigError
from rabbitkit.train.api import grid_points, sweep

EXPERIMENT = {
    "data": {"dataset": "function1d", "n_train": 32, "n_val": 16, "n_test": 16},
    "model": {"architecture": "mlp", "hidden": [4]},
    "train": {"epochs": 1, "batch_size": 16},
    "output": {"visualizers": []},
}


def test_grid_points_cover_the_product():
    points = grid_points({"train.lr": [0.1, 0.01], "train.l2": [0.0, 1e-3, 1e-2]})
    assert len(points) == 6 and {"train.lr": 0.01, "train.l2": 1e-2} in points


def test_local_sweep_runs_each_point(tmp_path):
    results = sweep(EXPERIMENT, {"train.lr": [0.1, 0.01]}, out=tmp_path)
    assert [values for values, _ in results] == [{"train.lr": 0.1}, {"train.lr": 0.01}]
    assert [r.history[0]["lr"] for _, r in results] == [0.1, 0.01]
    assert len({r.run_dir for _, r in results}) == 2


def test_a_sweep_on_cuda_gives_the_cpu_sweep(tmp_path):
    """The same grid with ``experiment.device = "cuda"`` (Numba's CUDA simulator here):
    every point trains on the device and ends with the CPU point's losses."""
    grid = {"train.lr": [0.1, 0.01]}
    on_cpu = sweep(EXPERIMENT, grid, out=tmp_path / "cpu")
    on_cuda = sweep(dict(EXPERIMENT, experiment={"device": "cuda"}), grid, out=tmp_path / "cuda")
    assert [values for values, _ in on_cuda] == [values for values, _ in on_cpu]
    for (_, cpu), (_, cuda) in zip(on_cpu, on_cuda):
        assert 'device = "cuda"' in (cuda.run_dir / "config.toml").read_text()
        assert cuda.metrics["test_loss"] == pytest.approx(cpu.metrics["test_loss"], rel=1e-4)
        assert cuda.history[0]["train_loss"] == pytest.approx(cpu.history[0]["train_loss"], rel=1e-4)


def test_a_bad_point_fails_before_any_run(tmp_path):
    with pytest.raises(ConfigError, match="train.lr"):
        sweep(EXPERIMENT, {"train.lr": [0.1, -1.0]}, out=tmp_path)
    assert not tmp_path.joinpath("runs").exists() and not list(tmp_path.iterdir())


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def assert_sweep_files(results, grid_key):
    """sweep.csv has one row per combination (values, metrics, run dir) and sweep.png exists."""
    rows = read_csv(results.csv)
    assert results.csv.parent == results.folder and results.folder.name.startswith("sweep-experiment-")
    assert [float(r[grid_key]) for r in rows] == [values[grid_key] for values, _ in results]
    for row, (_, result) in zip(rows, results):
        assert row["run_dir"] == str(result.run_dir) and result.run_dir.parent == results.folder
        assert float(row["test_loss"]) == result.metrics["test_loss"]
        assert float(row["best_val_loss"]) == result.metrics["best_val_loss"]
        assert row["status"] == "completed" and row["epochs"] == "1"
    assert results.png.read_bytes()[:4] == b"\x89PNG"


def test_local_sweep_writes_sweep_csv_and_png(tmp_path):
    results = sweep(EXPERIMENT, {"train.lr": [0.1, 0.01], "train.l2": [0.0, 0.01]}, out=tmp_path)
    assert len(read_csv(results.csv)) == 4
    assert_sweep_files(results, "train.lr")


def test_a_diverging_point_is_recorded_and_the_sweep_goes_on(tmp_path):
    results = sweep(EXPERIMENT, {"train.lr": [1e9, 0.01]}, out=tmp_path, base_overrides={"train.epochs": 2})
    rows = read_csv(results.csv)
    assert [r["status"] for r in rows] == ["diverged", "completed"]
    assert "stopped: loss is" in (results[0][1].run_dir / "log.txt").read_text()


def test_sweep_on_dask_worker_processes_matches_the_local_one(tmp_path):
    """Worker processes, as `--dask local` uses: the run is pickled to another interpreter."""
    distributed = pytest.importorskip("distributed")
    local = sweep(EXPERIMENT, {"train.lr": [0.1, 0.02]}, out=tmp_path / "local")
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        remote = sweep(EXPERIMENT, {"train.lr": [0.1, 0.02]}, out=tmp_path / "dask", client=client)
        worker_pids = set(client.run(lambda: __import__("os").getpid()).values())
    assert __import__("os").getpid() not in worker_pids
    for (a_values, a), (b_values, b) in zip(local, remote):
        assert a_values == b_values
        assert a.metrics["test_loss"] == b.metrics["test_loss"]
    assert_sweep_files(remote, "train.lr")


CLI_EXPERIMENT = """
[data]
dataset = "function1d"
n_train = 32
[model]
architecture = "mlp"
hidden = [4]
[train]
epochs = 1
batch_size = 16
[output]
visualizers = []
"""


def test_cli_sweep_prints_a_table(tmp_path):
    experiment = tmp_path / "exp.toml"
    experiment.write_text(CLI_EXPERIMENT)
    result = CliRunner().invoke(main, ["sweep", str(experiment), "--grid", "train.lr=0.1,0.01", "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[0].split()[:2] == ["train.lr", "train_loss"]
    assert lines[1].startswith("0.1 ") and lines[2].startswith("0.01 ")
    assert lines[-1].startswith("wrote ") and lines[-1].endswith("sweep.png")


def test_cli_sweep_on_a_local_dask_cluster(tmp_path):
    pytest.importorskip("distributed")
    experiment = tmp_path / "exp.toml"
    experiment.write_text(CLI_EXPERIMENT)
    result = CliRunner().invoke(main, ["sweep", str(experiment), "--grid", "train.lr=0.1,0.01", "--out",
                                       str(tmp_path / "r"), "--dask", "local"])
    assert result.exit_code == 0, result.output
    (folder,) = (tmp_path / "r").iterdir()
    rows = read_csv(folder / "sweep.csv")
    assert [r["train.lr"] for r in rows] == ["0.1", "0.01"] and all(r["status"] == "completed" for r in rows)
    listed = CliRunner().invoke(main, ["runs", str(tmp_path / "r"), "--csv", "--sort", "train.lr"])
    assert listed.exit_code == 0, listed.output
    runs = list(csv.DictReader(listed.output.splitlines()))
    assert [r["path"] for r in runs] == [rows[1]["run_dir"], rows[0]["run_dir"]]  # lr 0.01 sorts first
    assert [float(r["best"]) for r in runs] == [float(rows[1]["best_val_loss"]), float(rows[0]["best_val_loss"])]


@pytest.mark.parametrize("grid,message", [
    ("train.lr", "--grid 'train.lr': expected KEY=V1,V2,..."),
    ("=0.1,0.2", "--grid '=0.1,0.2': expected KEY=V1,V2,..."),
    ("train.lr=0.1,,0.2", "--grid 'train.lr=0.1,,0.2': an empty value"),
])
def test_cli_sweep_grid_errors_are_one_line(tmp_path, grid, message):
    experiment = tmp_path / "exp.toml"
    experiment.write_text(CLI_EXPERIMENT)
    result = CliRunner().invoke(main, ["sweep", str(experiment), "--grid", grid])
    assert result.exit_code == 2 and message in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "runs").exists()
