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


def simulating():
    from numba import config

    return bool(config.ENABLE_CUDASIM)


# Compile-time constants of the kernels (numba.cuda freezes module globals into a
# kernel when it compiles, so shared-array shapes may name them).  The simulator
# runs one Python thread per CUDA thread and every shared-memory access in Python:
# it gets the same kernels with tiny blocks, so the tests stay fast and still cover
# partial tiles, several blocks and every loop of the register blocking.
_SIMULATOR = simulating()

#: Threads of a reduction block (a power of two): one block per channel / sample /
#: slot, each thread strides over its share, then a fixed-order tree in shared memory.
REDUCE_THREADS = 8 if _SIMULATOR else 256

#: GEMM tiling.  A block computes a GEMM_BM x GEMM_BN tile of C with
#: (GEMM_BM / GEMM_TM) x (GEMM_BN / GEMM_TN) threads; each thread keeps a
#: GEMM_TM x GEMM_TN block of C in registers and, per GEMM_BK-deep slice of the
#: shared-memory tiles, loads GEMM_TM + GEMM_TN operands for GEMM_TM * GEMM_TN
#: multiply-adds (register blocking: 4x4 gives 2 FMAs per shared load instead of 1/2).
if _SIMULATOR:
    GEMM_BM, GEMM_BN, GEMM_BK, GEMM_TM, GEMM_TN = 16, 16, 8, 4, 4  # 16 threads per block
else:
    GEMM_BM, GEMM_BN, GEMM_BK, GEMM_TM, GEMM_TN = 64, 64, 16, 4, 4  # 256 threads per block
GEMM_THREADS_M = GEMM_BM // GEMM_TM
GEMM_THREADS_N = GEMM_BN // GEMM_TN
GEMM_THREADS = GEMM_THREADS_M * GEMM_THREADS_N

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
            self.bind(module, lambda helper: helper.compiled())
            options = {} if simulating() else {"cache": True}
            self._compiled = module.jit(device=self.device, **options)(self.pyfunc)
        return self._compiled

    def bind(self, module, build):
        """Prepare the Python function for numba.cuda's compiler: the module-level
        global ``cuda`` becomes the real numba.cuda ``module`` (the simulator
        recognises it by identity), and every device function it calls is replaced by
        ``build(helper)``, its compiled form, so the compiler sees real device functions."""
        self.pyfunc.__globals__["cuda"] = module
        for name in self.pyfunc.__code__.co_names:
            helper = self.pyfunc.__globals__.get(name)
            if isinstance(helper, CudaKernel) and helper.device:
                self.pyfunc.__globals__[name] = build(helper)

    def __getitem__(self, config):
        return self.compiled()[config]

    def launch(self, n, *args):
        blocks, threads = launch_config(n)
        self.compiled()[blocks, threads](*args)

    def launch_blocks(self, groups, *args):
        """One block of :data:`REDUCE_THREADS` threads per group (channel, sample, slot):
        the layout of every deterministic reduction (see :func:`block_reduce_sum`)."""
        self.compiled()[max(1, int(groups)), REDUCE_THREADS](*args)


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
    """c = alpha * op(a) @ op(b) + beta * c: shared-memory tiles, register blocking.

    Block (bx, by) owns rows by*BM.. and columns bx*BN.. of c.  Per BK-deep slice of
    the inner dimension the block stages op(a) (BM x BK) and op(b) (BK x BN) in
    shared memory, both stored k-major so the inner loop reads rows of them; the
    loads are laid out so that consecutive threads read consecutive addresses of
    a and b whichever way each is transposed.  Thread (tx, ty) accumulates rows
    ty + i * THREADS_M and columns tx + j * THREADS_N (i < TM, j < TN) in registers:
    strided, so that a warp's shared reads of b are consecutive words (no bank
    conflicts) and of a are broadcasts, and its stores of c coalesce.  Every
    element of c is summed over k in one fixed order: deterministic.
    """
    tile_a = cuda.shared.array(shape=(GEMM_BK, GEMM_BM), dtype=c.dtype)
    tile_b = cuda.shared.array(shape=(GEMM_BK, GEMM_BN), dtype=c.dtype)
    acc = cuda.local.array((GEMM_TM, GEMM_TN), dtype=c.dtype)
    a_frag = cuda.local.array(GEMM_TM, dtype=c.dtype)
    b_frag = cuda.local.array(GEMM_TN, dtype=c.dtype)
    tx = cuda.threadIdx.x
    ty = cuda.threadIdx.y
    tid = ty * GEMM_THREADS_N + tx
    row0 = cuda.blockIdx.y * GEMM_BM
    col0 = cuda.blockIdx.x * GEMM_BN
    m = c.shape[0]
    n = c.shape[1]
    k = a.shape[0] if trans_a else a.shape[1]
    for i in range(GEMM_TM):
        for j in range(GEMM_TN):
            acc[i, j] = 0
    for k0 in range(0, k, GEMM_BK):
        for e in range(tid, GEMM_BM * GEMM_BK, GEMM_THREADS):
            if trans_a:  # a is (k, m): neighbours read along m
                r = e % GEMM_BM
                kk = e // GEMM_BM
            else:  # a is (m, k): neighbours read along k
                kk = e % GEMM_BK
                r = e // GEMM_BK
            gr = row0 + r
            gk = k0 + kk
            if gr < m and gk < k:
                tile_a[kk, r] = a[gk, gr] if trans_a else a[gr, gk]
            else:
                tile_a[kk, r] = 0
        for e in range(tid, GEMM_BK * GEMM_BN, GEMM_THREADS):
            if trans_b:  # b is (n, k): neighbours read along k
                kk = e % GEMM_BK
                q = e // GEMM_BK
            else:  # b is (k, n): neighbours read along n
                q = e % GEMM_BN
                kk = e // GEMM_BN
            gq = col0 + q
            gk = k0 + kk
            if gq < n and gk < k:
                tile_b[kk, q] = b[gq, gk] if trans_b else b[gk, gq]
            else:
                tile_b[kk, q] = 0
        cuda.syncthreads()
        # A thread whose first row or column lies past the edge of c owns nothing (a
        # partial tile at the border): it helps load but skips the products.
        if row0 + ty < m and col0 + tx < n:
            for kk in range(GEMM_BK):
                for i in range(GEMM_TM):
                    a_frag[i] = tile_a[kk, ty + i * GEMM_THREADS_M]
                for j in range(GEMM_TN):
                    b_frag[j] = tile_b[kk, tx + j * GEMM_THREADS_N]
                for i in range(GEMM_TM):
                    for j in range(GEMM_TN):
                        acc[i, j] += a_frag[i] * b_frag[j]
        cuda.syncthreads()
    for i in range(GEMM_TM):
        row = row0 + ty + i * GEMM_THREADS_M
        if row < m:
            for j in range(GEMM_TN):
                col = col0 + tx + j * GEMM_THREADS_N
                if col < n:
                    if beta == 0:
                        c[row, col] = alpha * acc[i, j]
                    else:
                        c[row, col] = alpha * acc[i, j] + beta * c[row, col]


