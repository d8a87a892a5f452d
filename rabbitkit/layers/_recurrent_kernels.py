"""CPU kernels of the recurrent cells (RNN, LSTM, GRU): one call per layer and direction.

Every kernel runs the *whole time loop* of one layer, so a sequence of T steps
costs one Python call forward and one backward instead of T.  Inside the loop the
recurrent product ``h_{t-1} @ W_hh^T`` (forward) or ``dgates_t @ W_hh`` (backward)
goes to BLAS through ``np.dot`` on contiguous 2-D slices; the gate arithmetic is
one fused pass per batch row.  What does not depend on the previous step (the
input projection ``X @ W_ih^T`` for all steps, the weight gradients) is done
outside, as single large matrix products, by the layer class.

Parallelism: batch rows never interact in a recurrence, so each kernel splits
the batch into ``chunks`` row blocks and runs the whole time loop of one block
per thread (``prange`` over blocks): one fork/join per layer instead of one per
step, and each thread calls a *single-threaded* BLAS on its block (the caller
limits BLAS to one thread around these kernels).  A multi-threaded BLAS per step
would synchronise its threads 2T times per layer, which on a busy machine costs
whole scheduler time slices.

Each thread multiplies its block ``rows`` rows per BLAS call, either as
``rows @ W`` or as the transposed ``W^T @ rows^T`` into the thread's ``swap``
scratch (:func:`rabbitkit.backend.cpu.product_rows`; every kernel takes both W
and W^T for that).  The caller times the candidate sizes in both orientations on
the first use of a product shape and keeps the fastest
(:meth:`rabbitkit.layers.recurrent.Recurrent._time_loop`), or with tuning off
takes :func:`rabbitkit.backend.cpu.rows_per_product`'s rule, direct: where
OpenBLAS has an unpacked path for small products, blocks under its size limit
take it, which made the per-step products of a 2 x 128 LSTM at batch 32 2.3x
faster on AVX-512; on its Haswell kernels (Zen 3) the transposed orientation
made the whole char-rnn step 22 % faster.

Layout: everything is time-major, ``(T, N, ...)``, so ``array[t, n0:n1]`` is a
contiguous block of rows.  ``hs`` and ``cs`` have T + 1 rows: row 0 is the
initial state, row t + 1 the state after step t.  Gate blocks are stacked in
PyTorch's order along the last axis (LSTM: i, f, g, o; GRU: r, z, n).

Vectorisation notes (measured, they decide the code's shape):

* the gate loops take a 1-D *slice per gate block* (``row[h:2*h]``) rather than
  indexing ``row[h + j]``: LLVM cannot prove that ``row[j]`` and ``row[h + j]`` are
  distinct for an unknown ``h`` and falls back to scalar code (8x slower), while for
  separate slices it checks the ranges once per row and runs the SIMD loop;
* the float32 tanh is the rational ``tanh_approx`` of :mod:`.activations`, compiled
  here with ``error_model="numpy"``: under Numba's default (Python) error model its
  division carries a zero-division branch that also blocks SIMD.  The denominator
  is a positive polynomial, so the check never fires anyway.

float64 kernels use libm (exact functions for gradient checks).

CUDA kernels (the second half of this file) take the other shape a GPU wants: the
layer class runs the time loop on the host, and each step is one backend GEMM for
the recurrent product plus *one* fused kernel for every gate nonlinearity and the
cell update (backward: one fused kernel, then the GEMM carrying the gradient to
h_{t-1}).  The fused kernels parallelise over the (batch row, unit) pairs of a step;
every thread writes its own entries, so no reduction happens inside them.  The
peephole gradients (sums over steps and rows) are one ordered reduction after the
time loop.  Activations there are libm's (``math.tanh``, an overflow-free sigmoid),
so float32 CUDA results differ from the CPU's rational tanh by a few ulps.
"""
import math

import numba
import numpy as np
from numba import prange, types
from numba.extending import overload

