"""One backend interface, two implementations: ``cpu`` (numpy arrays, Numba
``@njit`` kernels) and ``cuda`` (numba.cuda device arrays and kernels).

A backend places arrays; layers hold both their CPU and CUDA kernels and pick by
``layer.device``.  The backend is chosen per run, never by editing layer code.
"""
from ..errors import BackendError

DEVICES = ("cpu", "cuda")


def get_backend(device):
    """Return the backend object for ``"cpu"`` or ``"cuda"``."""
    if device == "cpu":
        from .cpu import CPU_BACKEND

        return CPU_BACKEND
    if device == "cuda":
        from .cuda import get_cuda_backend

        return get_cuda_backend()
    raise BackendError(f"unknown device '{device}'; expected one of: {', '.join(DEVICES)}")


def to_host(array):
    """Copy any backend's array to a numpy array (no copy for numpy input)."""
    if hasattr(array, "copy_to_host"):
        return array.copy_to_host()
    return array


def device_of(array):
    """``"cuda"`` for a CUDA device array, else ``"cpu"``."""
    return "cuda" if hasattr(array, "copy_to_host") else "cpu"
