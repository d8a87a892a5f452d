"""Winograd F(2x2, 3x3): the fourth CPU variant of Conv2D, for 3x3 kernels at stride 1.

A 2x2 block of outputs of one 3x3 cross-correlation is ``A^T [(G g G^T) * (B^T d B)] A``
for the 4x4 input tile ``d`` under it (Lavin & Gray, "Fast Algorithms for
Convolutional Neural Networks", 2015).  Summed over input channels, the
element-wise product becomes 16 matrix products, one per tile element xi:

    M[xi] (O, T) = U[xi] (O, C) @ V[xi] (C, T)

with ``U = G g G^T`` the transformed weights and ``V = B^T d B`` the transformed
tiles (T tiles).  That is 16 multiply-adds per 2x2 outputs and input channel
instead of 36: 2.25x fewer than im2col's product, for transforms that cost a few
additions per element.

The backward pass is the exact adjoint of that forward pass (not a second
Winograd convolution with flipped weights), so the gradients are those of the
function the forward computed:

    dM[xi] = (A dY A^T)[xi]            per tile of the output gradient
    dV[xi] (C, T) = U[xi]^T @ dM[xi]   then  d(tile) += B dV B^T   (input gradient)
    dU[xi] (O, C) = dM[xi] @ V[xi]^T   then  dg = G^T dU G          (weight gradient)

Work is split as in the banded lowering: each thread takes a band of tile rows of
one image, transforms it into its own scratch (small enough to stay in its
core's cache), multiplies on single-threaded BLAS and transforms back.  Neighbour
tiles overlap by two input rows, so the input gradient's bands scatter even bands
first, then odd ones (a band is at least one tile row), and every sum comes in a
fixed order.

The padded input has its own layout here, ``hq = 2*th + 2`` rows by ``wq = 2*tw + 2``
columns per plane (th x tw tiles), one row or column more than the convolution's
padding when the output size is odd: every tile then reads inside the plane and
no loop needs an edge test.  The extra row and column are zeros, and their
gradient is dropped.

Rounding: the transforms multiply by 1/2 (exact) and add; the results agree
with im2col's to float32 rounding of sums over up to 4x more terms per element.
"""
import numba
import numpy as np
from numba import prange

from ..backend.cpu import kernel
from . import _conv_lowering
from ._conv_lowering import add_into


# G (4x3): the weight transform, U = G g G^T.
def tile_grid(ho, wo):
    """(tile rows, tile columns, padded rows hq, padded columns wq) for an ho x wo output."""
    th, tw = (ho + 1) // 2, (wo + 1) // 2
    return th, tw, 2 * th + 2, 2 * tw + 2


#: Fewest tiles per band: each band multiplies all of U (16 x O x C) once, so fewer
#: tiles would make the products stream U through the cache for little work.
MIN_BAND_TILES = 64