@cuda_device
def block_reduce_sum(partial, acc):
    """The sum of every thread's ``acc`` over the (1-D) block, returned to every thread.

    A fixed-order tree in the shared array ``partial`` (one slot per thread,
    :data:`REDUCE_THREADS` long, the block size a power of two): the same inputs give
    the same bits on every run, and no atomics are involved.  Every thread of the
    block must call it; it may be called several times in a row on one ``partial``.
    """
    tid = cuda.threadIdx.x
    cuda.syncthreads()  # a previous call's readers of partial[0] are done
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
def _sum_kernel(values, out, slot, negatives):
    """out[slot] = sum(values), or with ``negatives`` how many are < 0; one block, fixed order."""
    partial = cuda.shared.array(shape=REDUCE_THREADS, dtype=np.float64)
    acc = np.float64(0.0)
    for i in range(cuda.threadIdx.x, values.size, cuda.blockDim.x):
        if negatives:
            acc += 1.0 if values[i] < 0 else 0.0
        else:
            acc += values[i]
    total = block_reduce_sum(partial, acc)
    if cuda.threadIdx.x == 0:
        out[slot] = total


@cuda_kernel
def _argmax_matches_kernel(scores, targets, matches):
    """matches[r] = 1 where the first largest score of row r is at targets[r], else 0."""
    classes = scores.shape[1]
    for r in range(cuda.grid(1), scores.shape[0], cuda.gridsize(1)):
        best = 0
        for j in range(1, classes):
            if scores[r, j] > scores[r, best]:
                best = j
        matches[r] = 1.0 if best == targets[r] else 0.0


@cuda_kernel
def _add_into_kernel(dst, src):
    for i in range(cuda.grid(1), dst.size, cuda.gridsize(1)):
        dst[i] += src[i]


@cuda_kernel
def _scale_kernel(x, factor):
    for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        x[i] *= factor


