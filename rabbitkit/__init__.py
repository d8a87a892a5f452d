"""rabbitkit: deep learning down the rabbit hole, with hand-written Numba kernels.

The public face: :class:`Sequential`, :func:`run`, :data:`hookimpl`, :func:`manual_seed`.
"""
__version__ = "0.1.0"

import os as _os

# OpenBLAS workers spin for ~2**28 cycles after every call before they sleep; on a
# 2-core machine they take the core a Numba kernel or the Python thread needs next
# (a small MLP step then drops from thousands per second to tens).  Read when
# OpenBLAS loads, so it takes effect when rabbitkit is imported before numpy (as
# the `rabbit` command does); a user's own setting wins.
_ENVIRONMENT_DEFAULTS = {"OPENBLAS_THREAD_TIMEOUT": "4", "OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "1000"}
_SET_BY_RABBITKIT = [name for name in _ENVIRONMENT_DEFAULTS if name not in _os.environ]
_os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", _ENVIRONMENT_DEFAULTS["OPENBLAS_THREAD_TIMEOUT"])


def foreign_environment():
    """This process's environment without the thread settings rabbitkit added.

    rabbitkit sets ``OPENBLAS_THREAD_TIMEOUT``, ``OMP_WAIT_POLICY`` and ``GOMP_SPINCOUNT`` for itself
    (see rabbitkit.backend.cpu); child processes inherit them.  Pass this as
    ``env=`` when starting another framework (the benchmarks start PyTorch so):
    PyTorch's own OpenMP runtime is about 2.5x slower with passive waiting.
    """
    return {k: v for k, v in _os.environ.items() if k not in _SET_BY_RABBITKIT}

from .hookspecs import hookimpl, hookspec  # noqa: E402
from .random import manual_seed  # noqa: E402

__all__ = ["__version__", "hookimpl", "hookspec", "manual_seed", "Sequential", "run", "foreign_environment"]


def __getattr__(name):
    # Imported lazily so ``rabbit --version`` does not load Numba.
    if name == "Sequential":
        from .layers.sequential import Sequential

        return Sequential
    if name == "run":
        from .train.api import run

        return run
    raise AttributeError(f"module 'rabbitkit' has no attribute '{name}'")
