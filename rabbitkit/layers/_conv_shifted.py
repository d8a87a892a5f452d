"""Shifted-product convolution (stride 1): no column matrix at all.

In the wide layout (see :mod:`rabbitkit.layers._conv_lowering`) row ``(c, i, j)``
of a sample's column matrix is the padded planes read from offset
``c*Hp*Wp + i*Wp + j``, so for one tap ``(i, j)`` the C rows it contributes are a
window of the padded sample itself: C rows ``Hp*Wp`` elements apart, shifted by
``i*Wp + j``.  The lowered product ``W (O, C*kh*kw) @ cols`` is therefore the sum
over taps of ``W[:, :, i, j] (O, C) @ window(i, j) (C, L)``: kh*kw products that
read the padded input in place (:func:`rabbitkit.backend.gemm.gemm` passes the
window to BLAS through its leading dimension), where lowering first writes and
then reads a column matrix kh*kw times the input's size.  The backward pass is the
same sum run backwards: ``dW[:, :, i, j] += dY @ window(i, j)^T`` and
``window(i, j) of dX += W[:, :, i, j]^T @ dY``.

Work is split as in banded lowering: bands of output rows, one task per (sample,
band).  Where OpenBLAS multiplies small products straight from their operands
(its AVX-512 kernels, ``rabbitkit.backend.cpu.KERNEL_BLAS_UNPACKED_PRODUCTS``), a
band is as tall as keeps each product under that path's size limit, so no product
packs its window; elsewhere each product packs it, and the band is sized for the
cache.  Measured on an AMD EPYC (OpenBLAS SkylakeX kernels, 2 threads, batch 64):
forward 32->32 at 32 px 8.0 ms against 11.0 for the best lowering variant.
"""
import numba
import numpy as np
from numba import prange

from ..backend.cpu import KERNEL_BLAS_UNPACKED_PRODUCTS, UNPACKED_PRODUCT_LIMIT, kernel
from ..backend.gemm import gemm
from . import _conv_lowering
from ._conv_lowering import (
    band_bounds,
    load_output_grad,
    parity_band_bounds,
    parity_bands,
    store_output,
)

SHIFTED = "shifted"


def shifted_band_rows(channels, outputs, kernel_height, wide_width, itemsize, ho, unpacked=None):
    """Output rows per band: each product (O x C x band*Wp multiply-adds) under the
    unpacked-product limit where the BLAS has that path, else the band's input and
    output rows near BAND_BYTES; at least kh rows (see :func:`conv_backward_shifted`),
    at most the image's."""
    if KERNEL_BLAS_UNPACKED_PRODUCTS if unpacked is None else unpacked:
        target = UNPACKED_PRODUCT_LIMIT // max(1, channels * outputs * wide_width)
    else:
        target = _conv_lowering.BAND_BYTES // max(1, (channels + outputs) * wide_width * itemsize)
    return int(min(ho, max(kernel_height, target)))


def tap_weights(weight):
    """(kh*kw, O, C) contiguous: the (O, C) matrix of each tap, from weight (O, C, kh, kw)."""
    outputs, channels, kh, kw = weight.shape
    return np.ascontiguousarray(weight.transpose(2, 3, 0, 1)).reshape(kh * kw, outputs, channels)


def weight_from_taps(taps, kh, kw):
    """weight (O, C*kh*kw) from per-tap (kh*kw, O, C) gradients."""
    _, outputs, channels = taps.shape
    return np.ascontiguousarray(taps.reshape(kh, kw, outputs, channels).transpose(2, 3, 0, 1)).reshape(outputs, -1)


@kernel
def conv_forward_shifted(xpad, taps, bias, relu, y, product, kh, kw, hp, wp, band):
    """y = sum over taps of taps[t] @ window(t) + bias (rectified if ``relu``), band by
    band in parallel.  xpad: the padded batch (pad_batch, flat per sample, with the
    kw - 1 elements the last window runs past the planes); product: flat per thread."""
    n, outputs, ho, _ = y.shape
    channels = taps.shape[2]
    plane = hp * wp
    flat_taps = taps.reshape(-1)
    bands = (ho + band - 1) // band
    for task in prange(n * bands):
        b, r0, r1 = band_bounds(task, bands, band, ho)
        slot = numba.get_thread_id()
        length = (r1 - r0) * wp
        out = product[slot, :outputs * length]
        for t in range(kh * kw):
            i = t // kw
            start = (r0 + i) * wp + t - i * kw
            gemm(False, False, outputs, length, channels, flat_taps, t * outputs * channels, channels,
                 xpad[b], start, plane, 0.0 if t == 0 else 1.0, out, 0, length)
        store_output(out.reshape((outputs, length)), bias, y[b, :, r0:r1], relu)


@kernel
def conv_backward_shifted(xpad, dy, y, relu, taps, dxpad, grad_rows, dtaps_parts, dbias_parts, kh, kw, hp, wp, band,
                          parity, input_grad, weight_grad):
    """The bands of one ``parity`` of the backward pass: per-thread parts of the tap
    gradients dtaps[t] += dy @ window(t)^T and of dbias (if ``weight_grad``), and
    taps[t]^T @ dy added into the windows of the padded input gradient dxpad (if
    ``input_grad``).  Band t's windows reach into the kh - 1 rows below it and kw - 1
    elements further, so with ``band >= kh`` bands of one parity never touch the same
    element: the caller runs parity 0, then 1, and every sum comes in a fixed order."""
    n, outputs, ho, _ = dy.shape
    channels = taps.shape[2]
    plane = hp * wp
    flat_taps = taps.reshape(-1)
    bands = (ho + band - 1) // band
    for index in prange(parity_bands(n, bands, parity)):
        b, r0, r1 = parity_band_bounds(index, bands, parity, band, ho)
        slot = numba.get_thread_id()
        length = (r1 - r0) * wp
        g = grad_rows[slot, :outputs * length].reshape((outputs, length))
        load_output_grad(dy[b, :, r0:r1], y[b, :, r0:r1], relu, g, g, dbias_parts[slot], False)
        flat_g = g.reshape(-1)
        flat_dtaps = dtaps_parts[slot].reshape(-1)
        for t in range(kh * kw):
            i = t // kw
            start = (r0 + i) * wp + t - i * kw
            if weight_grad:
                gemm(False, True, outputs, channels, length, flat_g, 0, length, xpad[b], start, plane, 1.0,
                     flat_dtaps, t * outputs * channels, channels)
            if input_grad:
                gemm(True, False, channels, length, outputs, flat_taps, t * outputs * channels, channels, flat_g, 0,
                     length, 1.0, dxpad[b], start, plane)