class CUDABackend:
    name = "cuda"

    def __init__(self):
        self.cuda = cuda_module()
        self._scratch = {}

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
        k = a.shape[0] if trans_a else a.shape[1]
        if (b.shape[1] if trans_b else b.shape[0]) != k or (a.shape[1] if trans_a else a.shape[0]) != m \
                or (b.shape[0] if trans_b else b.shape[1]) != n:
            raise BackendError(f"gemm: shapes {tuple(a.shape)}{'T' if trans_a else ''} @ "
                               f"{tuple(b.shape)}{'T' if trans_b else ''} -> {tuple(c.shape)} do not match")
        grid = ((n + GEMM_BN - 1) // GEMM_BN, (m + GEMM_BM - 1) // GEMM_BM)
        _gemm_kernel[grid, (GEMM_THREADS_N, GEMM_THREADS_M)](a, b, c, bool(trans_a), bool(trans_b),
                                                             c.dtype.type(alpha), c.dtype.type(beta))

    def sum_squares(self, array):
        """sum(array**2) as a Python float (float64 accumulation, deterministic)."""
        return self.sum_squares_many([array])

    def sum_squares_many(self, arrays):
        """sum of every array's sum(x**2) as one Python float: the global norm's square
        (:func:`global_sum_squares`: deterministic, one scalar crosses to the host)."""
        return float(global_sum_squares(list(arrays)).copy_to_host()[0])

    def reduce_to_host(self, *terms):
        """Scalars of device arrays in one transfer: each term ``(array, "sum")`` or
        ``(array, "negatives")`` (how many entries are < 0); a tuple of Python floats.
        Fixed-order block sums (float64): deterministic."""
        out = self.empty(max(1, len(terms)), np.float64)
        for slot, (array, kind) in enumerate(terms):
            if kind not in ("sum", "negatives"):
                raise ValueError(f"reduce_to_host: unknown reduction {kind!r}")
            _sum_kernel[1, REDUCE_THREADS](array.reshape(array.size), out, slot, kind == "negatives")
        return tuple(float(v) for v in out.copy_to_host()[:len(terms)])

    def count_argmax_matches(self, scores, targets):
        """How many rows of ``scores`` (rows x classes, on the device) have their first
        maximum at the host or device ``targets`` (one class index per row): one
        number back, the scores stay on the device."""
        rows = scores.shape[0]
        targets = self.asarray(np.asarray(targets).reshape(rows) if not hasattr(targets, "copy_to_host") else
                               targets.reshape(rows), np.int64)
        matches = self.empty(rows, np.float64)
        _argmax_matches_kernel.launch(rows, scores, targets, matches)
        return self.reduce_to_host((matches, "sum"))[0]

    def add_into(self, dst, src):
        """dst += src (same shape, device arrays)."""
        _add_into_kernel.launch(dst.size, dst.reshape(dst.size), src.reshape(src.size))

    def scratch(self, tag, shape, dtype):
        """A reusable device array of ``shape`` (contents undefined), as
        :func:`rabbitkit.layers.conv2d.scratch` on the host: one flat buffer per
        (tag, dtype) grows to the largest request, so a step allocates no scratch."""
        key = (tag, np.dtype(dtype))
        size = math.prod(shape)
        buffer = self._scratch.get(key)
        if buffer is None or buffer.size < size:
            buffer = self.empty(max(size, 1), dtype)
            self._scratch[key] = buffer
        return buffer[:size].reshape(tuple(shape))

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

def _reduce_threads():
    return REDUCE_THREADS  # the block size of every reduction (see block_reduce_sum)


@cuda_kernel
def _partial_sum_squares_kernel(x, partials, slot):
    """partials[slot, block] = this block's share of sum(x**2) (float64)."""
    partial = cuda.shared.array(shape=REDUCE_THREADS, dtype=np.float64)
    acc = np.float64(0.0)  # not 0.0: under the simulator (NumPy 2) that would add in float32
    for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        acc += x[i] * x[i]
    total = block_reduce_sum(partial, acc)
    if cuda.threadIdx.x == 0:
        partials[slot, cuda.blockIdx.x] = total


@cuda_kernel
def _finish_norm_kernel(partials, clip, max_norm, result, factor32, factor64):
    """One block: result = (sum of all partials, its square root, clip factor); the
    factor (max_norm / (norm + 1e-6), PyTorch's rule, capped at 1; 1 when ``clip`` is
    False) is also written as float32 and float64 for the scale kernel."""
    partial = cuda.shared.array(shape=REDUCE_THREADS, dtype=np.float64)
    acc = np.float64(0.0)
    for i in range(cuda.threadIdx.x, partials.size, cuda.blockDim.x):
        r = i // partials.shape[1]
        acc += partials[r, i - r * partials.shape[1]]
    total = block_reduce_sum(partial, acc)
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
