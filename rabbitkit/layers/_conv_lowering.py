"""The CPU lowering of Conv2D (im2col, matrix products on the BLAS, col2im).

Three variants compute the same convolution, with sums in different orders:

* per-sample (``conv_forward`` / ``conv_backward``): parallel over samples, each
  thread lowers its sample into its own scratch and calls single-threaded BLAS;
* whole-batch (``lower_batch`` ... ``raise_batch``): the batch's columns in one
  matrix, each product one multi-threaded numpy call;
* banded (``conv_forward_banded`` / ``conv_backward_banded``, stride 1 only):
  parallel over bands of output rows, each thread lowers one band into a column
  block small enough to stay in its core's cache and multiplies it on
  single-threaded BLAS.  The full column matrix of a large image (576 x 50,176
  floats, 115 MB, for VGG's conv1_2 at 224 px) is never written, so a batch of one
  uses every thread without the memory traffic and memory of whole-batch lowering.

:class:`rabbitkit.layers.conv2d.Conv2D` picks one per shape (see its ``_variant``).
"""
import math

import numba
import numpy as np
from numba import prange

from ..backend.cpu import kernel

# -- scratch memory and BLAS threads ----------------------------------------------
_workspace = {}


def scratch(tag, shape, dtype):
    """A reusable scratch array of ``shape`` (contents undefined).

    One flat buffer per (tag, dtype) grows to the largest request and is shared
    by every layer, so a training step allocates no scratch memory.  Callers
    must not hold a scratch array across calls into other layers.
    """
    key = (tag, np.dtype(dtype))
    size = math.prod(shape)
    buffer = _workspace.get(key)
    if buffer is None or buffer.size < size:
        buffer = np.empty(size, dtype=dtype)
        _workspace[key] = buffer
    return buffer[:size].reshape(shape)


def release_scratch():
    """Drop every scratch buffer; the next request allocates afresh.  The tuner calls
    it after timing a layer's variants: a buffer grown by a variant that lost would
    otherwise stay for the whole run (about 75 MiB of style transfer's peak at 256 px)."""
    _workspace.clear()


def scratch_bytes():
    """Bytes held in scratch buffers now."""
    return sum(buffer.nbytes for buffer in _workspace.values())


