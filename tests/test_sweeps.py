"""Sweeps: a grid of overrides run in order, locally or on a dask.distributed cluster."""
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


def test_a_bad_point_fails_before_any_run(tmp_path):
    with pytest.raises(ConfigError, match="train.lr"):
        sweep(EXPERIMENT, {"train.lr": [0.1, -1.0]}, out=tmp_path)
    assert not tmp_path.joinpath("runs").exists() and not list(tmp_path.iterdir())


def test_sweep_on_a_dask_cluster_matches_the_local_one(tmp_path):
    distributed = pytest.importorskip("distributed")
    local = sweep(EXPERIMENT, {"train.lr": [0.1, 0.02]}, out=tmp_path / "local")
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        remote = sweep(EXPERIMENT, {"train.lr": [0.1, 0.02]}, out=tmp_path / "dask", client=client)
    for (a_values, a), (b_values, b) in zip(local, remote):
        assert a_values == b_values
        assert a.metrics["test_loss"] == b.metrics["test_loss"]


def test_cli_sweep_prints_a_table(tmp_path):
    experiment = tmp_path / "exp.toml"
    experiment.write_text("""
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
""")
    result = CliRunner().invoke(main, ["sweep", str(experiment), "--grid", "train.lr=0.1,0.01", "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[0].split()[:2] == ["train.lr", "train_loss"]
    assert lines[1].startswith("0.1 ") and lines[2].startswith("0.01 ")
