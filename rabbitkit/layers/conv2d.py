"""2-D convolution (cross-correlation, as in PyTorch and Caffe) on NCHW images.

The CPU path lowers each sample to a matrix product (im2col):
``Y (O, P) = W (O, K) @ cols (K, P)`` with ``K = C*kh*kw`` and ``P`` output
positions, so the product lands directly in the sample's NCHW output, and the
backward pass is ``dW += dY @ cols.T`` (formed as ``(cols @ dY.T).T``, see
:func:`conv_backward`) and ``dcols = W.T @ dY`` followed by col2im.  One Numba
kernel per pass runs the whole batch: parallel over samples, each thread lowers
its sample into its own scratch and calls single-threaded BLAS on it, so the
column matrix never leaves the core that wrote it and Numba's and OpenBLAS's thread pools never compete.
The other variant lowers the whole batch into one column matrix and makes each
product one multi-threaded numpy call: a batch smaller than the thread count
(batch 1 in Deep Dream and style transfer) always runs so, and for larger
batches :mod:`rabbitkit.backend.tuning` measures both once per machine and shape.

Stride-1 convolutions use a "wide" lowering: the sample is zero-padded once,
and each row of ``cols`` is then one contiguous slice of the padded planes,
computed on a grid ``Wp = W + 2*pw`` columns wide.  The extra ``Wp - Wo``
columns per output row are garbage that the output store skips (and whose
gradient is zero), trading a few percent of extra products for copies that run
at memory speed.  Other strides gather window by window.

Inner loops index 1-D views with ``range`` counters: Numba then knows the
index is non-negative, drops its negative-index wraparound check and
vectorises the loop (about 10x faster than indexing with computed offsets).
"""
import math

import numba
import numpy as np
from numba import prange

from ..backend.cpu import SINGLE_THREADED_BLAS, kernel
from ..backend.cuda import REDUCE_THREADS, block_reduce_sum, cuda_device, cuda_kernel
from ..errors import ConfigError
from ..hookspecs import hookimpl
from .base import Layer

cuda = None  # numba.cuda, bound on the first CUDA launch


def pair(value, name):
    """``3 -> (3, 3)``; ``(3, 5)`` stays; anything else is a ConfigError."""
    if isinstance(value, (int, np.integer)):
        return int(value), int(value)
    try:
        first, second = value
        return int(first), int(second)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be an int or an (h, w) pair, got {value!r}") from None


def conv_output_size(size, kernel_size, stride, padding):
    """Output length of a sliding window along one axis (floor mode, as PyTorch)."""
    return (size + 2 * padding - kernel_size) // stride + 1


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
def pad_sample(x, xpad, ph, pw):
    """xpad (flat) = the planes of x (C, H, W) zero-padded to (H + 2ph) x (W + 2pw), then zeros."""
    channels, h, w = x.shape
    hp = h + 2 * ph
    wp = w + 2 * pw
    for k in range(xpad.size):
        xpad[k] = 0.0
    for c in range(channels):
        for r in range(h):
            start = (c * hp + r + ph) * wp + pw
            dst = xpad[start : start + w]
            src = x[c, r]
            for q in range(w):
                dst[q] = src[q]


@kernel(parallel=False)
def im2col_wide(xpad, cols, kh, kw, hp, wp):
    """Row (c, i, j) of cols (K, Ho*Wp) = the padded planes from offset c*Hp*Wp + i*Wp + j."""
    length = cols.shape[1]
    channels = cols.shape[0] // (kh * kw)
    for c in range(channels):
        for i in range(kh):
            for j in range(kw):
                start = c * hp * wp + i * wp + j
                src = xpad[start : start + length]
                dst = cols[(c * kh + i) * kw + j]
                for k in range(length):
                    dst[k] = src[k]