from ..backend.cpu import FASTMATH, kernel, product_rows
from ..backend.cuda import cuda_device, cuda_kernel
from .activations import tanh_approx

cuda = None  # numba.cuda, bound on the first CUDA launch

# Not cached on its own: LLVM inlines it into the (cached) kernels below.  (Numba-level
# inline="always" would compile its division under the caller's error model again.)
_tanh_float32 = numba.njit(fastmath=set(FASTMATH), error_model="numpy")(tanh_approx.py_func)


# -- activations, chosen by scalar type at compile time ---------------------------
def fast_tanh(v):
    """tanh(v): rational approximation for float32 (vectorises), libm for float64."""
    return math.tanh(v)


def fast_sigmoid(v):
    """1 / (1 + exp(-v)); for float32 as 0.5 + 0.5 tanh(v / 2) so it vectorises."""
    return 1.0 / (1.0 + math.exp(-v))


@overload(fast_tanh)
def _fast_tanh_typed(v):
    if v == types.float32:
        return lambda v: _tanh_float32(v)
    return lambda v: math.tanh(v)


@overload(fast_sigmoid)
def _fast_sigmoid_typed(v):
    if v == types.float32:
        half = np.float32(0.5)
        return lambda v: half + half * _tanh_float32(half * v)
    return lambda v: 1.0 / (1.0 + math.exp(-v))


@kernel(parallel=False)
def chunk_rows(chunk, chunks, batch):
    """Rows [first, stop) of block ``chunk`` when ``batch`` rows are split into ``chunks``."""
    return chunk * batch // chunks, (chunk + 1) * batch // chunks


@kernel(parallel=False)
def one_hot_rows_cpu(rows, indices):
    """True, with indices[k] = the position of the 1, if every row of ``rows`` is a one-hot
    code (one entry exactly 1, the rest exactly 0); False at the first row that is not."""
    count, width = rows.shape
    for k in range(count):
        row = rows[k]
        hot = -1
        for j in range(width):
            v = row[j]
            if v == 1.0 and hot < 0:
                hot = j
            elif v != 0.0:
                return False
        if hot < 0:
            return False
        indices[k] = hot
    return True


# -- vanilla RNN: h_t = tanh(x W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh) ----------------
@kernel
def rnn_forward_sequence(xproj, w_hh_t, w_hh, bias, hs, hh, swap, chunks, rows):
    """xproj (T, N, H) = X W_ih^T; w_hh_t (H, H) = W_hh^T; bias (H,) = b_ih + b_hh;
    hs (T+1, N, H) with hs[0] = h0 on entry, every h_t on return; hh (N, H) scratch."""
    steps, batch, hidden = xproj.shape
    for chunk in prange(chunks):
        first, stop = chunk_rows(chunk, chunks, batch)
        for t in range(steps):
            product_rows(hs[t], w_hh_t, w_hh, hh, first, stop, rows, swap[chunk])
            for n in range(first, stop):
                pre = xproj[t, n]
                rec = hh[n]
                h_new = hs[t + 1, n]
                for j in range(hidden):
                    h_new[j] = fast_tanh(pre[j] + rec[j] + bias[j])


@kernel
def rnn_backward_sequence(dhs, w_hh, w_hh_t, hs, dh, dpre, swap, chunks, rows):
    """dhs (T, N, H): gradient reaching each output h_t from above; dh (N, H): in, the
    gradient w.r.t. the final state; out, w.r.t. the initial state.  dpre (T, N, H)
    receives the pre-activation gradients (the weight products are done outside)."""
    steps, batch, hidden = dhs.shape
    one = dhs.dtype.type(1.0)
    for chunk in prange(chunks):
        first, stop = chunk_rows(chunk, chunks, batch)
        for t in range(steps - 1, -1, -1):
            for n in range(first, stop):
                h = hs[t + 1, n]
                up = dhs[t, n]
                carry = dh[n]
                d = dpre[t, n]
                for j in range(hidden):
                    d[j] = (up[j] + carry[j]) * (one - h[j] * h[j])
            product_rows(dpre[t], w_hh, w_hh_t, dh, first, stop, rows, swap[chunk])


