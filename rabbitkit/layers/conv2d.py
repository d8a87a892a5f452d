"""2-D convolution (cross-correlation, as in PyTorch and Caffe) on NCHW images.

The CPU path lowers each sample to a matrix product (im2col):
``Y (O, P) = W (O, K) @ cols (K, P)`` with ``K = C*kh*kw`` and ``P`` output
positions, so the product lands directly in the sample's NCHW output, and the
backward pass is ``dW += dY @ cols.T`` (formed as ``(cols @ dY.T).T``, see
:func:`conv_backward`) and ``dcols = W.T @ dY`` followed by col2im.  One Numba
kernel per pass runs the whole batch: parallel over samples, each thread lowers
its sample into its own scratch and calls single-threaded BLAS on it, so the
column matrix never leaves the core that wrote it and Numba's and OpenBLAS's thread pools never compete.
The whole-batch variant lowers the batch into one column matrix and makes each
product one multi-threaded numpy call; the banded variant (stride 1) splits each
image into bands of output rows, one per thread at a time, whose column blocks
stay in cache (see :mod:`rabbitkit.layers._conv_lowering`); the shifted variant (stride 1)
lowers nothing: one product per tap reads the padded input in place
(:mod:`rabbitkit.layers._conv_shifted`); 3x3 kernels at stride 1
also have Winograd's F(2x2, 3x3), 16 products of transformed tiles instead of one
lowered product, 2.25x fewer multiplications (:mod:`rabbitkit.layers._conv_winograd`);
the forward pass at stride 1 also has a channels-last lowering, the per-sample product
formed transposed where the BLAS packs its operands (:mod:`rabbitkit.layers._conv_channels_last`).
Per-sample lowering needs at least as many samples as threads;
:mod:`rabbitkit.backend.tuning` measures the variants that apply once per machine and
shape (batch 1 in Deep Dream and style transfer: whole-batch, banded, shifted, Winograd).

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

from ..backend.cpu import SINGLE_THREADED_BLAS
from ..backend.cuda import REDUCE_THREADS, block_reduce_sum, cuda_device, cuda_kernel
from ..errors import ConfigError
from ..hookspecs import hookimpl
from . import _conv_winograd as winograd
from ._conv_channels_last import CHANNELS_LAST, channels_last_weights, conv_forward_channels_last, padded_size
from ._conv_shifted import (
    SHIFTED,
    conv_backward_shifted,
    conv_forward_shifted,
    shifted_band_rows,
    tap_weights,
    weight_from_taps,
)
from ._conv_lowering import (  # noqa: F401
    BANDED,
    PER_SAMPLE,
    WHOLE_BATCH,
    band_rows,
    conv_backward_banded,
    conv_backward_parallel,
    conv_forward_banded,
    conv_forward_parallel,
    load_batch_grad,
    lower_batch,
    pad_batch,
    raise_batch,
    release_scratch,
    scratch,
    store_batch,
    unpad_batch,
    valid_output_range,
)
from .base import Layer

# Winograd F(2x2, 3x3) for 3x3 kernels at stride 1 (see rabbitkit.layers._conv_winograd):
# bands of tile rows per thread, or the whole batch's tiles in one matrix per tile element.
WINOGRAD, WINOGRAD_BATCH = "winograd", "winograd-batch"

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
    #: Force a CPU variant (PER_SAMPLE, WHOLE_BATCH, BANDED, SHIFTED, WINOGRAD,
    #: WINOGRAD_BATCH or CHANNELS_LAST) instead of the tuner's choice; BANDED, SHIFTED and
    #: CHANNELS_LAST apply to stride 1 only, the Winograd ones to 3x3 kernels at stride 1
    #: (other layers then run WHOLE_BATCH).  CHANNELS_LAST is a forward lowering: its
    #: backward pass runs PER_SAMPLE.
    algorithm = None

    #: Elements of the largest column matrix the whole-batch variant may lower, and of
    #: the transformed tiles of whole-batch Winograd (32 MiB in float32).  Above it only
    #: the variants with per-thread blocks run, and the scratch stays small: VGG's
    #: conv1_2 would need 29 M column elements at 224 px and 151 M (606 MB) at 512 px.
    #: Measured on style transfer at 512 px (AMD EPYC): with 64 M the step was no
    #: faster and its peak memory 1,677 MiB against 1,245 MiB with 8 M.
    whole_batch_column_budget = 1 << 23

    #: Input channels from which the tuner times the shifted variant: its products
    #: multiply over C (one tap at a time), and over the 3 channels of an RGB input
    #: that is far from BLAS speed (not worth the tuning time).
    shifted_min_channels = 8

    #: Input channels from which the tuner times the channels-last forward: its lowering
    #: copies runs of kw*C values, 9 with an RGB input, and there it measured 1.5x slower
    #: than per-sample lowering (AMD EPYC, Zen 3, 3->32 at 32 px).
    channels_last_min_channels = 8

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

    def _variant(self, direction, x, run, column_elements):
        """Which CPU variant runs ``direction`` at x's shape: forced, measured once per
        machine (:mod:`rabbitkit.backend.tuning`), or the default.  ``run(name)``
        executes a variant without touching ``grads``; ``column_elements``: the size of
        the batch's whole column matrix (what whole-batch lowering would allocate)."""
        from ..backend import tuning

        banded = self.stride == (1, 1) and SINGLE_THREADED_BLAS.available  # its threads each call BLAS
        tiled = banded and self.kernel_size == (3, 3)
        if self.algorithm is not None:
            unavailable = ((self.algorithm in (BANDED, SHIFTED, CHANNELS_LAST) and not banded)
                           or (self.algorithm in (WINOGRAD, WINOGRAD_BATCH) and not tiled))
            if unavailable:
                return WHOLE_BATCH
            return PER_SAMPLE if self.algorithm == CHANNELS_LAST and direction == "backward" else self.algorithm
        threads = numba.get_num_threads()
        if x.shape[0] >= threads > 1 and SINGLE_THREADED_BLAS.available:
            names, default = [PER_SAMPLE, WHOLE_BATCH], PER_SAMPLE
        else:  # fewer samples than threads: per-sample lowering would idle cores
            names, default = [WHOLE_BATCH], WHOLE_BATCH
        if banded:
            names.append(BANDED)
            if self.in_channels >= self.shifted_min_channels:
                names.append(SHIFTED)
            if (direction == "forward" and PER_SAMPLE in names
                    and self.in_channels >= self.channels_last_min_channels):
                names.append(CHANNELS_LAST)
            if column_elements > self.whole_batch_column_budget:
                names.remove(WHOLE_BATCH)  # not even for one timing: its scratch would stay allocated
                default = names[0]
        if tiled:
            names.append(WINOGRAD)
            th, tw, _, _ = winograd.tile_grid(*self.output_shape(x.shape[1:])[1:])
            if 16 * (self.in_channels + self.out_channels) * x.shape[0] * th * tw <= self.whole_batch_column_budget:
                names.append(WINOGRAD_BATCH)
        shape = (tuple(x.shape), self.out_channels, self.kernel_size, self.stride, self.padding, x.dtype.name,
                 self.fused_relu, self.needs_input_grad, self.weight_grads_wanted)
        return tuning.choose(f"conv2d.{direction}", shape, {name: (lambda name=name: run(name)) for name in names},
                             default=default, release=release_scratch)

    def _band_plan(self, x, geometry, rows):
        """(rows per band, padded height, padded width) of the banded variant."""
        kh, ph, pw, ho = geometry[0], geometry[4], geometry[5], geometry[6]
        hp, wp = x.shape[2] + 2 * ph, x.shape[3] + 2 * pw
        return band_rows(kh, rows, wp, self.dtype.itemsize, ho), hp, wp

    def _shifted_band_plan(self, x, geometry):
        """(rows per band, padded height, padded width) of the shifted variant."""
        kh, ph, pw, ho = geometry[0], geometry[4], geometry[5], geometry[6]
        hp, wp = x.shape[2] + 2 * ph, x.shape[3] + 2 * pw
        return shifted_band_rows(self.in_channels, self.out_channels, kh, wp, self.dtype.itemsize, ho), hp, wp

    def _padded_grad_tag(self):
        """The scratch of the padded input gradient: without weight gradients (frozen,
        as in Deep Dream and style transfer) the backward pass never reads the padded
        input, so the gradient takes its buffer, one image-sized buffer fewer (65 MiB
        for VGG's conv1_2 at 512 px)."""
        return "conv_dxpad_batch" if self.weight_grads_wanted else "conv_xpad_batch"

    def _bias(self):
        return self.params["bias"] if self.has_bias else np.zeros(self.out_channels, dtype=self.dtype)

    def _winograd_plan(self, x, ho, wo, whole):
        """(the padded batch in the tile layout, tile rows per band (0 for the whole-batch
        kernels), the scratch of the transformed tiles: flat per thread for bands, or
        (16, C, N*T) and (16, O, N*T) for the whole batch).  The buffers are the lowering
        variants' (same tags): a call runs one variant, and a net whose layers chose
        different variants keeps one set of scratch, not one per variant."""
        th, tw, hq, wq = winograd.tile_grid(ho, wo)
        slots, outputs, channels = numba.get_num_threads(), self.out_channels, self.in_channels
        xpad = scratch("conv_xpad_batch", (x.shape[0], channels, hq, wq), self.dtype)
        if whole:
            columns = x.shape[0] * th * tw
            return xpad, 0, (scratch("conv_cols_all", (16, channels, columns), self.dtype),
                             scratch("conv_product_all", (16, outputs, columns), self.dtype))
        band = winograd.band_tile_rows(channels, outputs, tw, th, self.dtype.itemsize, x.shape[0], slots)
        return xpad, band, scratch("conv_band_cols", (slots, 16 * (channels + outputs) * band * tw), self.dtype)

    def _winograd_forward(self, x, y, whole):
        xpad, band, work = self._winograd_plan(x, y.shape[2], y.shape[3], whole)
        winograd.pad_tiles(x, xpad, *self.padding)
        u = scratch("conv_winograd_u", (16, self.out_channels, self.in_channels), self.dtype)
        winograd.transform_weights(self.params["weight"], u, False)
        with SINGLE_THREADED_BLAS:
            if whole:
                winograd.winograd_forward_batch(xpad, u, self._bias(), self.fused_relu, y, *work)
            else:
                winograd.winograd_forward(xpad, u, self._bias(), self.fused_relu, y, work, band)

    def _winograd_backward(self, x, dy, mask_source, relu, dx, dbias_parts, whole):
        """dx (if wanted) and (dweight (O, K) or None, dbias), grads untouched."""
        xpad, band, work = self._winograd_plan(x, dy.shape[2], dy.shape[3], whole)
        slots, outputs, channels = numba.get_num_threads(), self.out_channels, self.in_channels
        weight_grad, input_grad = self.weight_grads_wanted, self.needs_input_grad
        if weight_grad:  # the forward's padded batch may since have been another layer's scratch
            winograd.pad_tiles(x, xpad, *self.padding)
        dxpad = scratch(self._padded_grad_tag(), xpad.shape if input_grad else (1, 1, 1, 1), self.dtype)
        dxpad.fill(0)
        u_t = scratch("conv_winograd_u", (16, channels, outputs), self.dtype)
        winograd.transform_weights(self.params["weight"], u_t, True)
        tile_rows = (dy.shape[2] + 1) // 2 if whole else band  # the tile rows one task splits at once
        grad_rows = scratch("conv_winograd_grad_rows", (slots, 4, tile_rows * ((dy.shape[3] + 1) // 2)), self.dtype)
        du_shape = (16, outputs, channels) if weight_grad else (16, 1, 1)
        with SINGLE_THREADED_BLAS:
            if whole:
                du = scratch("conv_winograd_du", du_shape, self.dtype)
                winograd.winograd_backward_batch(xpad, dy, mask_source, relu, u_t, dxpad, *work, grad_rows, du,
                                                 dbias_parts, input_grad, weight_grad)
            else:
                du_parts = scratch("conv_winograd_du_parts", (slots,) + du_shape, self.dtype)
                du_parts.fill(0)
                du_product = scratch("conv_winograd_du_product", (slots,) + du_shape[1:], self.dtype)
                for parity in (0, 1):
                    winograd.winograd_backward(xpad, dy, mask_source, relu, u_t, dxpad, work, grad_rows, du_parts,
                                               du_product, dbias_parts, band, parity, input_grad, weight_grad)
                du = du_parts.sum(axis=0) if weight_grad else None
        if input_grad:
            winograd.unpad_tiles(dxpad, dx, *self.padding)
        dweight = None
        if weight_grad:
            dweight = np.empty_like(self.params["weight"])
            winograd.weight_gradient(du, dweight)
            dweight = dweight.reshape(outputs, -1)
        return dweight, dbias_parts.sum(axis=0)

    def forward_cpu(self, x, training):
        # A frozen layer's backward reads only its input's shape (no weight gradient to
        # lower it for): not keeping it frees the outputs of the pooling layers before
        # convolutions in Deep Dream and style transfer (31 MiB for VGG-19 at 512 px).
        self._x = x if self.weight_grads_wanted else None
        self._x_spec = (x.shape, x.dtype)
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
            elif variant == CHANNELS_LAST:
                slots = numba.get_num_threads()
                kh, kw, ph, pw = geometry[0], geometry[1], geometry[4], geometry[5]
                xs = scratch("conv_xpad", (slots, padded_size(*x.shape[1:], kh, kw, ph, pw)), self.dtype)
                cols = scratch("conv_cols", (slots, rows * positions), self.dtype)
                product = scratch("conv_rows", (slots, self.out_channels * positions), self.dtype)
                with SINGLE_THREADED_BLAS:
                    conv_forward_channels_last(x, channels_last_weights(self.params["weight"]), self._bias(),
                                               self.fused_relu, y, xs, cols, product, kh, kw, ph, pw)
            elif variant in (WINOGRAD, WINOGRAD_BATCH):
                self._winograd_forward(x, y, variant == WINOGRAD_BATCH)
            elif variant in (BANDED, SHIFTED):
                shifted = variant == SHIFTED
                band, hp, wp = self._shifted_band_plan(x, geometry) if shifted else self._band_plan(x, geometry, rows)
                slots = numba.get_num_threads()
                xpad = scratch("conv_xpad_batch", (x.shape[0], padded), self.dtype)
                pad_batch(x, xpad, geometry[4], geometry[5])
                product = scratch("conv_band_rows", (slots, self.out_channels * band * wp), self.dtype)
                with SINGLE_THREADED_BLAS:
                    if shifted:
                        conv_forward_shifted(xpad, tap_weights(self.params["weight"]), self._bias(), self.fused_relu,
                                             y, product, geometry[0], geometry[1], hp, wp, band)
                    else:
                        cols = scratch("conv_band_cols", (slots, rows * band * wp), self.dtype)
                        conv_forward_banded(xpad, weight, self._bias(), self.fused_relu, y, cols, product,
                                            geometry[0], geometry[1], hp, wp, band)
            else:
                cols = scratch("conv_cols_all", (rows, x.shape[0] * positions), self.dtype)
                product = scratch("conv_product_all", (self.out_channels, cols.shape[1]), self.dtype)
                lower_batch(x, self._plane_scratch(padded, x, geometry), cols, *geometry)
                np.dot(weight, cols, out=product)
                store_batch(product, self._bias(), y, self.fused_relu)

        run(self._variant("forward", x, run, rows * positions * x.shape[0]))
        if self.fused_relu and not (self.weight_grads_wanted or self.output_observed):
            # Frozen and unobserved (Deep Dream, style transfer): no later layer keeps y,
            # so keep only where it is positive, one byte per element instead of four
            # (VGG-19's unobserved conv outputs at 256 px: 42 MiB -> 10 MiB).
            self._y = np.greater(y, 0).view(np.uint8)
        return y

    def backward_cpu(self, dy):
        x = self._x
        if x is None:
            if self.weight_grads_wanted:
                raise RuntimeError("Conv2D.backward: the layer was unfrozen after a forward pass that kept no "
                                   "input; run forward again")
            x = np.empty(*self._x_spec)  # only its shape is read: untouched pages never become resident
        geometry, padded, rows, positions = self._plan(x)
        dy = dy.reshape(x.shape[0], self.out_channels, geometry[6], geometry[7])
        # The first layer's input gradient is nobody's business (see Layer.skip_input_grad).
        dx = np.empty_like(x) if self.needs_input_grad else np.empty((x.shape[0], 0, 0, 0), dtype=self.dtype)
        relu = self._y is not None
        # unread without a fused ReLU (any array of dy's type will do); a uint8 mask (see forward)
        mask_source = self._y if relu else dy
        weight_t = np.ascontiguousarray(self.params["weight"].reshape(self.out_channels, -1).T)
        slots = numba.get_num_threads()

        def banded_backward(dbias_parts, shifted):
            band, hp, wp = self._shifted_band_plan(x, geometry) if shifted else self._band_plan(x, geometry, rows)
            batch, kh, kw, ph, pw = x.shape[0], geometry[0], geometry[1], geometry[4], geometry[5]
            xpad = scratch("conv_xpad_batch", (batch, padded), self.dtype)
            if self.weight_grads_wanted:
                pad_batch(x, xpad, ph, pw)
            dxpad = scratch(self._padded_grad_tag(), (batch, padded if self.needs_input_grad else 1), self.dtype)
            dxpad.fill(0)
            if shifted:
                dtaps_parts = scratch("conv_dweight_t_parts", (slots, kh * kw, self.out_channels, self.in_channels),
                                      self.dtype)
                dtaps_parts.fill(0)
                grad_rows = scratch("conv_band_rows", (slots, self.out_channels * band * wp), self.dtype)
                taps = tap_weights(self.params["weight"])
                with SINGLE_THREADED_BLAS:
                    for parity in (0, 1):
                        conv_backward_shifted(xpad, dy, mask_source, relu, taps, dxpad, grad_rows, dtaps_parts,
                                              dbias_parts, kh, kw, hp, wp, band, parity, self.needs_input_grad,
                                              self.weight_grads_wanted)
                dweight = weight_from_taps(dtaps_parts.sum(axis=0), kh, kw) if self.weight_grads_wanted else None
            else:
                dweight = lowered_band_backward(xpad, dxpad, dbias_parts, band, hp, wp)
            if self.needs_input_grad:
                unpad_batch(dxpad, dx, ph, pw)
            return dweight, dbias_parts.sum(axis=0)

        def lowered_band_backward(xpad, dxpad, dbias_parts, band, hp, wp):
            kh, kw = geometry[0], geometry[1]
            dweight_t_parts = scratch("conv_dweight_t_parts", (slots, rows, self.out_channels), self.dtype)
            dweight_t_parts.fill(0)
            dweight_product = scratch("conv_dweight_product", dweight_t_parts.shape, self.dtype)
            block = rows * band * wp
            cols = scratch("conv_band_cols", (slots, block), self.dtype)
            grad_rows = scratch("conv_band_rows", (slots, self.out_channels * band * wp), self.dtype)
            rows_t = scratch("conv_band_rows_t", grad_rows.shape, self.dtype)
            with SINGLE_THREADED_BLAS:
                for parity in (0, 1):
                    conv_backward_banded(xpad, dy, mask_source, relu, weight_t, dxpad, cols, grad_rows, rows_t,
                                         dweight_t_parts, dweight_product, dbias_parts, kh, kw, hp, wp, band, parity,
                                         self.needs_input_grad, self.weight_grads_wanted)
            return dweight_t_parts.sum(axis=0).T if self.weight_grads_wanted else None

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
            if variant in (BANDED, SHIFTED):
                return banded_backward(dbias_parts, variant == SHIFTED)
            if variant in (WINOGRAD, WINOGRAD_BATCH):
                return self._winograd_backward(x, dy, mask_source, relu, dx, dbias_parts, variant == WINOGRAD_BATCH)
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

        dweight, dbias = run(self._variant("backward", x, run, rows * positions * x.shape[0]))
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
