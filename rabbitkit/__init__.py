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
_os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

from .hookspecs import hookimpl, hookspec  # noqa: E402
from .random import manual_seed  # noqa: E402

__all__ = ["__version__", "hookimpl", "hookspec", "manual_seed", "Sequential", "run"]


def __getattr__(name):
    # Imported lazily so ``rabbit --version`` does not load Numba.
    if name == "Sequential":
        from .layers.sequential import Sequential

        return Sequential
    if name == "run":
        from .train.api import run

        return run
    raise AttributeError(f"module 'rabbitkit' has no attribute '{name}'")