@kernel(parallel=False)
def col2im_wide(dcols, dxpad, dx, kh, kw, ph, pw):
    """dx (C, H, W) = sum of the dcols rows added back where im2col_wide read them."""
    channels, h, w = dx.shape
    hp = h + 2 * ph
    wp = w + 2 * pw
    length = dcols.shape[1]
    for k in range(dxpad.size):
        dxpad[k] = 0.0
    for c in range(channels):
        for i in range(kh):
            for j in range(kw):
                start = c * hp * wp + i * wp + j
                dst = dxpad[start : start + length]
                src = dcols[(c * kh + i) * kw + j]
                for k in range(length):
                    dst[k] += src[k]
        for r in range(h):
            start = (c * hp + r + ph) * wp + pw
            src = dxpad[start : start + w]
            dst = dx[c, r]
            for q in range(w):
                dst[q] = src[q]


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
def load_output_grad(dy, y, relu, rows, rows_t, dbias, transpose):
    """rows (O, Ho*pitch) = dy (O, Ho, Wo) with zero garbage columns, rows_t (Ho*pitch, O)
    its transpose (when ``transpose``); dbias += the sums of dy.  With a fused ``relu``, dy
    is first masked where the (rectified) output y is 0, as the ReLU's backward would have done."""
    outputs, ho, wo = dy.shape
    pitch = rows.shape[1] // ho
    for o in range(outputs):
        total = 0.0
        for oh in range(ho):
            dst = rows[o, oh * pitch : (oh + 1) * pitch]
            src = dy[o, oh]
            if relu:
                alive = y[o, oh]
                for ow in range(wo):
                    g = src[ow] if alive[ow] > 0 else 0.0
                    dst[ow] = g
                    total += g
            else:
                for ow in range(wo):
                    dst[ow] = src[ow]
                    total += src[ow]
            for ow in range(wo, pitch):
                dst[ow] = 0.0
        dbias[o] += total
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
    per = rows.shape[1] // dy.shape[0]
    for b in prange(dy.shape[0]):
        slot = numba.get_thread_id()
        load_output_grad(dy[b], y[b], relu, rows[:, b * per:(b + 1) * per], unused_rows_t, dbias_parts[slot], False)


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


PER_SAMPLE, WHOLE_BATCH = "per-sample", "whole-batch"


# -- CUDA kernels ------------------------------------------------------------------
# The CUDA path lowers a chunk of samples at once to one product on the backend's
# GEMM: ``product (O, B*P) = W (O, K) @ cols (K, B*P)``, column ``b*P + p`` for
# sample b of the chunk and output position p.  Backward: ``dW += rows @ cols.T``
# and ``dcols = W.T @ rows`` (``rows`` = dy of the chunk as (O, B*P)), then col2im
# as a *gather*: each input pixel sums the column entries that read it, in a fixed
# order, so dx needs no atomics and is deterministic.  Every kernel is a
# grid-stride loop over its output, consecutive threads on consecutive positions.

@cuda_device
def window_target(index, stride, padding, offset, size_out):
    """The output position whose window reads input ``index`` at tap ``offset``
    (``o * stride - padding + offset == index``), or -1 if none does."""
    t = index + padding - offset
    if t < 0 or t % stride != 0:
        return -1
    o = t // stride
    return o if o < size_out else -1


@cuda_device
def masked_gradient(g, y, relu):
    """dy through a fused ReLU: 0 where the rectified output ``y`` is 0."""
    if relu and not y > 0:
        return 0.0
    return g


@cuda_kernel
def im2col_cuda(x, cols, first, kh, kw, sh, sw, ph, pw, ho, wo):
    """cols (K, B*P): row (c, i, j), column (b, oh, ow) = x[first + b, c, oh*sh - ph + i, ow*sw - pw + j] or 0."""
    height = x.shape[2]
    width = x.shape[3]
    columns = cols.shape[1]
    positions = ho * wo
    taps = kh * kw
    for e in range(cuda.grid(1), cols.size, cuda.gridsize(1)):
        row = e // columns
        column = e - row * columns
        b = column // positions
        p = column - b * positions
        oh = p // wo
        ow = p - oh * wo
        c = row // taps
        tap = row - c * taps
        i = tap // kw
        j = tap - i * kw
        r = oh * sh - ph + i
        q = ow * sw - pw + j
        if 0 <= r < height and 0 <= q < width:
            cols[row, column] = x[first + b, c, r, q]
        else:
            cols[row, column] = 0


