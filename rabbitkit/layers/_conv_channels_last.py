"""Channels-last lowering of Conv2D's forward pass (stride 1).

Per-sample lowering multiplies ``W (O, K) @ cols (K, P)``.  Where OpenBLAS packs
its operands on every call (its Haswell kernels, which it picks on AVX2 parts such
as AMD's Zen 3 EPYC), the packing of ``cols`` costs about as much as the multiply
when O is small: each of the K*P elements is used by only O output channels.  The
same product formed the other way round, ``cols^T (P, K) @ W^T (K, O)`` into a
(P, O) result, ran 1.6x faster there (32->32 at 32 px, batch 64, 2 threads:
8.0 ms against 12.9 for the products alone), but only with ``cols^T`` contiguous
(through transposed views it gained a quarter of that).

Writing ``cols^T`` contiguously is cheap from a channels-last copy of the padded
sample, element (r, q, c) at ``(r*Wp + q)*C + c``: in the wide layout (see
:mod:`rabbitkit.layers._conv_lowering`) row p of ``cols^T`` is then kh runs of
kw*C consecutive values, kernel row i's from ``(p + i*Wp)*C``.  Its columns come
in the order (i, j, c), so the weight is permuted to (kh*kw*C, O) to match; the
store transposes the (P, O) result into the NCHW output.  Results differ from the
other variants only by float32 rounding (the sums run in another order).

Only the forward pass: the backward products measured no faster this way round
(the weight gradient slower), so the layer's backward keeps its own variants.
"""
import numba
import numpy as np
from numba import prange

from ..backend.cpu import kernel

CHANNELS_LAST = "channels-last"

#: Side of the square tiles the input is transposed in: a tile's reads (8 rows of a
#: plane) and writes (8 runs of channels) both stay in L1.
TILE = 8


def channels_last_weights(weight):
    """(kh*kw*C, O) contiguous, row (i, j, c): weight (O, C, kh, kw) in the order of
    the channels-last columns."""
    outputs, channels, kh, kw = weight.shape
    return np.ascontiguousarray(weight.transpose(2, 3, 1, 0)).reshape(kh * kw * channels, outputs)


def padded_size(channels, height, width, kh, kw, ph, pw):
    """Elements of one sample's channels-last padded copy, with the (kw - 1)*C the
    last wide row of the lowering reads past the padded planes."""
    return ((height + 2 * ph) * (width + 2 * pw) + kw - 1) * channels


@kernel(parallel=False)
def zero_range(a, start, stop):
    part = a[start:stop]
    for k in range(part.size):
        part[k] = 0.0


@kernel(parallel=False)
def pad_channels_last(x, xs, ph, pw):
    """xs (flat, padded_size elements) = x (C, H, W) zero-padded, channels last.
    Only the border is zeroed: the interior is written anyway."""
    channels, h, w = x.shape
    wp = w + 2 * pw
    zero_range(xs, 0, (ph * wp + pw) * channels)
    for r in range(h):  # right border of row r and left border of row r + 1: one run
        start = ((r + ph) * wp + pw + w) * channels
        zero_range(xs, start, start + 2 * pw * channels)
    zero_range(xs, ((h + ph) * wp + pw) * channels, xs.size)
    for r in range(h):
        row = ((r + ph) * wp + pw) * channels
        for c0 in range(0, channels, TILE):
            for q0 in range(0, w, TILE):
                if c0 + TILE <= channels and q0 + TILE <= w:
                    # Constant trip counts: LLVM unrolls the full tiles.
                    for dq in range(TILE):
                        dst = xs[row + (q0 + dq) * channels + c0:]
                        for dc in range(TILE):
                            dst[dc] = x[c0 + dc, r, q0 + dq]
                else:
                    for dq in range(min(TILE, w - q0)):
                        dst = xs[row + (q0 + dq) * channels + c0:]
                        for dc in range(min(TILE, channels - c0)):
                            dst[dc] = x[c0 + dc, r, q0 + dq]


@kernel(parallel=False)
def im2col_channels_last(xs, cols, kh, kw, wp, channels):
    """cols (L, kh*kw*C): row p = kh runs of kw*C values, kernel row i's from
    xs[(p + i*wp)*C] (the wide layout, channels last)."""
    run = kw * channels
    for p in range(cols.shape[0]):
        row = cols[p]
        for i in range(kh):
            start = (p + i * wp) * channels
            src = xs[start:start + run]
            dst = row[i * run:(i + 1) * run]
            for k in range(run):
                dst[k] = src[k]


@kernel(parallel=False)
def store_channels_last(product, bias, y, relu, wp):
    """y (O, Ho, Wo) = product (Ho*wp, O) transposed, without the garbage positions,
    plus bias; rectified when ``relu``."""
    outputs, ho, wo = y.shape
    for o in range(outputs):
        shift = bias[o]
        for oh in range(ho):
            src = product[oh * wp:oh * wp + wo, o]  # a strided view: range-counter indexing
            dst = y[o, oh]
            if relu:
                for ow in range(wo):
                    v = src[ow] + shift
                    dst[ow] = v if v > 0 else 0.0
            else:
                for ow in range(wo):
                    dst[ow] = src[ow] + shift


@kernel
def conv_forward_channels_last(x, weight_cl, bias, relu, y, xs, cols, product, kh, kw, ph, pw):
    """y[b] = im2col(x[b])^T @ weight_cl, stored as NCHW, plus bias (rectified if
    ``relu``), parallel over samples; xs, cols, product: flat scratch per thread
    (padded_size, Ho*Wp*K and Ho*Wp*O elements)."""
    n, channels, h, w = x.shape
    outputs, ho = y.shape[1], y.shape[2]
    wp = w + 2 * pw
    length = ho * wp
    rows = weight_cl.shape[0]
    for b in prange(n):
        slot = numba.get_thread_id()
        pad_channels_last(x[b], xs[slot], ph, pw)
        block = cols[slot, :length * rows].reshape((length, rows))
        out = product[slot, :length * outputs].reshape((length, outputs))
        im2col_channels_last(xs[slot], block, kh, kw, wp, channels)
        np.dot(block, weight_cl, out)
        store_channels_last(out, bias, y[b], relu, wp)
