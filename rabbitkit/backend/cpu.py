"""CPU backend: numpy arrays and the Numba decorators every CPU kernel uses.

All kernels are compiled with ``cache=True`` so a second process loads them from
disk.  ``fastmath`` leaves out the no-NaN/no-inf assumptions: a diverging run must
still produce NaN so the trainer can stop it.
"""
import ctypes
import os
import re
import types

import numpy as np

# Numba's OpenMP workers spin after each parallel region (libgomp's default: 300,000
# spins, about a millisecond), which halves the speed of the OpenBLAS call that
# usually follows (both pools then fight for the 2 cores).  Passive waiting makes
# them sleep instead, but a worker put to sleep after every region must be woken
# for the next one, and a training step runs dozens of short regions back to back.
# A short spin of 1,000 rounds (microseconds) before sleeping catches the next
# region without taking a core from BLAS for long.  Measured here: in one session
# the wake-ups cost MLP (b) and char-rnn steps 20-60% (paired runs, every round);
# in a later, quieter one the two settings were level within the machine's +-30%
# noise.  The spin bounds the cost at a few microseconds per region either way.
# libgomp reads both once, when Numba starts its threads, so rabbitkit/__init__.py
# sets them at package import (a user's own settings win).  Setting them here, at
# the first import of this module, was too late where anything had started Numba's
# threads before (a benchmark calling numba.set_num_threads first).

import numba  # noqa: E402

# Safe fast-math: reassociation lets reductions vectorise, but NaN/inf keep their meaning.
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}

# Below this many elements a parallel region costs more than it saves.
PARALLEL_THRESHOLD = 1 << 17

# Work units of one element whose loop calls exp or log: the scalar libm call costs
# about as much as 8 plain multiply-adds (Numba has no vector libm here), so such
# loops go parallel at an eighth of the size.
TRANSCENDENTAL_WORK = 8


def kernel(fn=None, *, parallel=True, fastmath=True):
    """``@kernel``: the one decorator for CPU kernels (``njit`` + cache).

    ``error_model="numpy"``: a division yields inf/NaN as in numpy instead of a
    zero check that raises, which keeps loops with divisions vectorisable.
    """

    def wrap(f):
        return numba.njit(parallel=parallel, fastmath=set(FASTMATH) if fastmath else False, cache=True, nogil=True,
                          error_model="numpy")(f)

    return wrap(fn) if fn is not None else wrap


def _renamed_copy(fn, suffix):
    """The same function under another qualified name.

    Numba's on-disk cache is keyed by the function's qualified name and signature,
    not by compile flags: a serial and a parallel build of one function would
    overwrite each other's cache entries.  A renamed copy gets its own.
    """
    copy = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + suffix, fn.__defaults__, fn.__closure__)
    copy.__qualname__ = fn.__qualname__ + suffix
    copy.__module__ = fn.__module__
    copy.__doc__ = fn.__doc__
    return copy


def kernel_per_constant(make, constants, **options):
    """``{c: kernel(make(c))}``: one compiled kernel per compile-time constant ``c``.

    ``make(c)`` returns a plain function that reads ``c`` from its closure, so
    LLVM sees it as a literal (a stride of 1 or 2 makes a loop's loads affine,
    and it vectorises; read at run time it becomes a gather).  Each copy gets its
    own name and cache entries (Numba keys closures by their values too).
    """
    return {c: kernel(_renamed_copy(make(c), "_" + str(c).replace(".", "_")), **options) for c in constants}


def kernel_pair(fn, fastmath=True):
    """(serial, parallel) compiled variants of one kernel, cached separately."""
    return (kernel(_renamed_copy(fn, "_serial"), parallel=False, fastmath=fastmath),
            kernel(fn, parallel=True, fastmath=fastmath))


