"""rabbitkit: deep learning down the rabbit hole, with hand-written Numba kernels.

The public face: :class:`Sequential`, :func:`run`, :data:`hookimpl`, :func:`manual_seed`.
"""
__version__ = "0.1.0"

import os as _os

# Thread-pool settings, read by OpenBLAS and libgomp when they load, so they are set
# here, at package import, before any kernel can start a pool (the `rabbit` command
# imports rabbitkit before numpy and Numba); a user's own settings win.
# * OpenBLAS workers spin for ~2**28 cycles after every call before they sleep; on a
#   2-core machine they take the core a Numba kernel or the Python thread needs next
#   (a small MLP step then drops from thousands per second to tens).
# * Numba's OpenMP workers (libgomp) spin too: see rabbitkit.backend.cpu for the
#   passive wait with a short spin.
_ENVIRONMENT_DEFAULTS = {"OPENBLAS_THREAD_TIMEOUT": "4", "OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "1000"}
# numpy loaded before rabbitkit has its OpenBLAS started without the timeout above
# (rabbitkit.backend.cpu warns once, where it can see which BLAS numpy has).
_NUMPY_LOADED_FIRST = "numpy" in __import__("sys").modules
_SET_BY_RABBITKIT = [name for name in _ENVIRONMENT_DEFAULTS if name not in _os.environ]
for _name, _value in _ENVIRONMENT_DEFAULTS.items():
    _os.environ.setdefault(_name, _value)


def _warn_if_openmp_started_first():
    """Warn when Numba's OpenMP pool was already running, without rabbitkit's settings.

    libgomp reads its wait policy once, when Numba first starts its threads (e.g. on
    ``numba.set_num_threads`` or the first parallel kernel): started before
    ``import rabbitkit``, its workers spin after every kernel and take the cores from
    BLAS.  Measured: the 784-256-256-10 MLP step ran at 280-310 steps/s instead of
    480-520.  Nothing can change that pool afterwards, so say how to avoid it.
    """
    import sys

    parallel = sys.modules.get("numba.np.ufunc.parallel")
    if parallel is None or not getattr(parallel, "_is_initialized", False):
        return
    if getattr(parallel, "_threading_layer", None) != "omp" or "OMP_WAIT_POLICY" not in _SET_BY_RABBITKIT:
        return
    import warnings

    warnings.warn(
        "rabbitkit: Numba's OpenMP threads were started before rabbitkit was imported, so they spin after every "
        "kernel and slow BLAS down (up to 2x here). Import rabbitkit before using Numba's threads, or set "
        "OMP_WAIT_POLICY=PASSIVE GOMP_SPINCOUNT=1000 in the environment.",
        RuntimeWarning,
        stacklevel=3,
    )


_warn_if_openmp_started_first()

# PyTorch loaded before rabbitkit started its OpenMP runtime with active waiting;
# remembered here, warned about once when rabbitkit's kernels are first put to work.
_TORCH_LOADED_FIRST = "torch" in __import__("sys").modules
_torch_warned = False


def warn_if_sharing_cores_with_torch():
    """Warn once when PyTorch shares this process: two OpenMP runtimes then spin against each other.

    Measured on a 2-core Intel Xeon: rabbitkit's training steps ran at 0.45-0.58x their
    speed alone with PyTorch imported first (its workers spin after every op and hold
    the cores Numba's kernels and BLAS want next).  Nothing can change a running pool,
    so the warning says what helps.  Called by the trainer and the visualisations.
    """
    global _torch_warned
    import sys

    if _torch_warned or "torch" not in sys.modules:
        return
    _torch_warned = True
    import warnings

    how = ("it was imported before rabbitkit, so its threads spin after every op; import rabbitkit first "
           "(or set OMP_WAIT_POLICY=PASSIVE before Python starts)") if _TORCH_LOADED_FIRST else (
           "its threads compete with rabbitkit's kernels for the cores")
    warnings.warn(
        f"rabbitkit: PyTorch is loaded in this process and {how}; for full speed run rabbitkit and PyTorch "
        "in separate processes, or call torch.set_num_threads(1) while rabbitkit works.",
        RuntimeWarning,
        stacklevel=2,
    )

def foreign_environment():
    """This process's environment without the thread settings rabbitkit added.

    rabbitkit sets ``OPENBLAS_THREAD_TIMEOUT``, ``OMP_WAIT_POLICY`` and ``GOMP_SPINCOUNT`` for itself
    (see above and rabbitkit.backend.cpu); child processes inherit them.  Pass this as
    ``env=`` when starting another framework (the benchmarks start PyTorch so):
    PyTorch's own OpenMP runtime is about 2.5x slower with passive waiting.
    """
    return {k: v for k, v in _os.environ.items() if k not in _SET_BY_RABBITKIT}

from .hookspecs import hookimpl, hookspec  # noqa: E402
from .random import manual_seed  # noqa: E402

__all__ = ["__version__", "hookimpl", "hookspec", "manual_seed", "Sequential", "run", "foreign_environment",
           "warn_if_sharing_cores_with_torch"]


def __getattr__(name):
    # Imported lazily so ``rabbit --version`` does not load Numba.
    if name == "Sequential":
        from .layers.sequential import Sequential

        return Sequential
    if name == "run":
        from .train.api import run

        return run
    raise AttributeError(f"module 'rabbitkit' has no attribute '{name}'")
