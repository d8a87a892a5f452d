"""Test setup: the CUDA simulator (set before Numba is imported) and shared data."""
import os
import pathlib

# CUDA kernels are tested against the CPU kernels in Numba's simulator, on tiny
# shapes; a machine with a GPU can run the same tests with NUMBA_ENABLE_CUDASIM=0.
os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
# Tests never download: a dataset without a local copy fails fast with its message.
os.environ.setdefault("RABBIT_OFFLINE", "1")
# Kernel variants are not timed in tests (a choice may differ from run to run and the
# tests compare runs bit for bit); tests/test_tuning.py turns it on where it is tested.
os.environ.setdefault("RABBIT_TUNE", "0")

import sys  # noqa: E402

# The simulator runs a block's CUDA threads as Python threads and its block runner
# polls them; at Python's default 5 ms GIL switch interval every syncthreads() then
# waits milliseconds for a switch.  A 0.1 ms interval makes the CUDA tests 7-12x
# faster (measured on a block reduction and a GEMM) and changes nothing else here.
sys.setswitchinterval(1e-4)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def shared_data():
    """../shared/data (real GTSRB subset, Tiny Shakespeare, CIFAR-10 sample); CI always has it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data folder {SHARED_DATA} not present (a user's clone has no ../shared)")
    return SHARED_DATA


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