class SingleThreadedBLAS:
    """Context manager: every loaded BLAS runs single-threaded inside, as before after.

    Used around batch-parallel kernels whose threads each call BLAS on their own
    sample (a multi-threaded BLAS there would oversubscribe the cores), and around
    loops of small products that a BLAS thread pool only slows down.  Nesting is
    safe.  Needs threadpoolctl; ``available`` is False without it.
    """

    def __init__(self):
        self._libraries = None
        self._saved = []

    def _blas(self):
        if self._libraries is None:
            self._libraries = _kernel_blas_controllers()[1]  # every loaded BLAS
        return self._libraries

    @property
    def available(self):
        return bool(self._blas())

    def __enter__(self):
        if KERNEL_BLAS_PINNED:  # the BLAS that kernels call is single-threaded for good
            self._saved.append([])
            return self
        saved = [(library, library.num_threads) for library in self._blas()]
        self._saved.append(saved)
        for library, _ in saved:
            library.set_num_threads(1)
        return self

    def __exit__(self, *exc):
        for library, threads in self._saved.pop():
            library.set_num_threads(threads)
        return False


#: The process-wide instance layers share.
SINGLE_THREADED_BLAS = SingleThreadedBLAS()


def _kernel_blas_controllers():
    """(threadpoolctl controllers of the BLAS that Numba kernels call, of every BLAS).

    Inside Numba kernels ``np.dot`` calls scipy's BLAS; numpy's (a separate library
    in the PyPI wheels) serves products made from Python.  Where the two are one
    library, the first list is empty.  Both are empty without threadpoolctl.
    """
    try:
        import scipy.linalg.cython_blas  # noqa: F401  (loads scipy's BLAS)
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return [], []
    controllers = ThreadpoolController().select(user_api="blas").lib_controllers
    kernel_side = [c for c in controllers if "numpy" not in os.path.basename(os.path.dirname(c.filepath))]
    if len(kernel_side) == len(controllers):
        kernel_side = []
    return kernel_side, controllers


def pin_kernel_blas(blas=None):
    """Make the BLAS that Numba kernels call (scipy's) single-threaded for good.

    rabbitkit gives each BLAS library one role.  Kernels split the work over Numba's
    threads and each thread multiplies its own block, so the kernels' library must
    never start threads of its own; numpy's BLAS serves the big products made from
    Python with all its threads.  Where numpy and scipy share one library (e.g. some
    conda builds) it stays as it is and kernels fall back to switching it per call.
    Returns whether the pin is in place.  ``blas``: :func:`_kernel_blas_controllers`'
    result, when the caller has it already.
    """
    kernel_side, _ = blas or _kernel_blas_controllers()
    for controller in kernel_side:
        controller.set_num_threads(1)
    return bool(kernel_side)


_LOADED_BLAS = _kernel_blas_controllers()  # one scan of the loaded libraries at import
KERNEL_BLAS_PINNED = pin_kernel_blas(_LOADED_BLAS)


def spinning_numpy_blas(blas=_LOADED_BLAS):
    """numpy's OpenBLAS when it was started before ``import rabbitkit`` without
    ``OPENBLAS_THREAD_TIMEOUT`` and runs threads: its workers then spin for about
    2**28 cycles after every product numpy makes (rabbitkit's set-up in its
    ``__init__`` came too late for it), else None."""
    import rabbitkit

    if not rabbitkit._NUMPY_LOADED_FIRST or "OPENBLAS_THREAD_TIMEOUT" not in rabbitkit._SET_BY_RABBITKIT:
        return None
    kernel_side, every = blas
    for controller in every:
        if controller in kernel_side or controller.internal_api != "openblas" or controller.num_threads < 2:
            continue
        return controller
    return None


if spinning_numpy_blas() is not None:
    import warnings

    # Measured (AMD EPYC, 2 cores): a style-transfer step at 256 px took 0.81 s instead of
    # 0.57 s; the spinning workers hold the cores the next Numba kernel needs.
    warnings.warn(
        "rabbitkit: numpy was imported before rabbitkit, so its OpenBLAS threads spin after every product and "
        "take the cores from rabbitkit's kernels (up to 1.4x slower here). Import rabbitkit before numpy, or "
        "set OPENBLAS_THREAD_TIMEOUT=4 in the environment before Python starts.",
        RuntimeWarning,
        stacklevel=2,
    )


