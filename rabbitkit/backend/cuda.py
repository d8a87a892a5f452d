"""CUDA backend: numba.cuda device arrays, one launch helper, shared kernels.

``numba.cuda`` (the maintained ``numba-cuda`` package, extra ``cuda``) is imported
on first use only, so layer modules can define their CUDA kernels next to their
CPU kernels without making CUDA a dependency.  ``NUMBA_ENABLE_CUDASIM=1`` runs
every kernel in Numba's simulator on the CPU (slow: tiny shapes only).
"""
import math

import numpy as np

from ..errors import BackendError

THREADS_PER_BLOCK = 256
MAX_BLOCKS = 1024  # grid-stride loops cover the rest
TILE = 16  # GEMM tile edge

_cuda = None
cuda = None  # numba.cuda, bound by CudaKernel.compiled() on the first launch


def cuda_module():
    """Import numba.cuda once, or explain in one line why CUDA is not available."""
    global _cuda
    if _cuda is None:
        try:
            from numba import cuda
        except ImportError as err:  # pragma: no cover - depends on the install
            raise BackendError(f"device 'cuda' needs the 'numba-cuda' package (pip install rabbitkit[cuda]): {err}") from None
        try:
            available = cuda.is_available()
        except Exception:  # pragma: no cover - driver problems
            available = False
        if not available:
            raise BackendError(
                "device 'cuda' requested but no CUDA GPU or driver was found "
                "(set NUMBA_ENABLE_CUDASIM=1 to use the simulator)"
            )
        _cuda = cuda
    return _cuda


def simulating():
    from numba import config

    return bool(config.ENABLE_CUDASIM)


def launch_config(n, threads=THREADS_PER_BLOCK):
    """(blocks, threads) for a grid-stride loop over ``n`` items."""
    if simulating():
        # The simulator runs one Python thread per CUDA thread: keep the grid small.
        threads = min(threads, 32)
        return max(1, min(4, math.ceil(n / threads))), threads
    return max(1, min(MAX_BLOCKS, math.ceil(n / threads))), threads


class CudaKernel:
    """A ``numba.cuda`` kernel compiled on first launch.

    ``kernel.launch(n, *args)`` runs it with the grid-stride configuration for ``n``
    items; ``kernel[blocks, threads](*args)`` launches with an explicit one.
    """

    def __init__(self, pyfunc, device=False):
        self.pyfunc = pyfunc
        self.device = device
        self._compiled = None
        self.__name__ = pyfunc.__name__

    def compiled(self):
        if self._compiled is None:
            module = cuda_module()
            # Kernel bodies name the module-level global ``cuda``; bind it to the real
            # numba.cuda module now (the simulator recognises it by identity).
            self.pyfunc.__globals__["cuda"] = module
            # Device functions this kernel calls are compiled first and bound in place
            # of their lazy wrappers, so the kernel's compiler sees real device functions.
            for name in self.pyfunc.__code__.co_names:
                helper = self.pyfunc.__globals__.get(name)
                if isinstance(helper, CudaKernel) and helper.device:
                    self.pyfunc.__globals__[name] = helper.compiled()
            options = {} if simulating() else {"cache": True}
            self._compiled = module.jit(device=self.device, **options)(self.pyfunc)
        return self._compiled

    def __getitem__(self, config):
        return self.compiled()[config]

    def launch(self, n, *args):
        blocks, threads = launch_config(n)
        self.compiled()[blocks, threads](*args)


def cuda_device(fn):
    """``@cuda_device``: a CUDA device function kernels may call; compiled with the first kernel using it."""
    return CudaKernel(fn, device=True)


def device_pair(fn):
    """(CPU, CUDA) builds of one scalar or per-element function, so a layer's math is
    written once and its CPU loop (prange) and CUDA loop (grid-stride) both call it.

    The CPU build is inlined into the calling kernel (Numba IR inlining, so the
    caller's loop still vectorises); the CUDA build is a device function compiled
    with the first kernel that calls it.
    """
    import numba

    from .cpu import FASTMATH

    cpu = numba.njit(inline="always", cache=True, fastmath=set(FASTMATH), error_model="numpy")(fn)
    return cpu, cuda_device(fn)


def cuda_kernel(fn):
    """``@cuda_kernel``: declare a CUDA kernel beside the CPU one; compiled lazily.

    The kernel's module must define ``cuda = None`` at top level: that global is
    bound to ``numba.cuda`` when the kernel is first compiled.
    """
    return CudaKernel(fn)


# ---------------------------------------------------------------------------
# Kernels shared by many layers.  Each uses a grid-stride loop over flat arrays.