# -- LSTM (optionally with Gers' peephole connections) ----------------------------
# i = s(x_i + h_i + p_i * c_{t-1}), f = s(x_f + h_f + p_f * c_{t-1}), g = tanh(x_g + h_g),
# c_t = f c_{t-1} + i g, o = s(x_o + h_o + p_o * c_t), h_t = o tanh(c_t).
# Without peepholes p is all zeros: three wasted multiply-adds per unit, one kernel.
@kernel
def lstm_forward_sequence(gates, w_hh_t, w_hh, bias, peep, hs, cs, tanh_cs, hh, swap, chunks, rows):
    """gates (T, N, 4H): X W_ih^T on entry, activated i, f, g, o on return (kept for
    backward); w_hh_t (H, 4H) = W_hh^T; bias (4H,) = b_ih + b_hh; peep (3, H) =
    (p_i, p_f, p_o); hs, cs (T+1, N, H) with row 0 preset to (h0, c0); tanh_cs
    (T, N, H) receives tanh(c_t); hh (N, 4H) scratch."""
    steps, batch, width = gates.shape
    hidden = width // 4
    b_i, b_f, b_g, b_o = bias[:hidden], bias[hidden:2 * hidden], bias[2 * hidden:3 * hidden], bias[3 * hidden:]
    p_i, p_f, p_o = peep[0], peep[1], peep[2]
    for chunk in prange(chunks):
        first, stop = chunk_rows(chunk, chunks, batch)
        for t in range(steps):
            product_rows(hs[t], w_hh_t, w_hh, hh, first, stop, rows, swap[chunk])
            for n in range(first, stop):
                row = gates[t, n]
                rec = hh[n]
                a_i, a_f, a_g, a_o = row[:hidden], row[hidden:2 * hidden], row[2 * hidden:3 * hidden], row[3 * hidden:]
                r_i, r_f, r_g, r_o = rec[:hidden], rec[hidden:2 * hidden], rec[2 * hidden:3 * hidden], rec[3 * hidden:]
                c_prev = cs[t, n]
                c_new = cs[t + 1, n]
                tc_new = tanh_cs[t, n]
                h_new = hs[t + 1, n]
                for j in range(hidden):
                    cp = c_prev[j]
                    i = fast_sigmoid(a_i[j] + r_i[j] + b_i[j] + p_i[j] * cp)
                    f = fast_sigmoid(a_f[j] + r_f[j] + b_f[j] + p_f[j] * cp)
                    g = fast_tanh(a_g[j] + r_g[j] + b_g[j])
                    c = f * cp + i * g
                    o = fast_sigmoid(a_o[j] + r_o[j] + b_o[j] + p_o[j] * c)
                    tc = fast_tanh(c)
                    a_i[j] = i
                    a_f[j] = f
                    a_g[j] = g
                    a_o[j] = o
                    c_new[j] = c
                    tc_new[j] = tc
                    h_new[j] = o * tc