# OpenBLAS's AVX-512 kernels (cores SkylakeX, Cooperlake, SapphireRapids; 0.3.16 and
# later) multiply a product with M * N * K <= 1e6 straight from its operands, with no
# packing of them into aligned panels first (``gemm_small_kernel_permit``).  Above the
# limit every call packs the whole right-hand matrix, which for a recurrent step's
# product dominates: 16 x 128 x 512 (just over) took 29-37 us, 8 x 128 x 512 (under)
# 10 us on this machine's SkylakeX kernels.  Other cores (Haswell, Zen) have no such
# path, and there splitting a product only packs the same matrix more often
# (8 rows: 21 us, 16 rows: 30 us).
UNPACKED_PRODUCT_CORES = ("skylakex", "cooperlake", "sapphirerapids")
UNPACKED_PRODUCT_LIMIT = 1_000_000
# Below the limit, blocks of 8 rows ran fastest (the 2-thread recurrent products at
# batch 32-128, hidden 64-128: 186-230 GFLOP/s at 8 rows, 148-195 at 15).
UNPACKED_PRODUCT_ROWS = 8


def kernel_blas_unpacked_products(blas=None):
    """Whether the kernels' BLAS multiplies small products without packing them
    (``blas`` as for :func:`pin_kernel_blas`)."""
    kernel_side, controllers = blas or _kernel_blas_controllers()
    for controller in kernel_side or controllers:
        version = tuple(int(part) for part in re.findall(r"\d+", controller.version or "")[:3])
        if (controller.internal_api == "openblas" and version >= (0, 3, 16)
                and (controller.architecture or "").lower() in UNPACKED_PRODUCT_CORES):
            return True
    return False


KERNEL_BLAS_UNPACKED_PRODUCTS = kernel_blas_unpacked_products(_LOADED_BLAS)


def rows_per_product(inner, columns, rows):
    """Rows of the left operand per ``np.dot`` call inside a kernel that multiplies
    ``rows`` x ``inner`` by ``inner`` x ``columns`` (e.g. a recurrent step's block):
    small enough for the BLAS's unpacked path where it has one, else all of them.

    The recurrent layers run this rule with tuning off; with it on they time it
    against other sizes (``Recurrent._time_loop``), since it was decided on one
    processor."""
    rows = max(int(rows), 1)
    if not KERNEL_BLAS_UNPACKED_PRODUCTS or inner * columns > UNPACKED_PRODUCT_LIMIT:
        return rows
    return max(1, min(rows, UNPACKED_PRODUCT_ROWS, UNPACKED_PRODUCT_LIMIT // (inner * columns)))


def keep_freed_memory():
    """Let glibc keep freed memory for reuse instead of handing it back to the OS.

    A training step allocates and frees the same large arrays (layer outputs and
    gradients) at every step.  By default glibc serves large requests with fresh
    ``mmap`` pages and returns free memory at the top of its heap to the OS, so the
    next step touches new pages again: on the reference ConvNet that was 1,100 page
    faults and 7 ms of kernel time per step (measured; +5% steps/s, median of 12
    paired runs, without them).  Both thresholds raised, freed blocks stay in the
    heap and the next step reuses them.  Peak memory is unchanged; resident memory
    stays near its peak until the process ends.  Applied on glibc only, and not
    where the user set glibc's own ``MALLOC_TRIM_THRESHOLD_`` or
    ``MALLOC_MMAP_THRESHOLD_``.  Returns whether it applied.
    """
    if any(name in os.environ for name in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl, Windows)
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from <malloc.h>
    # 32 MiB is glibc's largest mmap threshold: bigger arrays still get their own pages.
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 512 << 20))


FREED_MEMORY_KEPT = keep_freed_memory()


class SizedKernel:
    """A kernel compiled serially and in parallel; the call picks by work size.

    Small tensors (an MLP on 1-D data) are overhead-bound and run faster without
    waking the thread pool; large ones use every core.  Each variant compiles on
    first use only.
    """

    def __init__(self, fn, fastmath=True, threshold=PARALLEL_THRESHOLD):
        self.serial, self.parallel = kernel_pair(fn, fastmath)
        self.threshold = threshold
        self.__name__ = fn.__name__
        self.__doc__ = fn.__doc__

    def __call__(self, work, *args):
        if work >= self.threshold:
            return self.parallel(*args)
        return self.serial(*args)


