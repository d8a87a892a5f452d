"""``gemm``: a BLAS matrix product on operands that are strided windows of flat arrays,
callable from inside Numba kernels.

Numba's ``np.dot`` takes whole contiguous matrices: a window of rows ``pitch``
elements apart (an image's channel planes seen from a shifted start, as the
shifted-product convolution reads them, :mod:`rabbitkit.layers._conv_shifted`) it
first copies, which is the very copy the window was meant to avoid.  BLAS itself
takes such a window as it is, through the leading dimension, so ``gemm`` calls it
the way ``np.dot`` does inside Numba: through ``numba_xxgemm``, the C helper in
Numba's own runtime that forwards to scipy's BLAS (the library the kernels' BLAS
thread settings apply to, see :mod:`rabbitkit.backend.cpu`).  The symbol is
resolved when the compiled code is linked, so kernels calling ``gemm`` stay
cacheable (``cache=True``), unlike a ctypes function pointer baked into the code.

Row-major terms throughout: ``c[c_offset:]`` holds an ``m x n`` matrix whose rows
start ``ldc`` elements apart, and ::

    gemm(transa, transb, m, n, k, a, a_offset, lda, b, b_offset, ldb, beta, c, c_offset, ldc)

computes ``C = op(A) @ op(B) + beta * C`` with ``op(A)`` of shape ``m x k`` (``A``
stored as ``k x m`` when ``transa``) and ``op(B)`` of shape ``k x n``.  No bounds
are checked: the caller's windows must lie inside its arrays.
"""
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.errors import TypingError
from numba.extending import intrinsic
from numba.np import linalg

_CHAR = ir.IntType(8)
_VOID_P = _CHAR.as_pointer()


@intrinsic
def gemm(typingctx, transa, transb, m, n, k, a, a_offset, lda, b, b_offset, ldb, beta, c, c_offset, ldc):
    arrays = (a, b, c)
    if not all(isinstance(array, types.Array) and array.ndim == 1 for array in arrays):
        raise TypingError("gemm takes 1-D arrays (flat views of the matrices' storage)")
    dtype = a.dtype
    if dtype not in (types.float32, types.float64) or b.dtype != dtype or c.dtype != dtype:
        raise TypingError(f"gemm multiplies float32 or float64 arrays of one type, got {a.dtype}, {b.dtype}, {c.dtype}")
    signature = types.void(transa, transb, m, n, k, a, a_offset, lda, b, b_offset, ldb, beta, c, c_offset, ldc)

    def codegen(context, builder, sig, args):
        linalg.ensure_blas()
        intp = context.get_value_type(types.intp)
        function_type = ir.FunctionType(ir.IntType(32), [_CHAR, _CHAR, _CHAR, intp, intp, intp, _VOID_P, _VOID_P,
                                                         intp, _VOID_P, intp, _VOID_P, _VOID_P, intp])
        xxgemm = cgutils.get_or_insert_function(builder.module, function_type, "numba_xxgemm")

        def integer(index):
            return context.cast(builder, args[index], sig.args[index], types.intp)

        def window(array_index, offset_index):
            array = context.make_array(sig.args[array_index])(context, builder, args[array_index])
            return builder.bitcast(builder.gep(array.data, [integer(offset_index)]), _VOID_P)

        def flag(index):
            truth = context.cast(builder, args[index], sig.args[index], types.boolean)
            return builder.select(truth, ir.Constant(_CHAR, ord("t")), ir.Constant(_CHAR, ord("n")))

        alpha = linalg.make_constant_slot(context, builder, dtype, 1.0)
        beta_slot = cgutils.alloca_once_value(builder, context.cast(builder, args[11], sig.args[11], dtype))
        kind = ir.Constant(_CHAR, ord(linalg.get_blas_kind(dtype)))
        # BLAS is column-major: the row-major C = op(A) op(B) is its C^T = op(B)^T op(A)^T,
        # a call with the operands swapped and the same transpose flags.
        status = builder.call(xxgemm, (kind, flag(1), flag(0), integer(3), integer(2), integer(4),
                                       builder.bitcast(alpha, _VOID_P), window(8, 9), integer(10),
                                       window(5, 6), integer(7), builder.bitcast(beta_slot, _VOID_P),
                                       window(12, 13), integer(14)))
        linalg.check_blas_return(context, builder, status)
        return context.get_dummy_value()

    return signature, codegen