def band_tile_rows(channels, outputs, tw, th, itemsize, samples, threads):
    """Tile rows per band: the thread's transformed tiles (16 x (C + O) per tile) near
    BAND_BYTES and at least MIN_BAND_TILES, but small enough that a batch smaller than
    the thread count still has two bands per thread (the input gradient runs the even
    bands, then the odd ones); at least one tile row, at most the image's."""
    rows = max(1, _conv_lowering.BAND_BYTES // max(1, 16 * (channels + outputs) * tw * itemsize), -(-MIN_BAND_TILES // tw))
    if samples < threads:
        rows = min(rows, -(-th // -(-2 * threads // samples)))
    return int(min(th, max(1, rows)))


# -- weights -----------------------------------------------------------------------------
# Kernels rather than numpy products: numpy's BLAS keeps its threads spinning for a
# while after a call, and they would steal the cores from the band kernels that follow.
@kernel(parallel=False)
def expand_rows(a0, a1, a2, half, o0, o1, o2, o3):
    """o0 .. o3 = (a0, a1, a2) G^T column by column (1-D views): a0, (a0 + a1 + a2) / 2,
    (a0 - a1 + a2) / 2, a2."""
    for q in range(o0.size):
        x0, x1, x2 = a0[q], a1[q], a2[q]
        o0[q] = x0
        o1[q] = half * (x0 + x1 + x2)
        o2[q] = half * (x0 - x1 + x2)
        o3[q] = x2


@kernel(parallel=False)
def half_sums(a, b, c, half, plus, minus):
    """plus = (a + b + c) / 2, minus = (a - b + c) / 2 (1-D views): G's middle rows."""
    for q in range(a.size):
        plus[q] = half * (a[q] + b[q] + c[q])
        minus[q] = half * (a[q] - b[q] + c[q])


@kernel
def transform_weights(weight, u, transposed):
    """u = G g G^T for each (o, c) of weight (O, C, 3, 3): u (16, O, C), or (16, C, O)
    when ``transposed`` (what the input gradient multiplies by).  Per row p of u, the
    taps are gathered into nine unit-stride rows first, so that every loop after that
    runs over 1-D views and vectorises (about 4x faster than per-(o, c) arithmetic)."""
    outputs, channels = weight.shape[0], weight.shape[1]
    rows, cols = (channels, outputs) if transposed else (outputs, channels)
    half = weight.dtype.type(0.5)  # constants of the array's type: a Python float would widen the sums to float64
    taps = weight.reshape((outputs, channels, 9))
    for p in prange(rows):
        g = np.empty((15, cols), dtype=weight.dtype)  # 0-8: tap 3i + j; 9-11, 12-14: G's middle rows of g
        for q in range(cols):
            for k in range(9):
                g[k, q] = taps[q, p, k] if transposed else taps[p, q, k]
        for j in range(3):
            half_sums(g[j], g[3 + j], g[6 + j], half, g[9 + j], g[12 + j])
        # G g: rows g0, (g0 + g1 + g2) / 2, (g0 - g1 + g2) / 2, g2; each then times G^T.
        expand_rows(g[0], g[1], g[2], half, u[0, p], u[1, p], u[2, p], u[3, p])
        expand_rows(g[9], g[10], g[11], half, u[4, p], u[5, p], u[6, p], u[7, p])
        expand_rows(g[12], g[13], g[14], half, u[8, p], u[9, p], u[10, p], u[11, p])
        expand_rows(g[6], g[7], g[8], half, u[12, p], u[13, p], u[14, p], u[15, p])


@kernel(parallel=False)
def reduce_row(u0, u1, u2, u3, half):
    """A row of dU times G (4x3): u0 + (u1 + u2) / 2, (u1 - u2) / 2, (u1 + u2) / 2 + u3."""
    return u0 + half * (u1 + u2), half * (u1 - u2), half * (u1 + u2) + u3


@kernel
def weight_gradient(du, dweight):
    """dweight (O, C, 3, 3) = G^T dU G from du (16, O, C): the adjoint of transform_weights."""
    outputs, channels = du.shape[1], du.shape[2]
    half = du.dtype.type(0.5)
    for o in prange(outputs):
        for c in range(channels):
            h0 = reduce_row(du[0, o, c], du[1, o, c], du[2, o, c], du[3, o, c], half)
            h1 = reduce_row(du[4, o, c], du[5, o, c], du[6, o, c], du[7, o, c], half)
            h2 = reduce_row(du[8, o, c], du[9, o, c], du[10, o, c], du[11, o, c], half)
            h3 = reduce_row(du[12, o, c], du[13, o, c], du[14, o, c], du[15, o, c], half)
            g = dweight[o, c]
            for s in range(3):  # G^T on the left: the same combination of rows
                g[0, s] = h0[s] + half * (h1[s] + h2[s])
                g[1, s] = half * (h1[s] - h2[s])
                g[2, s] = half * (h1[s] + h2[s]) + h3[s]


# -- padding into the tile layout --------------------------------------------------------
# A padded row of the tile layout holds its even columns first, then its odd ones
# (tw + 1 each): the columns 2j .. 2j + 3 of tile j are then even[j], odd[j],
# even[j + 1], odd[j + 1], so every transform reads and writes unit-stride runs
# that the compiler vectorises.
@kernel
def pad_tiles(x, xpad, ph, pw):
    """xpad (N, C, hq, wq) = x (N, C, H, W) with ph rows and pw columns of zeros before and
    zeros after up to hq x wq, each row split into its even and odd columns."""
    n, channels, h, w = x.shape
    hq, wq = xpad.shape[2], xpad.shape[3]
    half = wq // 2
    for task in prange(n * channels):
        b = task // channels
        c = task - b * channels
        plane = xpad[b, c]
        for r in range(hq):
            row = plane[r]
            for q in range(wq):
                row[q] = 0.0
            source = r - ph
            if 0 <= source < h:
                src = x[b, c, source]
                for q in range(w):
                    p = pw + q
                    row[(p >> 1) + (p & 1) * half] = src[q]


@kernel
def unpad_tiles(dxpad, dx, ph, pw):
    """dx (N, C, H, W) = the interior of dxpad (N, C, hq, wq): the adjoint of pad_tiles."""
    n, channels, h, w = dx.shape
    half = dxpad.shape[3] // 2
    for task in prange(n * channels):
        b = task // channels
        c = task - b * channels
        for r in range(h):
            src = dxpad[b, c, r + ph]
            dst = dx[b, c, r]
            for q in range(w):
                p = pw + q
                dst[q] = src[(p >> 1) + (p & 1) * half]


# -- the transforms of one band (serial; called from the band kernels) ------------------
# Every inner loop below runs over one tile row's tiles on 1-D views: Numba vectorises
# loops over 1-D views, not over rows of 2-D ones (measured: no vector instructions).
@kernel(parallel=False)
def tile_columns(ra, rb, sign, o0, o1, o2, o3):
    """o0 .. o3 = (row ra + sign * row rb) B of every tile: one row of B^T d B, from
    two rows of the tile layout (B's columns t0 - t2, t1 + t2, t2 - t1, t1 - t3)."""
    half = o0.size + 1
    for j in range(o0.size):
        even = ra[j] + sign * rb[j]
        even_next = ra[j + 1] + sign * rb[j + 1]
        odd = ra[half + j] + sign * rb[half + j]
        odd_next = ra[half + j + 1] + sign * rb[half + j + 1]
        o0[j] = even - even_next
        o1[j] = odd + even_next
        o2[j] = even_next - odd
        o3[j] = odd - odd_next


@kernel(parallel=False)
def transform_tiles(xpad, v, i0, i1, c0, c1, offset):
    """v[:, c, offset + k] = B^T d B for the tiles k of tile rows [i0, i1) and channels
    [c0, c1) of one padded sample xpad (C, hq, wq)."""
    wq = xpad.shape[2]
    tw = wq // 2 - 1
    plus = xpad.dtype.type(1)  # signs of the array's type: a Python float would widen the sums to float64
    minus = -plus
    for c in range(c0, c1):
        plane = xpad[c]
        for i in range(i0, i1):
            a = offset + (i - i0) * tw
            e = a + tw
            r0, r1, r2, r3 = plane[2 * i], plane[2 * i + 1], plane[2 * i + 2], plane[2 * i + 3]
            # B^T d: rows d0 - d2, d1 + d2, d2 - d1, d1 - d3.
            tile_columns(r0, r2, minus, v[0, c, a:e], v[1, c, a:e], v[2, c, a:e], v[3, c, a:e])
            tile_columns(r1, r2, plus, v[4, c, a:e], v[5, c, a:e], v[6, c, a:e], v[7, c, a:e])
            tile_columns(r2, r1, minus, v[8, c, a:e], v[9, c, a:e], v[10, c, a:e], v[11, c, a:e])
            tile_columns(r1, r3, minus, v[12, c, a:e], v[13, c, a:e], v[14, c, a:e], v[15, c, a:e])


@kernel(parallel=False)
def a_transform(s0, s1, s2, s3):
    """In place on four streams: s0 = s0 + s1 + s2, s1 = s1 - s2 - s3 (A^T's rows)."""
    for j in range(s0.size):
        x0, x1, x2, x3 = s0[j], s1[j], s2[j], s3[j]
        s0[j] = x0 + x1 + x2
        s1[j] = x1 - x2 - x3


@kernel(parallel=False)
def store_pairs(s0, s1, s2, s3, shift, relu, dst):
    """dst (one output row) = (s0 + s1 + s2, s1 - s2 - s3) + shift of each tile,
    interleaved, rectified if ``relu``; an odd-length row takes the last tile's first."""
    pairs = dst.size // 2
    zero = dst.dtype.type(0)
    for j in range(pairs):
        left = s0[j] + s1[j] + s2[j] + shift
        right = s1[j] - s2[j] - s3[j] + shift
        if relu:
            left, right = max(left, zero), max(right, zero)
        dst[2 * j] = left
        dst[2 * j + 1] = right
    if dst.size % 2:
        left = s0[pairs] + s1[pairs] + s2[pairs] + shift
        dst[dst.size - 1] = max(left, zero) if relu else left


@kernel(parallel=False)
def store_tiles(m, bias, relu, y, i0, i1, o0, o1, offset):
    """Rows [2*i0, 2*i1) of channels [o0, o1) of one sample y (O, Ho, Wo) = A^T m A + bias
    (rectified if ``relu``) from m[:, o, offset + k] for the tiles k of those tile rows,
    which it overwrites; outputs past Ho or Wo are not stored."""
    ho, wo = y.shape[1], y.shape[2]
    tw = (wo + 1) // 2
    for o in range(o0, o1):
        for i in range(i0, i1):
            a = offset + (i - i0) * tw
            e = a + tw
            for k in range(4):  # A^T m: rows k and 4 + k of the product then hold A^T's rows
                a_transform(m[k, o, a:e], m[4 + k, o, a:e], m[8 + k, o, a:e], m[12 + k, o, a:e])
            store_pairs(m[0, o, a:e], m[1, o, a:e], m[2, o, a:e], m[3, o, a:e], bias[o], relu, y[o, 2 * i])
            if 2 * i + 1 < ho:
                store_pairs(m[4, o, a:e], m[5, o, a:e], m[6, o, a:e], m[7, o, a:e], bias[o], relu, y[o, 2 * i + 1])


@kernel(parallel=False)
def split_grad(dy, y, relu, scale, even, odd):
    """even[j], odd[j] = scale * dy[2j], dy[2j + 1] (0 past the row's end), zero where the
    output y is 0 with a fused ``relu``; returns their sum."""
    total = 0.0
    zero = dy.dtype.type(0)
    pairs = dy.size // 2
    for j in range(pairs):
        g0 = scale * dy[2 * j]
        g1 = scale * dy[2 * j + 1]
        if relu:
            g0 = g0 if y[2 * j] > 0 else zero
            g1 = g1 if y[2 * j + 1] > 0 else zero
        even[j] = g0
        odd[j] = g1
        total += g0 + g1
    if dy.size % 2:
        g0 = scale * dy[dy.size - 1]
        if relu:
            g0 = g0 if y[dy.size - 1] > 0 else zero
        even[pairs] = g0
        odd[pairs] = zero
        total += g0
    return total


@kernel(parallel=False)
def grad_columns(top_even, top_odd, bottom_even, bottom_odd, ta, tb, o0, o1, o2, o3):
    """o0 .. o3 = one row of A g A^T for every tile: the row ta * top + tb * bottom of
    the 2x2 gradient (a row of A), then A's columns e0, e0 + e1, e0 - e1, -e1."""
    for j in range(o0.size):
        e0 = ta * top_even[j] + tb * bottom_even[j]
        e1 = ta * top_odd[j] + tb * bottom_odd[j]
        o0[j] = e0
        o1[j] = e0 + e1
        o2[j] = e0 - e1
        o3[j] = -e1


@kernel(parallel=False)
def transform_output_grad(dy, y, relu, dm, rows, dbias, i0, i1, o0, o1, offset):
    """dm[:, o, offset + k] = A dY A^T for the 2x2 output-gradient blocks k of tile rows
    [i0, i1) and channels [o0, o1) of one sample dy (O, Ho, Wo), zero past Ho or Wo and,
    with a fused ``relu``, where the output y is 0; dbias += the sums of those
    gradients.  rows: scratch (4, (i1 - i0) * tw): every block row of the tile rows,
    split into even and odd columns, so the A passes (elementwise over blocks) run
    once over all of them rather than once per tile row."""
    ho = dy.shape[1]
    tw = (dy.shape[2] + 1) // 2
    span = (i1 - i0) * tw
    one, zero = dy.dtype.type(1), dy.dtype.type(0)  # of the array's type, as in transform_tiles
    top_even, top_odd, bottom_even, bottom_odd = rows[0, :span], rows[1, :span], rows[2, :span], rows[3, :span]
    a, e = offset, offset + span
    for o in range(o0, o1):
        total = 0.0
        for i in range(i0, i1):
            t = (i - i0) * tw
            under = min(2 * i + 1, ho - 1)
            low = one if 2 * i + 1 < ho else zero  # an odd Ho's last tile row has one output row
            total += split_grad(dy[o, 2 * i], y[o, 2 * i], relu, one, top_even[t:t + tw], top_odd[t:t + tw])
            total += split_grad(dy[o, under], y[o, under], relu, low, bottom_even[t:t + tw], bottom_odd[t:t + tw])
        # A g: rows g0, g0 + g1, g0 - g1, -g1 of each block.
        grad_columns(top_even, top_odd, bottom_even, bottom_odd, one, zero,
                     dm[0, o, a:e], dm[1, o, a:e], dm[2, o, a:e], dm[3, o, a:e])
        grad_columns(top_even, top_odd, bottom_even, bottom_odd, one, one,
                     dm[4, o, a:e], dm[5, o, a:e], dm[6, o, a:e], dm[7, o, a:e])
        grad_columns(top_even, top_odd, bottom_even, bottom_odd, one, -one,
                     dm[8, o, a:e], dm[9, o, a:e], dm[10, o, a:e], dm[11, o, a:e])
        grad_columns(top_even, top_odd, bottom_even, bottom_odd, zero, -one,
                     dm[12, o, a:e], dm[13, o, a:e], dm[14, o, a:e], dm[15, o, a:e])
        dbias[o] += total


@kernel(parallel=False)
def b_transform(s0, s1, s2, s3):
    """In place on four streams: B's rows v0, v1 - v2 + v3, v1 + v2 - v0, -v3."""
    for j in range(s0.size):
        v0, v1, v2, v3 = s0[j], s1[j], s2[j], s3[j]
        s1[j] = v1 - v2 + v3
        s2[j] = v1 + v2 - v0
        s3[j] = -v3


@kernel(parallel=False)
def scatter_row(t0, t1, t2, t3, row):
    """row (a padded row of the tile layout) += the terms t0 .. t3 of each tile j, its
    columns 2j .. 2j + 3: even[j], odd[j], even[j + 1], odd[j + 1].  Each element
    gathers the terms of its two tiles (j and j - 1), so the loop carries no
    dependence and vectorises."""
    tiles = t0.size
    half = tiles + 1
    row[0] += t0[0]
    row[half] += t1[0]
    for j in range(1, tiles):
        row[j] += t0[j] + t2[j - 1]
        row[half + j] += t1[j] + t3[j - 1]
    row[tiles] += t2[tiles - 1]
    row[half + tiles] += t3[tiles - 1]


@kernel(parallel=False)
def scatter_tiles(dv, dxpad, i0, i1, c0, c1, offset):
    """Channels [c0, c1) of one padded sample dxpad (C, hq, wq) += B dV B^T of the tiles
    dv[:, c, offset + k] of tile rows [i0, i1), overwriting dv: the adjoint of
    transform_tiles, tile row after tile row in a fixed order.  Both B passes are
    elementwise over tiles, so each runs once over all the tile rows' tiles (one call
    per stream, not one per tile row: at 28x28 a tile row has 14 tiles, too few to
    pay for a call)."""
    tw = dxpad.shape[2] // 2 - 1
    a, e = offset, offset + (i1 - i0) * tw
    for c in range(c0, c1):
        plane = dxpad[c]
        for s in range(4):  # B dV, column by column
            b_transform(dv[s, c, a:e], dv[4 + s, c, a:e], dv[8 + s, c, a:e], dv[12 + s, c, a:e])
        for r in range(4):  # ... then B^T, row by row
            b_transform(dv[4 * r, c, a:e], dv[4 * r + 1, c, a:e], dv[4 * r + 2, c, a:e], dv[4 * r + 3, c, a:e])
        for i in range(i0, i1):  # into padded rows 2i .. 2i + 3
            t = offset + (i - i0) * tw
            for r in range(4):
                scatter_row(dv[4 * r, c, t:t + tw], dv[4 * r + 1, c, t:t + tw], dv[4 * r + 2, c, t:t + tw],
                            dv[4 * r + 3, c, t:t + tw], plane[2 * i + r])


# -- the band kernels ------------------------------------------------------------------
@kernel(parallel=False)
def band_views(work, slot, first, second, tiles):
    """Two (16, rows, tiles) views of thread ``slot``'s flat scratch, one after the other."""
    a = work[slot, :16 * first * tiles].reshape((16, first, tiles))
    b = work[slot, 16 * first * tiles:16 * (first + second) * tiles].reshape((16, second, tiles))
    return a, b


@kernel
def winograd_forward(xpad, u, bias, relu, y, work, band):
    """y = conv3x3(x) + bias (rectified if ``relu``) band by band in parallel.
    xpad: the batch in the tile layout (pad_tiles); u: transform_weights; work: flat
    scratch per thread of 16 * (C + O) * band * tw elements."""
    n, outputs, ho, wo = y.shape
    channels = xpad.shape[1]
    th, tw = (ho + 1) // 2, (wo + 1) // 2
    bands = (th + band - 1) // band
    for task in prange(n * bands):
        b = task // bands
        i0 = (task - b * bands) * band
        i1 = min(i0 + band, th)
        tiles = (i1 - i0) * tw
        v, m = band_views(work, numba.get_thread_id(), channels, outputs, tiles)
        transform_tiles(xpad[b], v, i0, i1, 0, channels, 0)
        for xi in range(16):
            np.dot(u[xi], v[xi], m[xi])
        store_tiles(m, bias, relu, y[b], i0, i1, 0, outputs, 0)


@kernel
def winograd_backward(xpad, dy, y, relu, u_t, dxpad, work, grad_rows, du_parts, du_product, dbias_parts, band,
                      parity, input_grad, weight_grad):
    """The bands of one ``parity`` (0: even, 1: odd) of the backward pass: per-thread
    parts of dU (16, O, C) and dbias (if ``weight_grad``), and B dV B^T added into the
    padded input gradient dxpad (if ``input_grad``).  u_t: U transposed per tile
    element (16, C, O); work: flat scratch per thread of 16 * (C + O) * band * tw;
    grad_rows: scratch (threads, 4, band * tw)."""
    n, outputs, ho, wo = dy.shape
    channels = u_t.shape[1]
    th, tw = (ho + 1) // 2, (wo + 1) // 2
    bands = (th + band - 1) // band
    same_parity = (bands + 1 - parity) // 2
    for index in prange(n * same_parity):
        b = index // same_parity
        i0 = (2 * (index - b * same_parity) + parity) * band
        i1 = min(i0 + band, th)
        tiles = (i1 - i0) * tw
        slot = numba.get_thread_id()
        v, dm = band_views(work, slot, channels, outputs, tiles)
        transform_output_grad(dy[b], y[b], relu, dm, grad_rows[slot], dbias_parts[slot], i0, i1, 0, outputs, 0)
        if weight_grad:
            transform_tiles(xpad[b], v, i0, i1, 0, channels, 0)
            for xi in range(16):
                np.dot(dm[xi], v[xi].T, du_product[slot])
                add_into(du_parts[slot, xi], du_product[slot])
        if input_grad:
            for xi in range(16):
                np.dot(u_t[xi], dm[xi], v[xi])  # dV reuses the tiles' buffer
            scatter_tiles(v, dxpad[b], i0, i1, 0, channels, 0)


# -- the whole-batch kernels -------------------------------------------------------------
# The batch's tiles in one (16, C, N*T) matrix (T = th * tw tiles per sample): the
# transforms run parallel over (sample, channel) and the 16 products parallel over
# the tile element, each with all N*T tiles as columns.  For small images (VGG's
# 28 and 14 px stages) a band of a few tile rows gives products too narrow to run
# BLAS at speed; here each product is as wide as the batch.  A thread owns whole
# channel planes, so the input gradient's scatter needs no even/odd passes and the
# weight gradient no per-thread parts.
@kernel
def transform_batch(xpad, v, th, tiles):
    """v[:, c, b*T + k] = B^T d B of tile k of sample b, parallel over (sample, channel)."""
    n, channels = xpad.shape[0], xpad.shape[1]
    for task in prange(n * channels):
        b = task // channels
        c = task - b * channels
        transform_tiles(xpad[b], v, 0, th, c, c + 1, b * tiles)


@kernel
def winograd_forward_batch(xpad, u, bias, relu, y, v, m):
    """y = conv3x3(x) + bias (rectified if ``relu``); v (16, C, N*T), m (16, O, N*T): scratch."""
    n, outputs, ho, wo = y.shape
    th = (ho + 1) // 2
    tiles = th * ((wo + 1) // 2)
    transform_batch(xpad, v, th, tiles)
    for xi in prange(16):
        np.dot(u[xi], v[xi], m[xi])
    for task in prange(n * outputs):
        b = task // outputs
        o = task - b * outputs
        store_tiles(m, bias, relu, y[b], 0, th, o, o + 1, b * tiles)


@kernel
def winograd_backward_batch(xpad, dy, y, relu, u_t, dxpad, v, dm, grad_rows, du, dbias_parts, input_grad,
                            weight_grad):
    """dU (16, O, C) and dbias parts (if ``weight_grad``), and dxpad += B dV B^T (if
    ``input_grad``); v (16, C, N*T), dm (16, O, N*T), grad_rows (threads, 4, th * tw): scratch."""
    n, outputs, ho, wo = dy.shape
    channels = u_t.shape[1]
    th = (ho + 1) // 2
    tiles = th * ((wo + 1) // 2)
    for task in prange(n * outputs):
        b = task // outputs
        o = task - b * outputs
        slot = numba.get_thread_id()
        transform_output_grad(dy[b], y[b], relu, dm, grad_rows[slot], dbias_parts[slot], 0, th, o, o + 1,
                              b * tiles)
    if weight_grad:
        transform_batch(xpad, v, th, tiles)
        for xi in prange(16):
            np.dot(dm[xi], v[xi].T, du[xi])
    if input_grad:
        for xi in prange(16):
            np.dot(u_t[xi], dm[xi], v[xi])  # dV reuses the tiles' buffer
        for task in prange(n * channels):
            b = task // channels
            c = task - b * channels
            scatter_tiles(v, dxpad[b], 0, th, c, c + 1, b * tiles)