@kernel
def lstm_backward_sequence(dhs, gates, w_hh, w_hh_t, peep, cs, tanh_cs, dh, dc, dgates, dpeep, swap, chunks, rows):
    """Backpropagation through time for one LSTM layer.

    dhs (T, N, H): gradient reaching each h_t from above; dh, dc (N, H): in, gradient
    w.r.t. the final (h, c); out, w.r.t. the initial (h, c).  dgates (T, N, 4H)
    receives the gate pre-activation gradients; dpeep (chunks, 3, H) += peephole
    gradients, one slab per row block so the threads never write the same entry.
    """
    steps, batch, width = gates.shape
    hidden = width // 4
    one = gates.dtype.type(1.0)
    p_i, p_f, p_o = peep[0], peep[1], peep[2]
    for chunk in prange(chunks):
        first, stop = chunk_rows(chunk, chunks, batch)
        dp_i, dp_f, dp_o = dpeep[chunk, 0], dpeep[chunk, 1], dpeep[chunk, 2]
        for t in range(steps - 1, -1, -1):
            for n in range(first, stop):
                row = gates[t, n]
                s_i, s_f, s_g, s_o = row[:hidden], row[hidden:2 * hidden], row[2 * hidden:3 * hidden], row[3 * hidden:]
                drow = dgates[t, n]
                d_i, d_f, d_g, d_o = drow[:hidden], drow[hidden:2 * hidden], drow[2 * hidden:3 * hidden], drow[3 * hidden:]
                tcs = tanh_cs[t, n]
                c_prev = cs[t, n]
                c_now = cs[t + 1, n]
                up = dhs[t, n]
                dh_n = dh[n]
                dc_n = dc[n]
                for j in range(hidden):
                    i = s_i[j]
                    f = s_f[j]
                    g = s_g[j]
                    o = s_o[j]
                    tc = tcs[j]
                    cp = c_prev[j]
                    grad_h = up[j] + dh_n[j]
                    grad_o = grad_h * tc * o * (one - o)
                    grad_c = dc_n[j] + grad_h * o * (one - tc * tc) + grad_o * p_o[j]
                    grad_i = grad_c * g * i * (one - i)
                    grad_f = grad_c * cp * f * (one - f)
                    d_i[j] = grad_i
                    d_f[j] = grad_f
                    d_g[j] = grad_c * i * (one - g * g)
                    d_o[j] = grad_o
                    dc_n[j] = grad_c * f + grad_i * p_i[j] + grad_f * p_f[j]
                    dp_i[j] += grad_i * cp
                    dp_f[j] += grad_f * cp
                    dp_o[j] += grad_o * c_now[j]
            product_rows(dgates[t], w_hh, w_hh_t, dh, first, stop, rows, swap[chunk])


# -- GRU (PyTorch's formulation) ----------------------------------------------------
# r = s(x_r + h_r), z = s(x_z + h_z), n = tanh(x_n + r * (W_hn h_{t-1} + b_hn)),
# h_t = (1 - z) n + z h_{t-1}.  The reset gate multiplies the *recurrent* part of the
# candidate, so the input and recurrent pre-activation gradients differ in block n.
@kernel
def gru_forward_sequence(gates, w_hh_t, w_hh, b_ih, b_hh, hs, hn, hh, swap, chunks, rows):
    """gates (T, N, 3H): X W_ih^T on entry, activated r, z, n on return; w_hh_t (H, 3H);
    hs (T+1, N, H) with hs[0] = h0; hn (T, N, H) receives W_hn h_{t-1} + b_hn (needed
    by backward); hh (N, 3H) scratch."""
    steps, batch, width = gates.shape
    hidden = width // 3
    one = gates.dtype.type(1.0)
    bi_r, bi_z, bi_n = b_ih[:hidden], b_ih[hidden:2 * hidden], b_ih[2 * hidden:]
    bh_r, bh_z, bh_n = b_hh[:hidden], b_hh[hidden:2 * hidden], b_hh[2 * hidden:]
    for chunk in prange(chunks):
        first, stop = chunk_rows(chunk, chunks, batch)
        for t in range(steps):
            product_rows(hs[t], w_hh_t, w_hh, hh, first, stop, rows, swap[chunk])
            for n in range(first, stop):
                row = gates[t, n]
                rec = hh[n]
                a_r, a_z, a_n = row[:hidden], row[hidden:2 * hidden], row[2 * hidden:]
                r_r, r_z, r_n = rec[:hidden], rec[hidden:2 * hidden], rec[2 * hidden:]
                h_prev = hs[t, n]
                h_new = hs[t + 1, n]
                hn_row = hn[t, n]
                for j in range(hidden):
                    r = fast_sigmoid(a_r[j] + bi_r[j] + r_r[j] + bh_r[j])
                    z = fast_sigmoid(a_z[j] + bi_z[j] + r_z[j] + bh_z[j])
                    rec_n = r_n[j] + bh_n[j]
                    cand = fast_tanh(a_n[j] + bi_n[j] + r * rec_n)
                    a_r[j] = r
                    a_z[j] = z
                    a_n[j] = cand
                    hn_row[j] = rec_n
                    h_new[j] = (one - z) * cand + z * h_prev[j]


