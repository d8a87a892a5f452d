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

# Before numpy, as a user's script should: rabbitkit's thread settings then reach
# numpy's OpenBLAS when it loads (rabbitkit.backend.cpu warns otherwise).
import rabbitkit  # noqa: F401

# isort: split

import sys  # noqa: E402

# The simulator runs a block's CUDA threads as Python threads and its block runner
# polls them; at Python's default 5 ms GIL switch interval every syncthreads() then
# waits milliseconds for a switch.  A 0.1 ms interval makes the CUDA tests 7-12x
# faster (measured on a block reduction and a GEMM) and changes nothing else here.
sys.setswitchinterval(1e-4)


def _serialise_simulator_shared_arrays():
    """numba-cuda's simulator (0.30) creates a block's ``cuda.shared.array`` on the
    first call from any of the block's threads, looking it up and storing it without
    a lock: two threads can each create one, and a tree reduction over the block then
    misses the shares written into the lost copy (seen once in CI: PReLU's slope
    gradient came out at a fraction of the CPU's).  The short switch interval above
    makes that interleaving likelier.  This is the simulator's own lookup, keyed by
    the calling line as there, under a lock.
    """
    import threading

    from numba import config

    if not config.ENABLE_CUDASIM:
        return
    from numba.cuda.simulator import kernelapi

    original = kernelapi.FakeCUDAShared.array
    lock = threading.Lock()

    def array(self, shape, dtype, alignment=None):
        if shape == 0 or alignment is not None:  # dynamic shared memory / unsupported: as before
            return original(self, shape, dtype, alignment)
        if not isinstance(dtype, np.dtype):
            from numba.np import numpy_support

            dtype = numpy_support.as_dtype(dtype) if hasattr(dtype, "key") else np.dtype(dtype)
        caller = sys._getframe(1)
        key = (caller.f_code.co_filename, caller.f_lineno)
        with lock:
            found = self._allocations.get(key)
            if found is None:
                found = self._allocations[key] = np.empty(shape, dtype)
        return found

    kernelapi.FakeCUDAShared.array = array


_serialise_simulator_shared_arrays()

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


@pytest.fixture(autouse=True)
def _seeded_layer_initialisation():
    """Every test starts from one seed of rabbitkit's root sequence: a layer built
    without a seed of its own otherwise draws fresh entropy or, once some test has
    seeded, the next stream after whatever earlier tests built, so its weights would
    depend on which tests ran before it."""
    from rabbitkit import random as rk_random

    rk_random.manual_seed(20261202)
    yield