@cuda_kernel
def _fill_kernel(out, value):
    start = cuda.grid(1)
    stride = cuda.gridsize(1)
    for i in range(start, out.size, stride):
        out[i] = value


@cuda_kernel
def _gemm_kernel(a, b, c, trans_a, trans_b, alpha, beta):
    """c = alpha * op(a) @ op(b) + beta * c with shared-memory tiles."""
    tile_a = cuda.shared.array(shape=(16, 16), dtype=c.dtype)
    tile_b = cuda.shared.array(shape=(16, 16), dtype=c.dtype)
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    row = cuda.blockIdx.y * 16 + ty
    col = cuda.blockIdx.x * 16 + tx
    m = c.shape[0]
    n = c.shape[1]
    k = a.shape[0] if trans_a else a.shape[1]
    acc = 0.0
    for t in range((k + 15) // 16):
        ka = t * 16 + tx
        kb = t * 16 + ty
        if row < m and ka < k:
            tile_a[ty, tx] = a[ka, row] if trans_a else a[row, ka]
        else:
            tile_a[ty, tx] = 0.0
        if col < n and kb < k:
            tile_b[ty, tx] = b[col, kb] if trans_b else b[kb, col]
        else:
            tile_b[ty, tx] = 0.0
        cuda.syncthreads()
        for j in range(16):
            acc += tile_a[ty, j] * tile_b[j, tx]
        cuda.syncthreads()
    if row < m and col < n:
        if beta == 0.0:
            c[row, col] = alpha * acc
        else:
            c[row, col] = alpha * acc + beta * c[row, col]


@cuda_device
def block_sum_into(partial, acc, out, index):
    """Sum every thread's ``acc`` over the block (tree reduction in the shared array
    ``partial``, one slot per thread) and add the total to ``out[index]`` atomically."""
    tid = cuda.threadIdx.x
    partial[tid] = acc
    cuda.syncthreads()
    step = cuda.blockDim.x // 2
    while step > 0:
        if tid < step:
            partial[tid] += partial[tid + step]
        cuda.syncthreads()
        step //= 2
    if tid == 0:
        cuda.atomic.add(out, index, partial[0])


@cuda_kernel
def _sum_squares_kernel(x, out):
    """out[0] += sum(x**2) (block partial sums, one atomic per block)."""
    partial = cuda.shared.array(shape=256, dtype=np.float64)
    acc = 0.0
    for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        acc += x[i] * x[i]
    block_sum_into(partial, acc, out, 0)


@cuda_kernel
def _scale_kernel(x, factor):
    for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        x[i] *= factor


class CUDABackend:
    name = "cuda"

    def __init__(self):
        self.cuda = cuda_module()

    def empty(self, shape, dtype):
        return self.cuda.device_array(shape, dtype=dtype)

    def zeros(self, shape, dtype):
        array = self.cuda.device_array(shape, dtype=dtype)
        self.fill(array, 0)
        return array

    def asarray(self, array, dtype=None):
        """A device array of ``dtype``; host arrays are copied over."""
        if hasattr(array, "copy_to_host"):
            if dtype is None or array.dtype == np.dtype(dtype):
                return array
            array = array.copy_to_host()
        return self.cuda.to_device(np.ascontiguousarray(array, dtype=dtype))

    def to_host(self, array):
        return array.copy_to_host() if hasattr(array, "copy_to_host") else array

    def fill(self, array, value):
        flat = array.reshape(array.size)
        _fill_kernel.launch(array.size, flat, array.dtype.type(value))

    def copy_into(self, dst, src):
        if hasattr(src, "copy_to_host"):
            dst.copy_to_device(src)
        else:
            dst.copy_to_device(np.ascontiguousarray(src, dtype=dst.dtype))

    def synchronize(self):
        self.cuda.synchronize()

    # -- shared math --------------------------------------------------------
    def gemm(self, a, b, c, trans_a=False, trans_b=False, alpha=1.0, beta=0.0):
        """c = alpha * op(a) @ op(b) + beta * c on 2-D device arrays."""
        m, n = c.shape
        grid = ((n + TILE - 1) // TILE, (m + TILE - 1) // TILE)
        _gemm_kernel[grid, (TILE, TILE)](a, b, c, trans_a, trans_b, c.dtype.type(alpha), c.dtype.type(beta))

    def sum_squares(self, array):
        """sum(array**2) as a Python float (used by global-norm clipping)."""
        out = self.cuda.to_device(np.zeros(1, dtype=np.float64))
        flat = array.reshape(array.size)
        blocks, _ = launch_config(array.size)
        _sum_squares_kernel[blocks, 256 if not simulating() else 32](flat, out)
        return float(out.copy_to_host()[0])

    def scale(self, array, factor):
        flat = array.reshape(array.size)
        _scale_kernel.launch(array.size, flat, array.dtype.type(factor))


_backend = None


def get_cuda_backend():
    global _backend
    if _backend is None:
        _backend = CUDABackend()
    return _backend


# ---------------------------------------------------------------------------
# Deterministic sums of squares and global-norm clipping, all on the device.
#
# Every block writes its partial sum to its own slot (a shared-memory tree in a fixed
# order), and one block then adds the slots in a fixed order: no atomics, so the
# same gradients give the same bits on the same device and launch configuration.
# The clipping factor stays on the device too: the scale kernel reads it from device
# memory, so clipping needs no transfer unless the caller wants the norm.

REDUCE_THREADS = 256  # block size of the reductions below (a power of two)


def _reduce_threads():
    return 32 if simulating() else REDUCE_THREADS


@cuda_device
def _block_tree_sum(partial, acc):
    """Sum of every thread's ``acc`` over the block, in a fixed order (valid in thread 0)."""
    tid = cuda.threadIdx.x
    partial[tid] = acc
    cuda.syncthreads()
    step = cuda.blockDim.x // 2
    while step > 0:
        if tid < step:
            partial[tid] += partial[tid + step]
        cuda.syncthreads()
        step //= 2
    return partial[0]


@cuda_kernel
def _partial_sum_squares_kernel(x, partials, slot):
    """partials[slot, block] = this block's share of sum(x**2) (float64)."""
    partial = cuda.shared.array(shape=256, dtype=np.float64)
    acc = np.float64(0.0)  # not 0.0: under the simulator (NumPy 2) that would add in float32
    for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        acc += x[i] * x[i]
    total = _block_tree_sum(partial, acc)
    if cuda.threadIdx.x == 0:
        partials[slot, cuda.blockIdx.x] = total


@cuda_kernel
def _finish_norm_kernel(partials, clip, max_norm, result, factor32, factor64):
    """One block: result = (sum of all partials, its square root, clip factor); the
    factor (max_norm / (norm + 1e-6), PyTorch's rule, capped at 1; 1 when ``clip`` is
    False) is also written as float32 and float64 for the scale kernel."""
    partial = cuda.shared.array(shape=256, dtype=np.float64)
    acc = np.float64(0.0)
    for i in range(cuda.threadIdx.x, partials.size, cuda.blockDim.x):
        r = i // partials.shape[1]
        acc += partials[r, i - r * partials.shape[1]]
    total = _block_tree_sum(partial, acc)
    if cuda.threadIdx.x == 0:
        norm = math.sqrt(total)
        factor = 1.0
        if clip:
            factor = max_norm / (norm + 1e-6)
            if factor >= 1.0:
                factor = 1.0
        result[0] = total
        result[1] = norm
        result[2] = factor
        factor32[0] = factor
        factor64[0] = factor


@cuda_kernel
def _scale_by_device_factor_kernel(x, factor):
    """x *= factor[0] where the factor is below 1 (factor has x's dtype)."""
    f = factor[0]
    if f < 1.0:
        for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
            x[i] *= f


def global_sum_squares(arrays, max_norm=None):
    """sum of squares over device ``arrays``, deterministically, without leaving the device.

    Returns a float64 device array ``(sum, sqrt(sum), clip factor)``; with a
    ``max_norm`` the arrays are also scaled in place by the factor when it is below 1
    (global-norm clipping, as on the host).  Nothing is copied to the host.
    """
    module = cuda_module()
    arrays = list(arrays)
    threads = _reduce_threads()
    blocks = [launch_config(max(1, a.size), threads)[0] for a in arrays]
    partials = module.device_array((max(1, len(arrays)), max(blocks, default=1)), dtype=np.float64)
    _fill_kernel.launch(partials.size, partials.reshape(partials.size), np.float64(0.0))
    for slot, (array, count) in enumerate(zip(arrays, blocks)):
        if array.size:
            _partial_sum_squares_kernel[count, threads](array.reshape(array.size), partials, slot)
    result = module.device_array(3, dtype=np.float64)
    factor32 = module.device_array(1, dtype=np.float32)
    factor64 = module.device_array(1, dtype=np.float64)
    clip = max_norm is not None
    _finish_norm_kernel[1, threads](partials, clip, float(max_norm) if clip else 0.0, result, factor32, factor64)
    if clip:
        for array in arrays:
            if array.size:
                factor = factor32 if array.dtype == np.float32 else factor64
                _scale_by_device_factor_kernel.launch(array.size, array.reshape(array.size), factor)
    return result