@kernel
def gru_backward_sequence(dhs, gates, w_hh, w_hh_t, hs, hn, dh, dgx, dgh, dh_skip, swap, chunks, rows):
    """dhs, dh as for the LSTM; dgx (T, N, 3H) receives the input pre-activation
    gradients, dgh (T, N, 3H) the recurrent ones (they differ by r in block n);
    dh_skip (N, H) scratch for the z * dh shortcut."""
    steps, batch, width = gates.shape
    hidden = width // 3
    one = gates.dtype.type(1.0)
    for chunk in prange(chunks):
        first, stop = chunk_rows(chunk, chunks, batch)
        for t in range(steps - 1, -1, -1):
            for n in range(first, stop):
                row = gates[t, n]
                s_r, s_z, s_n = row[:hidden], row[hidden:2 * hidden], row[2 * hidden:]
                xrow = dgx[t, n]
                dx_r, dx_z, dx_n = xrow[:hidden], xrow[hidden:2 * hidden], xrow[2 * hidden:]
                hrow = dgh[t, n]
                dh_r, dh_z, dh_n = hrow[:hidden], hrow[hidden:2 * hidden], hrow[2 * hidden:]
                h_prev = hs[t, n]
                hn_row = hn[t, n]
                up = dhs[t, n]
                carry = dh[n]
                skip = dh_skip[n]
                for j in range(hidden):
                    r = s_r[j]
                    z = s_z[j]
                    cand = s_n[j]
                    grad_h = up[j] + carry[j]
                    grad_n = grad_h * (one - z) * (one - cand * cand)  # candidate pre-activation
                    grad_r = grad_n * hn_row[j] * r * (one - r)
                    grad_z = grad_h * (h_prev[j] - cand) * z * (one - z)
                    dx_r[j] = grad_r
                    dx_z[j] = grad_z
                    dx_n[j] = grad_n
                    dh_r[j] = grad_r
                    dh_z[j] = grad_z
                    dh_n[j] = grad_n * r
                    skip[j] = grad_h * z
            product_rows(dgh[t], w_hh, w_hh_t, dh, first, stop, rows, swap[chunk])
            for n in range(first, stop):
                carry = dh[n]
                skip = dh_skip[n]
                for j in range(hidden):
                    carry[j] += skip[j]


# =====================================================================================
# CUDA kernels: one fused gate kernel per step and direction (see the module docstring).
# Arrays of one step are (N, width) views of the time-major (T, N, ...) arrays; every
# kernel is a grid-stride loop over the N * H (row, unit) pairs of the step.


@cuda_device
def sigmoid_cuda(v, one):
    """1 / (1 + exp(-v)) without overflow: z = exp(-|v|) <= 1 (as the Sigmoid layer)."""
    z = math.exp(-abs(v))
    return (one if v >= 0 else z) / (one + z)


@cuda_kernel
def swap_leading_axes_cuda(src, dst):
    """dst[b, a, :] = src[a, b, :] (batch-first <-> time-major)."""
    first, second, width = src.shape
    for k in range(cuda.grid(1), src.size, cuda.gridsize(1)):
        a = k // (second * width)
        rest = k - a * second * width
        b = rest // width
        f = rest - b * width
        dst[b, a, f] = src[a, b, f]


@cuda_kernel
def add_cuda(a, b, out):
    """out = a + b on flat arrays (b_ih + b_hh, which the RNN and LSTM cells add once)."""
    for i in range(cuda.grid(1), a.size, cuda.gridsize(1)):
        out[i] = a[i] + b[i]


