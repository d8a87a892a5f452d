import os

# CUDA kernels run in Numba's simulator in CI (set before Numba is imported).
os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")
