"""gemm: BLAS products on strided windows of flat arrays, from inside Numba kernels."""
import numba
import numpy as np
import pytest
from numba.core.errors import TypingError

from rabbitkit.backend.gemm import gemm


@numba.njit(cache=True)
def call_gemm(transa, transb, m, n, k, a, a_offset, lda, b, b_offset, ldb, beta, c, c_offset, ldc):
    gemm(transa, transb, m, n, k, a, a_offset, lda, b, b_offset, ldb, beta, c, c_offset, ldc)


def window(flat, offset, rows, columns, pitch):
    """The rows x columns matrix at flat[offset:], rows ``pitch`` elements apart (a view)."""
    return np.lib.stride_tricks.as_strided(flat[offset:], (rows, columns), (pitch * flat.itemsize, flat.itemsize))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("transa", [False, True])
@pytest.mark.parametrize("transb", [False, True])
@pytest.mark.parametrize("beta", [0.0, 1.0, 0.5])
def test_gemm_matches_numpy_on_strided_windows(dtype, transa, transb, beta, rng):
    m, n, k = 5, 7, 3
    lda, ldb, ldc = 11, 13, 17  # every operand a window of rows wider than the matrix
    a_offset, b_offset, c_offset = 3, 4, 6
    a, b, c = (rng.standard_normal(300).astype(dtype) for _ in range(3))
    if beta == 0.0:
        c[:] = np.nan  # beta 0 must not read C (BLAS semantics): NaN there must not leak
    before = c.copy()
    op_a = window(a, a_offset, k, m, lda).T if transa else window(a, a_offset, m, k, lda)
    op_b = window(b, b_offset, n, k, ldb).T if transb else window(b, b_offset, k, n, ldb)
    expected = op_a.astype(np.float64) @ op_b
    if beta:
        expected += beta * window(before, c_offset, m, n, ldc)
    call_gemm(transa, transb, m, n, k, a, a_offset, lda, b, b_offset, ldb, beta, c, c_offset, ldc)
    np.testing.assert_allclose(window(c, c_offset, m, n, ldc), expected, rtol=1e-5 if dtype == np.float32 else 1e-12)
    # Nothing outside the window was written: the gaps between its rows and around it.
    outside = np.ones(c.size, bool)
    for row in range(m):
        outside[c_offset + row * ldc:c_offset + row * ldc + n] = False
    np.testing.assert_array_equal(c[outside], before[outside])


def test_gemm_refuses_integer_arrays():
    ints = np.zeros(16, np.int64)
    with pytest.raises(TypingError, match="float32 or float64"):
        call_gemm(False, False, 2, 2, 2, ints, 0, 2, ints, 0, 2, 0.0, ints, 0, 2)