# -- per-sample building blocks (serial; called from the batch kernels) ------------
@kernel(parallel=False)
def valid_output_range(size_out, size_in, stride, padding, offset):
    """[lo, hi) of output positions whose input index o*stride - padding + offset is inside."""
    lo = 0
    if padding - offset > 0:
        lo = (padding - offset + stride - 1) // stride
    last = size_in - 1 + padding - offset
    hi = 0 if last < 0 else min(size_out, last // stride + 1)
    return lo, max(lo, hi)


@kernel(parallel=False)
def interior_rows(x, xpad, ph, pw, into_padded):
    """The planes of x (C, H, W) <-> the interior of the padded planes xpad (flat,
    (H + 2ph) x (W + 2pw) each): copied into xpad, or out of it into x."""
    channels, h, w = x.shape
    hp = h + 2 * ph
    wp = w + 2 * pw
    for c in range(channels):
        for r in range(h):
            start = (c * hp + r + ph) * wp + pw
            padded = xpad[start : start + w]
            plain = x[c, r]
            if into_padded:
                for q in range(w):
                    padded[q] = plain[q]
            else:
                for q in range(w):
                    plain[q] = padded[q]


@kernel(parallel=False)
def pad_sample(x, xpad, ph, pw):
    """xpad (flat) = the planes of x (C, H, W) zero-padded to (H + 2ph) x (W + 2pw), then zeros."""
    for k in range(xpad.size):
        xpad[k] = 0.0
    interior_rows(x, xpad, ph, pw, True)


@kernel(parallel=False)
def wide_rows(xpad, cols, kh, kw, hp, wp, scatter):
    """Row (c, i, j) of cols (K, Ho*Wp) <-> the padded planes xpad (flat) from offset
    c*Hp*Wp + i*Wp + j: copied into cols (im2col), or with ``scatter`` added back
    into xpad (the column gradient's col2im)."""
    length = cols.shape[1]
    channels = cols.shape[0] // (kh * kw)
    for c in range(channels):
        for i in range(kh):
            for j in range(kw):
                start = c * hp * wp + i * wp + j
                plane = xpad[start : start + length]
                row = cols[(c * kh + i) * kw + j]
                if scatter:
                    for k in range(length):
                        plane[k] += row[k]
                else:
                    for k in range(length):
                        row[k] = plane[k]


@kernel(parallel=False)
def im2col_wide(xpad, cols, kh, kw, hp, wp):
    wide_rows(xpad, cols, kh, kw, hp, wp, False)


@kernel(parallel=False)
def scatter_wide(dcols, dxpad, kh, kw, hp, wp):
    """dxpad (flat padded planes) += the dcols rows where im2col_wide read them."""
    wide_rows(dxpad, dcols, kh, kw, hp, wp, True)


@kernel(parallel=False)
def unpad_sample(dxpad, dx, ph, pw):
    """dx (C, H, W) = the interior of the padded planes dxpad (flat)."""
    interior_rows(dx, dxpad, ph, pw, False)


@kernel(parallel=False)
def col2im_wide(dcols, dxpad, dx, kh, kw, ph, pw):
    """dx (C, H, W) = sum of the dcols rows added back where im2col_wide read them."""
    for k in range(dxpad.size):
        dxpad[k] = 0.0
    scatter_wide(dcols, dxpad, kh, kw, dx.shape[1] + 2 * ph, dx.shape[2] + 2 * pw)
    unpad_sample(dxpad, dx, ph, pw)


@kernel(parallel=False)
def im2col_strided(x, cols, kh, kw, sh, sw, ph, pw, ho, wo):
    """cols (K, Ho*Wo): row (c, i, j), column (oh, ow) = x[c, oh*sh - ph + i, ow*sw - pw + j] or 0."""
    channels, h, w = x.shape
    for c in range(channels):
        for i in range(kh):
            oh_lo, oh_hi = valid_output_range(ho, h, sh, ph, i)
            for j in range(kw):
                ow_lo, ow_hi = valid_output_range(wo, w, sw, pw, j)
                row = cols[(c * kh + i) * kw + j]
                start = ow_lo * sw - pw + j
                for oh in range(ho):
                    dst = row[oh * wo : (oh + 1) * wo]
                    if oh < oh_lo or oh >= oh_hi:
                        for ow in range(wo):
                            dst[ow] = 0.0
                        continue
                    # A strided view indexed by the range counter: no wraparound checks.
                    src = x[c, oh * sh - ph + i, start:w:sw]
                    inside = dst[ow_lo:ow_hi]
                    for ow in range(ow_lo):
                        dst[ow] = 0.0
                    for k in range(ow_hi - ow_lo):
                        inside[k] = src[k]
                    for ow in range(ow_hi, wo):
                        dst[ow] = 0.0


@kernel(parallel=False)
def col2im_strided(dcols, dx, kh, kw, sh, sw, ph, pw, ho, wo):
    """dx (C, H, W) = sum of the dcols entries at the positions im2col_strided read."""
    channels, h, w = dx.shape
    for c in range(channels):
        plane = dx[c]
        for r in range(h):
            for q in range(w):
                plane[r, q] = 0.0
        for i in range(kh):
            oh_lo, oh_hi = valid_output_range(ho, h, sh, ph, i)
            for j in range(kw):
                ow_lo, ow_hi = valid_output_range(wo, w, sw, pw, j)
                row = dcols[(c * kh + i) * kw + j]
                start = ow_lo * sw - pw + j
                for oh in range(oh_lo, oh_hi):
                    src = row[oh * wo + ow_lo : oh * wo + ow_hi]
                    dst = plane[oh * sh - ph + i, start:w:sw]
                    for k in range(ow_hi - ow_lo):
                        dst[k] += src[k]


@kernel(parallel=False)
def lower_sample(x, xpad, cols, kh, kw, sh, sw, ph, pw, ho, wo, wide):
    """cols = im2col of one sample, wide (stride 1, through xpad) or window by window."""
    if wide:
        pad_sample(x, xpad, ph, pw)
        im2col_wide(xpad, cols, kh, kw, x.shape[1] + 2 * ph, x.shape[2] + 2 * pw)
    else:
        im2col_strided(x, cols, kh, kw, sh, sw, ph, pw, ho, wo)


@kernel(parallel=False)
def raise_sample(dcols, dxpad, dx, kh, kw, sh, sw, ph, pw, ho, wo, wide):
    """dx = col2im of one sample's column gradient (the inverse pattern of lower_sample)."""
    if wide:
        col2im_wide(dcols, dxpad, dx, kh, kw, ph, pw)
    else:
        col2im_strided(dcols, dx, kh, kw, sh, sw, ph, pw, ho, wo)


@kernel(parallel=False)
def store_output(product, bias, y, relu):
    """y (O, Ho, Wo) = product (O, Ho*pitch) without the garbage columns, plus bias;
    rectified (max(0, .)) when ``relu`` (a fused ReLU)."""
    outputs, ho, wo = y.shape
    pitch = product.shape[1] // ho
    for o in range(outputs):
        shift = bias[o]
        for oh in range(ho):
            src = product[o, oh * pitch : oh * pitch + wo]
            dst = y[o, oh]
            if relu:
                for ow in range(wo):
                    v = src[ow] + shift
                    dst[ow] = v if v > 0 else 0.0
            else:
                for ow in range(wo):
                    dst[ow] = src[ow] + shift


@kernel(parallel=False)
def load_channel_grad(dy, y, relu, rows, o, first, pitch):
    """rows[o, first + oh*pitch + ow] = dy (Ho, Wo) of one output channel, zero in the
    garbage columns, masked where the (rectified) output y is 0 with a fused ``relu``;
    returns the sum of what it stored.  ``rows`` is the whole (C-contiguous) matrix,
    indexed directly: a column slice of it is typed with unknown strides, and the
    masked loop through one was ~15x slower (a gather instead of vector loads)."""
    ho, wo = dy.shape
    zero = dy.dtype.type(0)  # of the array's type, as in the Winograd kernels (a float64 literal widens the select)
    total = 0.0
    for oh in range(ho):
        src = dy[oh]
        start = first + oh * pitch
        if relu:
            alive = y[oh]
            for ow in range(wo):
                g = src[ow] if alive[ow] > 0 else zero
                rows[o, start + ow] = g
                total += g
        else:
            for ow in range(wo):
                rows[o, start + ow] = src[ow]
                total += src[ow]
        for ow in range(wo, pitch):
            rows[o, start + ow] = zero
    return total


@kernel(parallel=False)
def load_output_grad(dy, y, relu, rows, rows_t, dbias, transpose):
    """rows (O, Ho*pitch) = dy (O, Ho, Wo) with zero garbage columns, rows_t (Ho*pitch, O)
    its transpose (when ``transpose``); dbias += the sums of dy.  With a fused ``relu``, dy
    is first masked where the (rectified) output y is 0, as the ReLU's backward would have done."""
    outputs, ho = dy.shape[0], dy.shape[1]
    pitch = rows.shape[1] // ho
    for o in range(outputs):
        dbias[o] += load_channel_grad(dy[o], y[o], relu, rows, o, 0, pitch)
    if transpose:
        for p in range(rows.shape[1]):
            dst = rows_t[p]
            for o in range(outputs):
                dst[o] = rows[o, p]


@kernel(parallel=False)
def add_into(dst, src):
    """dst += src (2-D, same shape)."""
    for r in range(dst.shape[0]):
        d = dst[r]
        s = src[r]
        for k in range(d.size):
            d[k] += s[k]


# -- batch kernels -----------------------------------------------------------------
def conv_forward(x, weight, bias, relu, y, xpad, cols, product, kh, kw, sh, sw, ph, pw, ho, wo, wide):
    """y[b] = weight @ im2col(x[b]) + bias (rectified if ``relu``) for every sample; scratch indexed by thread."""
    for b in prange(x.shape[0]):
        slot = numba.get_thread_id()
        lower_sample(x[b], xpad[slot], cols[slot], kh, kw, sh, sw, ph, pw, ho, wo, wide)
        np.dot(weight, cols[slot], product[slot])
        store_output(product[slot], bias, y[b], relu)


def conv_backward(x, dy, y, relu, weight_t, dx, xpad, cols, rows, rows_t, dweight_t_parts, dweight_product, dbias_parts,
                  kh, kw, sh, sw, ph, pw, ho, wo, wide, input_grad, weight_grad):
    """dx[b] = col2im(weight.T @ dy[b]) if ``input_grad``; per-thread parts of dweight.T += cols @ dy[b].T
    and dbias if ``weight_grad`` (a frozen layer, as in Deep Dream, skips that product and the lowering).

    The weight gradient is formed transposed, ``cols (K, P) @ rows_t (P, O)``, from a
    transposed copy of dy: OpenBLAS runs that plain product 20-40% faster than
    ``rows @ cols.T`` with its transposed operand (measured on the 32->32 and 64->64
    layers of the reference net), and the copy is O*P elements against O*K*P products.
    """
    for b in prange(x.shape[0]):
        slot = numba.get_thread_id()
        load_output_grad(dy[b], y[b], relu, rows[slot], rows_t[slot], dbias_parts[slot], True)
        if weight_grad:
            lower_sample(x[b], xpad[slot], cols[slot], kh, kw, sh, sw, ph, pw, ho, wo, wide)
            np.dot(cols[slot], rows_t[slot], dweight_product[slot])
            add_into(dweight_t_parts[slot], dweight_product[slot])
        if input_grad:
            np.dot(weight_t, rows[slot], cols[slot])  # the column gradient reuses the column buffer
            raise_sample(cols[slot], xpad[slot], dx[b], kh, kw, sh, sw, ph, pw, ho, wo, wide)


conv_forward_parallel = kernel(conv_forward)
conv_backward_parallel = kernel(conv_backward)


# -- whole-batch lowering: one multi-threaded product per pass ---------------------
# The batch's columns sit side by side in one (K, N*P) matrix, sample b in columns
# [b*P, (b+1)*P); the kernels below lower, store and raise the samples in parallel,
# and the products between them are single numpy calls on all cores.  This is the
# variant for batches smaller than the thread count (batch 1 in Deep Dream and style
# transfer), and a candidate the tuner measures against per-sample lowering.
@kernel
def lower_batch(x, xpad, cols, kh, kw, sh, sw, ph, pw, ho, wo, wide):
    """Parallel over (sample, channel): each channel's kh*kw rows of cols are
    independent, so a batch of one still uses every thread.  xpad: one padded plane
    per thread."""
    n, channels = x.shape[0], x.shape[1]
    per = cols.shape[1] // n
    taps = kh * kw
    for task in prange(n * channels):
        b = task // channels
        c = task - b * channels
        slot = numba.get_thread_id()
        lower_sample(x[b, c:c + 1], xpad[slot], cols[c * taps:(c + 1) * taps, b * per:(b + 1) * per],
                     kh, kw, sh, sw, ph, pw, ho, wo, wide)


@kernel
def store_batch(product, bias, y, relu):
    per = product.shape[1] // y.shape[0]
    for b in prange(y.shape[0]):
        store_output(product[:, b * per:(b + 1) * per], bias, y[b], relu)


@kernel
def load_batch_grad(dy, y, relu, rows, unused_rows_t, dbias_parts):
    """load_output_grad of every sample into its columns of rows, parallel over
    (sample, channel), so a batch of one still uses every thread."""
    n, outputs, ho = dy.shape[0], dy.shape[1], dy.shape[2]
    per = rows.shape[1] // n
    for task in prange(n * outputs):
        b = task // outputs
        o = task - b * outputs
        slot = numba.get_thread_id()
        dbias_parts[slot, o] += load_channel_grad(dy[b, o], y[b, o], relu, rows, o, b * per, per // ho)


@kernel
def raise_batch(dcols, xpad, dx, kh, kw, sh, sw, ph, pw, ho, wo, wide):
    """col2im of every (sample, channel) in parallel: a channel's rows of dcols add
    only into its own plane of dx (and of its thread's padded plane xpad)."""
    n, channels = dx.shape[0], dx.shape[1]
    per = dcols.shape[1] // n
    taps = kh * kw
    for task in prange(n * channels):
        b = task // channels
        c = task - b * channels
        slot = numba.get_thread_id()
        raise_sample(dcols[c * taps:(c + 1) * taps, b * per:(b + 1) * per], xpad[slot], dx[b, c:c + 1],
                     kh, kw, sh, sw, ph, pw, ho, wo, wide)


PER_SAMPLE, WHOLE_BATCH, BANDED = "per-sample", "whole-batch", "banded"


# -- banded lowering (stride 1): bands of output rows, each in its core's cache ----
# Band t of sample b covers output rows [t*band, min((t+1)*band, Ho)).  In the wide
# layout its columns are the slice [r0*Wp, r1*Wp) of the sample's column matrix,
# and row (c, i, j) of that block is the padded planes from c*Hp*Wp + (i + r0)*Wp + j:
# im2col_wide on the padded sample shifted by r0*Wp.  Each thread's scratch is flat
# so that a band's blocks are contiguous (rows x length) arrays for np.dot.
@kernel
def pad_batch(x, xpad, ph, pw):
    """xpad[b] (flat) = sample b zero-padded as pad_sample does, parallel over (sample, channel)."""
    n, channels, h, w = x.shape
    plane = (h + 2 * ph) * (w + 2 * pw)
    for task in prange(n * channels):
        b = task // channels
        c = task - b * channels
        pad_sample(x[b, c:c + 1], xpad[b, c * plane:(c + 1) * plane], ph, pw)
        if c == channels - 1:
            for k in range(channels * plane, xpad.shape[1]):  # the tail the last wide slice reads
                xpad[b, k] = 0.0


@kernel
def unpad_batch(dxpad, dx, ph, pw):
    n, channels, h, w = dx.shape
    plane = (h + 2 * ph) * (w + 2 * pw)
    for task in prange(n * channels):
        b = task // channels
        c = task - b * channels
        unpad_sample(dxpad[b, c * plane:(c + 1) * plane], dx[b, c:c + 1], ph, pw)


@kernel(parallel=False)
def band_bounds(task, bands, band, ho):
    """(sample, first output row, end row) of band task number ``task``."""
    b = task // bands
    r0 = (task - b * bands) * band
    return b, r0, min(r0 + band, ho)


@kernel(parallel=False)
def parity_bands(n, bands, parity):
    """How many bands of one parity (0: even, 1: odd) ``n`` images of ``bands`` bands have."""
    return n * ((bands + 1 - parity) // 2)


@kernel(parallel=False)
def parity_band_bounds(index, bands, parity, band, ho):
    """(sample, first output row, end row) of band number ``index`` among those of one parity."""
    same_parity = (bands + 1 - parity) // 2
    b = index // same_parity
    return band_bounds(b * bands + 2 * (index - b * same_parity) + parity, bands, band, ho)


@kernel
def conv_forward_banded(xpad, weight, bias, relu, y, cols, product, kh, kw, hp, wp, band):
    """y = weight @ im2col(x) + bias (rectified if ``relu``), band by band in parallel.
    xpad: the padded batch (pad_batch); cols, product: flat scratch per thread."""
    n, outputs, ho, _ = y.shape
    rows = weight.shape[1]
    bands = (ho + band - 1) // band
    for task in prange(n * bands):
        b, r0, r1 = band_bounds(task, bands, band, ho)
        slot = numba.get_thread_id()
        length = (r1 - r0) * wp
        block = cols[slot, :rows * length].reshape((rows, length))
        out = product[slot, :outputs * length].reshape((outputs, length))
        im2col_wide(xpad[b, r0 * wp:], block, kh, kw, hp, wp)
        np.dot(weight, block, out)
        store_output(out, bias, y[b, :, r0:r1], relu)


@kernel
def conv_backward_banded(xpad, dy, y, relu, weight_t, dxpad, cols, grad_rows, rows_t, dweight_t_parts,
                         dweight_product, dbias_parts, kh, kw, hp, wp, band, parity, input_grad, weight_grad):
    """The bands of one ``parity`` (0: even, 1: odd) of the backward pass: per-thread
    parts of dweight.T += cols @ dy.T and dbias (if ``weight_grad``), and the column
    gradient weight.T @ dy added into the padded input gradient dxpad (if
    ``input_grad``).  A band's scatter reaches kh - 1 rows into the next band's and
    kw - 1 elements further, so the caller runs parity 0, then 1, with ``band >= kh``:
    bands of one parity never touch the same element, and each element's sums come in
    a fixed order.  (With kh - 1 rows, the kw - 1 elements past them, where the band
    adds the zeros of its garbage columns, are the first ones the band after next
    updates: two threads adding into one element at once can lose a sum.)"""
    n, outputs, ho, _ = dy.shape
    rows = weight_t.shape[0]
    bands = (ho + band - 1) // band
    for index in prange(parity_bands(n, bands, parity)):
        b, r0, r1 = parity_band_bounds(index, bands, parity, band, ho)
        slot = numba.get_thread_id()
        length = (r1 - r0) * wp
        block = cols[slot, :rows * length].reshape((rows, length))
        g = grad_rows[slot, :outputs * length].reshape((outputs, length))
        g_t = rows_t[slot, :length * outputs].reshape((length, outputs))
        load_output_grad(dy[b, :, r0:r1], y[b, :, r0:r1], relu, g, g_t, dbias_parts[slot], weight_grad)
        if weight_grad:
            im2col_wide(xpad[b, r0 * wp:], block, kh, kw, hp, wp)
            np.dot(block, g_t, dweight_product[slot])
            add_into(dweight_t_parts[slot], dweight_product[slot])
        if input_grad:
            np.dot(weight_t, g, block)  # the column gradient reuses the column block
            scatter_wide(block, dxpad[b, r0 * wp:], kh, kw, hp, wp)


#: Bytes of one band's column block: small enough for a core's L2 cache with room
#: for the weight and output blocks (1-2 MB per core on recent x86 server parts).
BAND_BYTES = 1 << 19


def band_rows(kernel_height, column_rows, wide_width, itemsize, ho):
    """Output rows per band: the block near BAND_BYTES, never fewer than kh rows
    (see conv_backward_banded), never more than the image has."""
    target = BAND_BYTES // max(1, column_rows * wide_width * itemsize)
    return int(min(ho, max(kernel_height, target)))
