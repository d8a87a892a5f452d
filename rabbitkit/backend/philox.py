"""Philox-4x32-10, the counter-based generator of Salmon et al. (SC'11, "Parallel
random numbers: as easy as 1, 2, 3"; also cuRAND's and PyTorch's), written once
for CPU and CUDA kernels.

A counter-based generator is a keyed bijection: the 128-bit counter ``(block,
stream)`` under a 64-bit ``key`` gives four 32-bit words, with no state carried
from one call to the next.  A kernel can therefore make the random bits of element
``i`` where it needs them, in any order and on any thread, and the CPU and CUDA
kernels get the same bits: the mask of a dropout layer is made inside its kernel
instead of being drawn on the host and uploaded.

Only integer operations on words below 2**32 held in uint64 are used (a 32 x 32-bit
product fits in 64 bits), so nothing overflows and Numba's CPU build, numba.cuda's
build and the CUDA simulator (plain NumPy scalars) agree bit for bit.
"""
import numpy as np

from .cuda import device_pair

#: Round multipliers and Weyl key increments of Philox-4x32 (Random123's constants).
PHILOX_M0 = np.uint64(0xD2511F53)
PHILOX_M1 = np.uint64(0xCD9E8D57)
PHILOX_W0 = np.uint64(0x9E3779B9)
PHILOX_W1 = np.uint64(0xBB67AE85)
PHILOX_ROUNDS = 10

_LOW32 = np.uint64(0xFFFFFFFF)
_SHIFT32 = np.uint64(32)

#: Words per call: a kernel spends one call on four elements.
PHILOX_WORDS = 4


def _philox4x32_10(block, stream, key):
    """The four 32-bit words (as uint64) of Philox-4x32-10 at counter
    ``(block low, block high, stream low, stream high)`` under key ``(key low, key high)``.

    ``block``, ``stream`` and ``key`` are 64-bit unsigned integers; they are cast to
    uint64 first, so a Python or int64 index gives the same words (and Numba never
    mixes signed and unsigned operands, which it would widen to float64).
    """
    block = np.uint64(block)
    stream = np.uint64(stream)
    key = np.uint64(key)
    c0 = block & _LOW32
    c1 = block >> _SHIFT32
    c2 = stream & _LOW32
    c3 = stream >> _SHIFT32
    k0 = key & _LOW32
    k1 = key >> _SHIFT32
    for _ in range(PHILOX_ROUNDS):
        product0 = PHILOX_M0 * c0
        product1 = PHILOX_M1 * c2
        c0, c1, c2, c3 = ((product1 >> _SHIFT32) ^ c1 ^ k0, product1 & _LOW32,
                          (product0 >> _SHIFT32) ^ c3 ^ k1, product0 & _LOW32)
        # The key of the next round (the bump after the last round is unused).
        k0 = (k0 + PHILOX_W0) & _LOW32
        k1 = (k1 + PHILOX_W1) & _LOW32
    return c0, c1, c2, c3


philox4x32_10_cpu, philox4x32_10_cuda = device_pair(_philox4x32_10)


def keep_threshold(p):
    """The 32-bit threshold of drop probability ``p``: a word below it drops its
    element, so an element is kept with probability 1 - p (to 2**-33; exactly for
    p = 0, 1/2, 1 and every other multiple of 2**-32).  An integer comparison is the
    same on every device, where a float uniform would need its rounding to match."""
    return np.uint64(round(float(p) * 2.0 ** 32))