@cuda_kernel
def col2im_cuda(dcols, dx, first, count, kh, kw, sh, sw, ph, pw, ho, wo):
    """dx[first:first+count] (C, H, W each) = the sum of the dcols entries im2col_cuda took from each pixel."""
    channels = dx.shape[1]
    height = dx.shape[2]
    width = dx.shape[3]
    plane = height * width
    positions = ho * wo
    for e in range(cuda.grid(1), count * channels * plane, cuda.gridsize(1)):
        b = e // (channels * plane)
        rest = e - b * channels * plane
        c = rest // plane
        rest -= c * plane
        r = rest // width
        q = rest - r * width
        acc = 0.0
        for i in range(kh):
            oh = window_target(r, sh, ph, i, ho)
            if oh >= 0:
                for j in range(kw):
                    ow = window_target(q, sw, pw, j, wo)
                    if ow >= 0:
                        acc += dcols[(c * kh + i) * kw + j, b * positions + oh * wo + ow]
        dx[first + b, c, r, q] = acc


@cuda_kernel
def store_output_cuda(product, bias, y, first, relu):
    """y[first + b, o, p] = product[o, b*P + p] + bias[o] (y as (N, O, P)), rectified if ``relu``."""
    columns = product.shape[1]
    positions = y.shape[2]
    for e in range(cuda.grid(1), product.size, cuda.gridsize(1)):
        o = e // columns
        column = e - o * columns
        b = column // positions
        p = column - b * positions
        v = product[o, column] + bias[o]
        if relu and not v > 0:
            v = 0
        y[first + b, o, p] = v


@cuda_kernel
def load_output_grad_cuda(dy, y, relu, rows, first):
    """rows[o, b*P + p] = dy[first + b, o, p] (dy and y as (N, O, P)), masked by a fused ReLU."""
    columns = rows.shape[1]
    positions = dy.shape[2]
    for e in range(cuda.grid(1), rows.size, cuda.gridsize(1)):
        o = e // columns
        column = e - o * columns
        b = column // positions
        p = column - b * positions
        rows[o, column] = masked_gradient(dy[first + b, o, p], y[first + b, o, p], relu)


@cuda_kernel
def channel_sums_cuda(dy, y, relu, dbias):
    """dbias[o] += sum over (n, p) of dy[n, o, p] (masked by a fused ReLU): block o, fixed-order tree."""
    partial = cuda.shared.array(shape=REDUCE_THREADS, dtype=np.float64)
    o = cuda.blockIdx.x
    positions = dy.shape[2]
    acc = np.float64(0.0)
    for e in range(cuda.threadIdx.x, dy.shape[0] * positions, cuda.blockDim.x):
        n = e // positions
        p = e - n * positions
        acc += masked_gradient(dy[n, o, p], y[n, o, p], relu)
    total = block_reduce_sum(partial, acc)
    if cuda.threadIdx.x == 0:
        dbias[o] += total


