"""The plugin's own tests, written with rabbitkit.testing as any plugin author would."""
import math
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from rabbitkit.plugins import PluginManager
from rabbitkit.testing import check_cuda_parity, check_gradients
from rabbitkit_softplus import Softplus, lecun_normal

HERE = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("shape", [(1, 4), (3, 2, 5)])
@pytest.mark.parametrize("beta", [1.0, 2.5])
def test_softplus_gradients(shape, beta):
    check_gradients(Softplus(beta, dtype=np.float64), shape, input_range=(-4, 4))


def test_softplus_matches_reference_without_overflow():
    x = np.array([-1000.0, -20.0, -1.0, 0.0, 1.0, 20.0, 1000.0], dtype=np.float32)
    y = Softplus().forward(x[None])[0]
    assert np.isfinite(y).all()
    np.testing.assert_allclose(y, np.logaddexp(0.0, x.astype(np.float64)), rtol=1e-6, atol=1e-6)


def test_softplus_cuda_matches_cpu():
    check_cuda_parity(lambda: Softplus(1.5), (2, 3))


@pytest.mark.parametrize("gain", [1.0, 2.0])
def test_lecun_normal_variance(gain):
    w = lecun_normal((400, 250), np.random.default_rng(0), gain=gain)
    assert w.dtype == np.float32
    expected = gain ** 2 / 250
    # the sample variance of n normal draws has a relative standard error sqrt(2/n) (0.45 % here): 4 of them
    assert abs(w.var() / expected - 1) < 4 * math.sqrt(2 / w.size)
    assert abs(w.mean()) < 4 * math.sqrt(expected / w.size)


def test_registered_through_the_entry_point():
    manager = PluginManager()
    assert manager.registry("layers").provider("Softplus") == "softplus"
    assert manager.registry("initializers").provider("lecun_normal") == "softplus"


def test_cli_lists_and_uses_the_plugin(tmp_path):
    listing = subprocess.run([sys.executable, "-m", "rabbitkit.cli", "plugins"], capture_output=True, text=True, check=True)
    assert any("Softplus" in line and "softplus" in line.split()[-1] for line in listing.stdout.splitlines())
    experiment = HERE / "experiments" / "sine_softplus.toml"
    done = subprocess.run(
        [sys.executable, "-m", "rabbitkit.cli", "run", str(experiment), "--out", str(tmp_path),
         "--set", "train.epochs=3"],
        capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    run_dir = next(tmp_path.iterdir())
    assert "Softplus" in (run_dir / "log.txt").read_text() or "Softplus" in (run_dir / "config.toml").read_text()
    assert (run_dir / "metrics.csv").read_text().count("\n") == 4  # header + 3 epochs