def sized_kernel(fn=None, *, fastmath=True):
    """``@sized_kernel``: like :func:`kernel`, but first call argument is the work size."""
    if fn is not None:
        return SizedKernel(fn, fastmath=fastmath)
    return lambda f: SizedKernel(f, fastmath=fastmath)


class CPUBackend:
    name = "cpu"

    def empty(self, shape, dtype):
        return np.empty(shape, dtype=dtype)

    def zeros(self, shape, dtype):
        return np.zeros(shape, dtype=dtype)

    def asarray(self, array, dtype=None):
        """A C-contiguous numpy array of ``dtype`` (no copy when it already is one)."""
        if hasattr(array, "copy_to_host"):
            array = array.copy_to_host()
        return np.ascontiguousarray(array, dtype=dtype)

    def to_host(self, array):
        return array

    def fill(self, array, value):
        array.fill(value)

    def copy_into(self, dst, src):
        """Copy a host or device array into ``dst`` in place."""
        if hasattr(src, "copy_to_host"):
            src = src.copy_to_host()
        np.copyto(dst, src)

    def synchronize(self):
        pass


CPU_BACKEND = CPUBackend()


# Below this many multiply-adds a product runs in a Numba kernel on the kernel BLAS
# (one thread, no pool to wake); above it numpy's BLAS uses every core.
SMALL_PRODUCT = 1 << 21


@kernel(parallel=False)
def small_matmul(a, b, out, accumulate):
    """out (+)= a @ b on the single-threaded kernel BLAS."""
    if accumulate:
        out += np.dot(a, b)
    else:
        np.dot(a, b, out)


@kernel(parallel=False)
def product_rows(a, b, b_t, out, first, stop, rows, swap):
    """out[first:stop] = a[first:stop] @ b on the kernel BLAS, at most ``rows`` rows of
    ``a`` per call (a, b and ``b_t`` = b.T row-major; ``rows`` from :func:`rows_per_product`
    or the tuner).

    ``swap`` empty: each call is ``a_block @ b``.  ``swap`` with room for ``rows`` x
    ``b.shape[1]`` elements: each call is the transposed product ``b_t @ a_block.T``
    into ``swap``, copied back transposed.  Same numbers up to float32 rounding; the
    speed differs because a BLAS packs the two operands differently.  OpenBLAS's
    Haswell kernels, which pack every product (no unpacked path, see
    UNPACKED_PRODUCT_CORES), took 86 us for a 16 x 128 by 128 x 512 product as
    ``a_block @ b`` and 60 us transposed, copy included (Zen 3, one thread): the
    fixed cost grows with the size of ``b`` in the first orientation only.  The
    recurrent layers time both (``Recurrent._time_loop``).
    """
    columns = b.shape[1]
    for start in range(first, stop, rows):
        end = min(start + rows, stop)
        if swap.size == 0:
            np.dot(a[start:end], b, out[start:end])
        else:
            count = end - start
            block = swap[:columns * count].reshape((columns, count))
            np.dot(b_t, a[start:end].T, block)
            for n in range(count):
                row = out[start + n]
                for j in range(columns):
                    row[j] = block[j, n]


def matmul(a, b, out=None, accumulate=False):
    """``out = a @ b`` or ``out += a @ b`` with the BLAS that suits the size.

    Small products (an MLP on 1-D data) go to the single-threaded kernel BLAS
    through a Numba kernel; large ones to numpy's multi-threaded BLAS.  ``a`` and
    ``b`` may be transposed views of C arrays.
    """
    if out is None:
        out = np.empty((a.shape[0], b.shape[1]), dtype=a.dtype)
        accumulate = False
    if a.shape[0] * a.shape[1] * b.shape[1] < SMALL_PRODUCT and KERNEL_BLAS_PINNED:
        small_matmul(a, b, out, accumulate)
    elif accumulate:
        out += np.dot(a, b)
    else:
        np.dot(a, b, out)
    return out