# -- vanilla RNN --------------------------------------------------------------------
@cuda_kernel
def rnn_step_forward_cuda(pre, rec, bias, h_new):
    """h_new = tanh(pre + rec + bias); pre = x_t W_ih^T, rec = h_{t-1} W_hh^T (N, H)."""
    batch, hidden = h_new.shape
    for k in range(cuda.grid(1), batch * hidden, cuda.gridsize(1)):
        n = k // hidden
        j = k - n * hidden
        h_new[n, j] = math.tanh(pre[n, j] + rec[n, j] + bias[j])


@cuda_kernel
def rnn_step_backward_cuda(up, h, dh, d):
    """d = (up + dh) * (1 - h^2): the pre-activation gradient of step t (h = h_t)."""
    batch, hidden = h.shape
    one = h.dtype.type(1.0)
    for k in range(cuda.grid(1), batch * hidden, cuda.gridsize(1)):
        n = k // hidden
        j = k - n * hidden
        v = h[n, j]
        d[n, j] = (up[n, j] + dh[n, j]) * (one - v * v)


# -- LSTM (peepholes p_i, p_f, p_o: zeros without them, as on the CPU) ----------------
@cuda_kernel
def lstm_step_forward_cuda(gates, rec, bias, p_i, p_f, p_o, c_prev, c_new, tanh_c, h_new):
    """gates (N, 4H): x_t W_ih^T on entry, activated i, f, g, o on return; rec (N, 4H) =
    h_{t-1} W_hh^T; bias (4H,) = b_ih + b_hh; c_prev, c_new, tanh_c, h_new (N, H)."""
    batch, hidden = h_new.shape
    one = gates.dtype.type(1.0)
    for k in range(cuda.grid(1), batch * hidden, cuda.gridsize(1)):
        n = k // hidden
        j = k - n * hidden
        jf = hidden + j
        jg = 2 * hidden + j
        jo = 3 * hidden + j
        cp = c_prev[n, j]
        i = sigmoid_cuda(gates[n, j] + rec[n, j] + bias[j] + p_i[j] * cp, one)
        f = sigmoid_cuda(gates[n, jf] + rec[n, jf] + bias[jf] + p_f[j] * cp, one)
        g = math.tanh(gates[n, jg] + rec[n, jg] + bias[jg])
        c = f * cp + i * g
        o = sigmoid_cuda(gates[n, jo] + rec[n, jo] + bias[jo] + p_o[j] * c, one)
        tc = math.tanh(c)
        gates[n, j] = i
        gates[n, jf] = f
        gates[n, jg] = g
        gates[n, jo] = o
        c_new[n, j] = c
        tanh_c[n, j] = tc
        h_new[n, j] = o * tc


@cuda_kernel
def lstm_step_backward_cuda(up, gates, p_i, p_f, p_o, c_prev, tanh_c, dh, dc, dgates):
    """Step t of BPTT: up (N, H) from above, dh/dc (N, H) from step t + 1 (dc is
    replaced by the gradient w.r.t. c_{t-1}); dgates (N, 4H) receives the gate
    pre-activation gradients (the caller then sets dh = dgates W_hh)."""
    batch, hidden = dh.shape
    one = gates.dtype.type(1.0)
    for k in range(cuda.grid(1), batch * hidden, cuda.gridsize(1)):
        n = k // hidden
        j = k - n * hidden
        jf = hidden + j
        jg = 2 * hidden + j
        jo = 3 * hidden + j
        i = gates[n, j]
        f = gates[n, jf]
        g = gates[n, jg]
        o = gates[n, jo]
        tc = tanh_c[n, j]
        grad_h = up[n, j] + dh[n, j]
        grad_o = grad_h * tc * o * (one - o)
        grad_c = dc[n, j] + grad_h * o * (one - tc * tc) + grad_o * p_o[j]
        grad_i = grad_c * g * i * (one - i)
        grad_f = grad_c * c_prev[n, j] * f * (one - f)
        dgates[n, j] = grad_i
        dgates[n, jf] = grad_f
        dgates[n, jg] = grad_c * i * (one - g * g)
        dgates[n, jo] = grad_o
        dc[n, j] = grad_c * f + grad_i * p_i[j] + grad_f * p_f[j]