class Conv2D(Layer):
    """2-D convolution on (N, C, H, W); ``weight`` is (out, in, kh, kw) as in PyTorch.

    ``kernel_size``, ``stride`` and ``padding`` take an int or an (h, w) pair;
    padding is zeros.  Output size per axis: ``(size + 2*padding - kernel) // stride + 1``.
    """

    absorbs_relu = True  # store_output rectifies, load_output_grad masks (see Sequential)

    skips_frozen_grads = True  # both backward paths skip a frozen layer's weight products

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True, dtype=np.float32):
        super().__init__(dtype)
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.kernel_size = pair(kernel_size, "kernel_size")
        self.stride = pair(stride, "stride")
        self.padding = pair(padding, "padding")
        if self.in_channels < 1 or self.out_channels < 1:
            raise ConfigError(f"Conv2D channels must be positive, got {in_channels} -> {out_channels}")
        if min(self.kernel_size) < 1 or min(self.stride) < 1 or min(self.padding) < 0:
            raise ConfigError(
                f"Conv2D needs kernel_size >= 1, stride >= 1, padding >= 0; got "
                f"{self.kernel_size}, {self.stride}, {self.padding}"
            )
        self.has_bias = bool(bias)
        kh, kw = self.kernel_size
        fan_in = self.in_channels * kh * kw
        bound = 1.0 / math.sqrt(fan_in)  # PyTorch's default; runs re-initialise by name
        self.add_param("weight", self.rng.uniform(-bound, bound, (self.out_channels, self.in_channels, kh, kw)))
        if self.has_bias:
            self.add_param("bias", self.rng.uniform(-bound, bound, self.out_channels), role="bias")

    # -- shapes ---------------------------------------------------------------------
    def output_shape(self, input_shape):
        if len(input_shape) != 3:
            raise ConfigError(f"Conv2D expects a (C, H, W) input shape, got {tuple(input_shape)}")
        channels, height, width = input_shape
        if channels != self.in_channels:
            raise ConfigError(f"Conv2D expects {self.in_channels} input channels, got {channels}")
        ho = conv_output_size(height, self.kernel_size[0], self.stride[0], self.padding[0])
        wo = conv_output_size(width, self.kernel_size[1], self.stride[1], self.padding[1])
        if ho < 1 or wo < 1:
            raise ConfigError(
                f"Conv2D kernel {self.kernel_size} with padding {self.padding} does not fit a {height}x{width} input"
            )
        return (self.out_channels, ho, wo)

    def flops(self, input_shape):
        _, ho, wo = self.output_shape(input_shape)
        kh, kw = self.kernel_size
        return 2 * self.out_channels * self.in_channels * kh * kw * ho * wo

    # -- CPU ------------------------------------------------------------------------
    #: Force a CPU variant (PER_SAMPLE or WHOLE_BATCH) instead of the tuner's choice.
    algorithm = None

    def _plan(self, x):
        """Geometry arguments of the kernels and the shape of one sample's column matrix."""
        if x.ndim != 4:
            raise ConfigError(f"Conv2D expects (N, C, H, W) input, got shape {tuple(x.shape)}")
        batch, channels, height, width = x.shape
        _, ho, wo = self.output_shape(x.shape[1:])
        kh, kw = self.kernel_size
        sh, sw = self.stride
        ph, pw = self.padding
        wide = sh == 1 and sw == 1
        pitch = width + 2 * pw if wide else wo
        # Padded planes plus the kw - 1 elements the last wide slice runs past them.
        padded = channels * (height + 2 * ph) * (width + 2 * pw) + kw - 1 if wide else 1
        return (kh, kw, sh, sw, ph, pw, ho, wo, wide), padded, channels * kh * kw, ho * pitch

    def _plane_scratch(self, padded, x, geometry):
        """One padded plane per thread: the whole-batch kernels pad a channel at a time."""
        kw, wide = geometry[1], geometry[8]
        plane = (padded - (kw - 1)) // x.shape[1] + kw - 1 if wide else 1
        return scratch("conv_xpad_plane", (numba.get_num_threads(), plane), self.dtype)

    def _variant(self, direction, x, run):
        """Which CPU variant runs ``direction`` at x's shape: forced, measured once per
        machine (:mod:`rabbitkit.backend.tuning`), or the default.  ``run(name)``
        executes a variant without touching ``grads``."""
        from ..backend import tuning

        if self.algorithm is not None:
            return self.algorithm
        threads = numba.get_num_threads()
        if not (x.shape[0] >= threads > 1 and SINGLE_THREADED_BLAS.available):
            return WHOLE_BATCH  # fewer samples than threads: per-sample lowering would idle cores
        shape = (tuple(x.shape), self.out_channels, self.kernel_size, self.stride, self.padding, x.dtype.name,
                 self.fused_relu, self.needs_input_grad, self.weight_grads_wanted)
        return tuning.choose(f"conv2d.{direction}", shape, {name: (lambda name=name: run(name))
                                                            for name in (PER_SAMPLE, WHOLE_BATCH)},
                             default=PER_SAMPLE)

    def _bias(self):
        return self.params["bias"] if self.has_bias else np.zeros(self.out_channels, dtype=self.dtype)

    def forward_cpu(self, x, training):
        self._x = x
        geometry, padded, rows, positions = self._plan(x)
        y = np.empty((x.shape[0], self.out_channels, geometry[6], geometry[7]), dtype=self.dtype)
        self._y = y if self.fused_relu else None  # the fused ReLU's gradient mask

        def run(variant):
            weight = self.params["weight"].reshape(self.out_channels, -1)
            if variant == PER_SAMPLE:
                slots = numba.get_num_threads()
                xpad = scratch("conv_xpad", (slots, padded), self.dtype)
                cols = scratch("conv_cols", (slots, rows, positions), self.dtype)
                product = scratch("conv_rows", (slots, self.out_channels, positions), self.dtype)
                with SINGLE_THREADED_BLAS:
                    conv_forward_parallel(x, weight, self._bias(), self.fused_relu, y, xpad, cols, product, *geometry)
            else:
                cols = scratch("conv_cols_all", (rows, x.shape[0] * positions), self.dtype)
                product = scratch("conv_product_all", (self.out_channels, cols.shape[1]), self.dtype)
                lower_batch(x, self._plane_scratch(padded, x, geometry), cols, *geometry)
                np.dot(weight, cols, out=product)
                store_batch(product, self._bias(), y, self.fused_relu)

        run(self._variant("forward", x, run))
        return y

    def backward_cpu(self, dy):
        x = self._x
        geometry, padded, rows, positions = self._plan(x)
        dy = dy.reshape(x.shape[0], self.out_channels, geometry[6], geometry[7])
        # The first layer's input gradient is nobody's business (see Layer.skip_input_grad).
        dx = np.empty_like(x) if self.needs_input_grad else np.empty((x.shape[0], 0, 0, 0), dtype=self.dtype)
        relu = self._y is not None
        mask_source = self._y if relu else dy  # unread without a fused ReLU; any array of dy's type will do
        weight_t = np.ascontiguousarray(self.params["weight"].reshape(self.out_channels, -1).T)
        slots = numba.get_num_threads()

        def run(variant):
            """dx (if wanted) and (dweight (O, K) or None, dbias) of this backward, grads untouched."""
            dbias_parts = scratch("conv_dbias_parts", (slots, self.out_channels), self.dtype)
            dbias_parts.fill(0)
            if variant == PER_SAMPLE:
                xpad = scratch("conv_xpad", (slots, padded), self.dtype)
                dweight_t_parts = scratch("conv_dweight_t_parts", (slots, rows, self.out_channels), self.dtype)
                dweight_t_parts.fill(0)
                dweight_product = scratch("conv_dweight_product", dweight_t_parts.shape, self.dtype)
                cols = scratch("conv_cols", (slots, rows, positions), self.dtype)
                out_rows = scratch("conv_rows", (slots, self.out_channels, positions), self.dtype)
                rows_t = scratch("conv_rows_t", (slots, positions, self.out_channels), self.dtype)
                with SINGLE_THREADED_BLAS:
                    conv_backward_parallel(x, dy, mask_source, relu, weight_t, dx, xpad, cols, out_rows, rows_t,
                                           dweight_t_parts, dweight_product, dbias_parts, *geometry,
                                           self.needs_input_grad, self.weight_grads_wanted)
                dweight = dweight_t_parts.sum(axis=0).T if self.weight_grads_wanted else None
                return dweight, dbias_parts.sum(axis=0)
            out_rows = scratch("conv_rows_all", (self.out_channels, x.shape[0] * positions), self.dtype)
            load_batch_grad(dy, mask_source, relu, out_rows, np.empty((1, 1), self.dtype), dbias_parts)
            cols = scratch("conv_cols_all", (rows, out_rows.shape[1]), self.dtype)
            dweight = None
            xpad = self._plane_scratch(padded, x, geometry)
            if self.weight_grads_wanted:
                lower_batch(x, xpad, cols, *geometry)
                dweight = np.dot(out_rows, cols.T)
            if self.needs_input_grad:
                np.dot(weight_t, out_rows, out=cols)  # the column gradient reuses the column buffer
                raise_batch(cols, xpad, dx, *geometry)
            return dweight, dbias_parts.sum(axis=0)

        dweight, dbias = run(self._variant("backward", x, run))
        if self.weight_grads_wanted:
            self.grads["weight"].reshape(self.out_channels, -1)[...] += dweight
            if self.has_bias:
                self.grads["bias"] += dbias
        return dx if self.needs_input_grad else None

    # -- CUDA -----------------------------------------------------------------------
    #: Elements of the column matrix per chunk of samples (128 MiB in float32): a
    #: chunk is as many samples as fit, so the GEMM gets B*P columns to spread over
    #: the GPU while the scratch stays bounded.  Tests lower it to exercise chunking.
    cuda_cols_budget = 1 << 25

    def _cuda_plan(self, x):
        if x.ndim != 4:
            raise ConfigError(f"Conv2D expects (N, C, H, W) input, got shape {tuple(x.shape)}")
        _, ho, wo = self.output_shape(tuple(x.shape[1:]))
        kh, kw = self.kernel_size
        rows = self.in_channels * kh * kw
        chunk = max(1, min(x.shape[0], self.cuda_cols_budget // max(1, rows * ho * wo)))
        geometry = (kh, kw, *self.stride, *self.padding, ho, wo)
        return geometry, rows, ho * wo, chunk

    def _cuda_chunks(self, x, rows, positions, chunk, geometry):
        """Yield (first, count, cols) per chunk, cols = the chunk's im2col in device scratch."""
        for first in range(0, x.shape[0], chunk):
            count = min(chunk, x.shape[0] - first)
            cols = self.backend.scratch("conv_cols", (rows, count * positions), self.dtype)
            im2col_cuda.launch(cols.size, x, cols, first, *geometry)
            yield first, count, cols

    def _cuda_bias(self):
        if self.has_bias:
            return self.params["bias"]
        if getattr(self, "_zero_bias", None) is None:
            self._zero_bias = self.backend.zeros(self.out_channels, self.dtype)
        return self._zero_bias

    def forward_cuda(self, x, training):
        self._x = x
        geometry, rows, positions, chunk = self._cuda_plan(x)
        ho, wo = geometry[6], geometry[7]
        y = self.backend.empty((x.shape[0], self.out_channels, ho, wo), self.dtype)
        y3 = y.reshape(x.shape[0], self.out_channels, positions)
        weight = self.params["weight"].reshape(self.out_channels, rows)
        bias = self._cuda_bias()
        relu = self.fused_relu
        self._y = y if relu else None
        for first, count, cols in self._cuda_chunks(x, rows, positions, chunk, geometry):
            product = self.backend.scratch("conv_product", (self.out_channels, count * positions), self.dtype)
            self.backend.gemm(weight, cols, product)
            store_output_cuda.launch(product.size, product, bias, y3, first, relu)
        return y

    def backward_cuda(self, dy):
        x = self._x
        geometry, rows, positions, chunk = self._cuda_plan(x)
        batch = x.shape[0]
        dy3 = dy.reshape(batch, self.out_channels, positions)
        relu = self._y is not None
        mask = self._y.reshape(batch, self.out_channels, positions) if relu else dy3
        weight = self.params["weight"].reshape(self.out_channels, rows)
        dweight = self.grads["weight"].reshape(self.out_channels, rows)
        if self.has_bias and self.weight_grads_wanted:
            channel_sums_cuda.launch_blocks(self.out_channels, dy3, mask, relu, self.grads["bias"])
        dx = self.backend.empty(x.shape, self.dtype) if self.needs_input_grad else None
        for first, count, cols in self._cuda_chunks(x, rows, positions, chunk, geometry):
            grad_rows = self.backend.scratch("conv_rows", (self.out_channels, count * positions), self.dtype)
            load_output_grad_cuda.launch(grad_rows.size, dy3, mask, relu, grad_rows, first)
            if self.weight_grads_wanted:
                self.backend.gemm(grad_rows, cols, dweight, trans_b=True, beta=1.0)
            if dx is not None:
                dcols = self.backend.scratch("conv_dcols", (rows, count * positions), self.dtype)
                self.backend.gemm(weight, grad_rows, dcols, trans_a=True)
                col2im_cuda.launch(count * x.shape[1] * x.shape[2] * x.shape[3], dcols, dx, first, count, *geometry)
        self.grads_zeroed = False
        return dx

    def extra_repr(self):
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, bias={self.has_bias}"
        )


@hookimpl
def rabbit_layers():
    return {"Conv2D": Conv2D}