@cuda_kernel
def lstm_peephole_grads_cuda(dgates, cs, g_i, g_f, g_o):
    """g_i += sum_{t,n} d_i c_{t-1}, g_f += sum d_f c_{t-1}, g_o += sum d_o c_t: one
    thread per (gate, unit) summing over steps then rows in order (deterministic)."""
    steps, batch, width = dgates.shape
    hidden = width // 4
    for k in range(cuda.grid(1), 3 * hidden, cuda.gridsize(1)):
        gate = k // hidden
        j = k - gate * hidden
        column = j if gate == 0 else (hidden + j if gate == 1 else 3 * hidden + j)
        shift = 1 if gate == 2 else 0  # the output gate sees c_t, the others c_{t-1}
        acc = np.float64(0.0)  # float64 on the device and under the simulator alike
        for t in range(steps):
            for n in range(batch):
                acc += dgates[t, n, column] * cs[t + shift, n, j]
        if gate == 0:
            g_i[j] += acc
        elif gate == 1:
            g_f[j] += acc
        else:
            g_o[j] += acc


# -- GRU ----------------------------------------------------------------------------
@cuda_kernel
def gru_step_forward_cuda(gates, rec, b_ih, b_hh, h_prev, h_new, hn):
    """gates (N, 3H): x_t W_ih^T on entry, activated r, z, n on return; rec (N, 3H) =
    h_{t-1} W_hh^T; hn (N, H) receives W_hn h_{t-1} + b_hn (needed by backward)."""
    batch, hidden = h_new.shape
    one = gates.dtype.type(1.0)
    for k in range(cuda.grid(1), batch * hidden, cuda.gridsize(1)):
        n = k // hidden
        j = k - n * hidden
        jz = hidden + j
        jn = 2 * hidden + j
        r = sigmoid_cuda(gates[n, j] + b_ih[j] + rec[n, j] + b_hh[j], one)
        z = sigmoid_cuda(gates[n, jz] + b_ih[jz] + rec[n, jz] + b_hh[jz], one)
        rec_n = rec[n, jn] + b_hh[jn]
        cand = math.tanh(gates[n, jn] + b_ih[jn] + r * rec_n)
        gates[n, j] = r
        gates[n, jz] = z
        gates[n, jn] = cand
        hn[n, j] = rec_n
        h_new[n, j] = (one - z) * cand + z * h_prev[n, j]


@cuda_kernel
def gru_step_backward_cuda(up, gates, h_prev, hn, dh, dgx, dgh):
    """Step t of BPTT: dgx/dgh (N, 3H) receive the input and recurrent pre-activation
    gradients; dh (N, H) is replaced by the z * dh shortcut, to which the caller adds
    dgh W_hh (GEMM with beta = 1) to get the gradient w.r.t. h_{t-1}."""
    batch, hidden = dh.shape
    one = gates.dtype.type(1.0)
    for k in range(cuda.grid(1), batch * hidden, cuda.gridsize(1)):
        n = k // hidden
        j = k - n * hidden
        jz = hidden + j
        jn = 2 * hidden + j
        r = gates[n, j]
        z = gates[n, jz]
        cand = gates[n, jn]
        grad_h = up[n, j] + dh[n, j]
        grad_n = grad_h * (one - z) * (one - cand * cand)
        grad_r = grad_n * hn[n, j] * r * (one - r)
        grad_z = grad_h * (h_prev[n, j] - cand) * z * (one - z)
        dgx[n, j] = grad_r
        dgx[n, jz] = grad_z
        dgx[n, jn] = grad_n
        dgh[n, j] = grad_r
        dgh[n, jz] = grad_z
        dgh[n, jn] = grad_n * r
        dh[n, j] = grad_h * z
