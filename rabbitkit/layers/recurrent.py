"""Recurrent layers: RNN (tanh), LSTM (optionally with peepholes) and GRU.

All three share :class:`Recurrent`, which owns the PyTorch parameter layout, the
stacking of layers, dropout between them, initial/final/carried states and the
large matrix products; each cell contributes two time-loop kernels from
:mod:`._recurrent_kernels` (one call per layer forward, one backward).

Inputs are (N, T, F) batches of sequences; outputs (N, T, H), or (N, H) for the
last step with ``return_sequences=False``.  States are (num_layers, N, H) arrays:
``(h, c)`` for the LSTM, ``h`` alone for RNN and GRU.

Parameter names and shapes follow ``torch.nn.LSTM``/``GRU``/``RNN``
(``weight_ih_l0`` (gates*H, F), ``weight_hh_l0`` (gates*H, H), ``bias_ih_l0``,
``bias_hh_l0``, then ``_l1`` ...), so PyTorch state dicts load unchanged.  The
LSTM's peephole weights ``weight_ci_l0``, ``weight_cf_l0``, ``weight_co_l0`` (H,)
have no PyTorch counterpart.

Speed: the input projection of all steps is one matrix product (a row gather when
the first layer's input is one-hot), each layer's time loop is one kernel call that
splits the batch over Numba's threads with a single-threaded BLAS per thread, and
the weight gradients are one product each over all steps.  How many rows of its
block a thread gives each BLAS call of the per-step product, and in which
orientation (``h @ W_hh^T`` or ``W_hh @ h^T``), is measured once per product shape
and machine (:meth:`Recurrent._time_loop`).

On ``device="cuda"`` the same layer runs through time on the GPU: the input
projection of all steps is one backend GEMM, each step one GEMM for the recurrent
product and one fused kernel for the gates and the cell update (forward and
backward alike), and the weight and bias gradients are single GEMMs and ordered
column sums over all steps afterwards (deterministic: no float atomics).  States,
carried states and state gradients stay on the device.

Dropout between stacked layers is :class:`~rabbitkit.layers.dropout.Dropout`'s:
the same Philox kernels make the mask where they apply it, on either device, so
the CPU and CUDA runs drop the same units bit for bit and no mask is uploaded.
One key is drawn from the layer's generator at the first training forward after
the layer is made or seeded; each training forward takes the next
``num_layers - 1`` streams, one for the output of each layer but the last.
Backward applies the forward's (key, stream) again: the same mask, made again.
"""
import math

import numba
import numpy as np

from ..backend import to_host
from ..backend.cpu import matmul
from ..errors import ConfigError
from ..hookspecs import hookimpl
from ._recurrent_kernels import (
    add_cuda,
    gru_backward_sequence,
    gru_step_backward_cuda,
    gru_step_forward_cuda,
    lstm_peephole_grads_cuda,
    lstm_step_backward_cuda,
    lstm_step_forward_cuda,
    one_hot_rows_cpu,
    gru_forward_sequence,
    lstm_backward_sequence,
    lstm_forward_sequence,
    rnn_backward_sequence,
    rnn_forward_sequence,
    rnn_step_backward_cuda,
    rnn_step_forward_cuda,
    swap_leading_axes_cuda,
)
from .base import Layer
from .dense import add_column_sums_cuda
from .dropout import DropoutMasks, apply_mask_cpu, apply_mask_cuda
from ..backend.cpu import SINGLE_THREADED_BLAS, rows_per_product
from .embedding import gather_rows_cpu, scatter_add_rows_cpu

# Each thread of a time-loop kernel takes a block of at least this many batch rows;
# thinner blocks make the per-step products too small to pay for the split.
MIN_ROWS_PER_THREAD = 4

# Rows per BLAS call of the per-step recurrent product that the tuner times, besides
# the built-in rule's choice and a thread's whole block (sizes over the block are the block).
ROW_BLOCK_CANDIDATES = (8, 16, 32)

# Multiply-adds of the recurrent product in one timed trial run: the trial runs the
# kernel over the first steps of the real sequence, as many as make about this much
# (at least one): a millisecond or two here, so a shape's measurement stays small
# whatever the sequence length.  Each step has the same product shape, so the
# first steps rank the candidates as the whole sequence would.
TRIAL_MULTIPLY_ADDS = 50_000_000


class Recurrent(Layer):
    """Shared machinery of stacked recurrent layers (see the module docstring).

    Subclasses set ``gates`` (gate blocks per unit), ``state_arrays`` (1, or 2 for
    (h, c)) and implement ``_forward_layer`` / ``_backward_layer`` for one layer.

    State handling:

    * ``initial_state``: settable; None means zeros.  Used by every forward until
      changed (a stateful layer replaces it after each forward).
    * ``final_state``: the state after the last step of the latest forward.
    * ``initial_state_grad``: after ``backward``, the gradient w.r.t. the initial
      state (e.g. for a seq2seq encoder whose final state fed a decoder).
    * ``backward(dy, state_grad=...)``: also backpropagate a gradient arriving at the
      final state; ``dy`` may be None when only the state is used downstream.
    * ``stateful=True``: each forward starts from the previous forward's final state,
      detached (truncated BPTT), until :meth:`reset_state`.  A batch of a different
      size than the carried state starts a new stream from zeros.

    ``needs_input_grad = False`` (an attribute) skips the input-gradient product
    when the layer below has no use for it (it follows a one-hot encoding); backward
    then returns None.
    """

    gates = 1
    state_arrays = 1
    #: Rows per BLAS call of the per-step recurrent product, forced (tests, benchmarks);
    #: None: measured by :mod:`rabbitkit.backend.tuning`, or the built-in rule when
    #: tuning is off.
    row_block = None
    #: With ``row_block`` forced: whether each call is the transposed product
    #: (:func:`~rabbitkit.backend.cpu.product_rows`).
    transposed_product = False

    def __init__(
        self,
        input_size,
        hidden_size,
        num_layers=1,
        return_sequences=True,
        dropout=0.0,
        stateful=False,
        dtype=np.float32,
    ):
        super().__init__(dtype)
        self.input_size = int(input_size)
        self.hidden_size = int(hidden_size)
        self.num_layers = int(num_layers)
        self.return_sequences = bool(return_sequences)
        self.dropout = float(dropout)
        self.stateful = bool(stateful)
        if self.input_size < 1 or self.hidden_size < 1 or self.num_layers < 1:
            raise ConfigError(
                f"{type(self).__name__}: input_size, hidden_size and num_layers must be positive, "
                f"got {input_size}, {hidden_size}, {num_layers}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{type(self).__name__}: dropout must be in [0, 1), got {dropout}")
        self.needs_input_grad = True
        self._initial_state = None
        self._state_carried = False
        self.final_state = None
        self.initial_state_grad = None
        self._cache = None
        self.dropout_masks = DropoutMasks(self.dropout, self.dtype)
        bound = 1.0 / math.sqrt(self.hidden_size)  # PyTorch's default for every tensor
        rows = self.gates * self.hidden_size
        for layer in range(self.num_layers):
            features = self.input_size if layer == 0 else self.hidden_size
            self.add_param(f"weight_ih_l{layer}", self.rng.uniform(-bound, bound, (rows, features)))
            self.add_param(f"weight_hh_l{layer}", self.rng.uniform(-bound, bound, (rows, self.hidden_size)))
            self.add_param(f"bias_ih_l{layer}", self.rng.uniform(-bound, bound, rows), role="bias")
            self.add_param(f"bias_hh_l{layer}", self.rng.uniform(-bound, bound, rows), role="bias")
            self._add_layer_params(layer, bound)

    def _add_layer_params(self, layer, bound):
        """Hook for cell-specific extra parameters (LSTM peepholes)."""

    def seed(self, seed):
        """Reset the generator and with it the dropout masks: a new key, streams from 0."""
        super().seed(seed)
        self.dropout_masks.reset()

    # -- states -------------------------------------------------------------------
    @property
    def initial_state(self):
        """The state the next forward starts from (None: zeros)."""
        return self._initial_state

    @initial_state.setter
    def initial_state(self, state):
        self._initial_state = None if state is None else self._as_state(state, "initial_state")
        self._state_carried = False

    def _as_state(self, state, what):
        arrays = (state,) if self.state_arrays == 1 else tuple(state)
        if len(arrays) != self.state_arrays:
            raise ConfigError(f"{type(self).__name__}.{what} needs {self.state_arrays} arrays (h, c), got {len(arrays)}")
        arrays = tuple(self._state_copy(a) for a in arrays)
        for a in arrays:
            if a.ndim != 3 or a.shape[0] != self.num_layers or a.shape[2] != self.hidden_size:
                raise ConfigError(
                    f"{type(self).__name__}.{what} arrays must be (num_layers, N, hidden) = "
                    f"({self.num_layers}, N, {self.hidden_size}), got {a.shape}"
                )
        return arrays[0] if self.state_arrays == 1 else arrays

    def _state_copy(self, array):
        """A copy of a state array on this layer's device (host or device input)."""
        if self.device == "cuda":
            out = self.backend.asarray(array, self.dtype)
            if out is array:  # already a device array of our dtype: copy it all the same
                out = self.backend.empty(array.shape, self.dtype)
                out.copy_to_device(array)
            return out
        return np.array(to_host(array), dtype=self.dtype, copy=True)

    def to(self, device):
        super().to(device)
        if self._initial_state is not None:  # a set or carried state follows the layer
            carried = self._state_carried
            arrays = self._state_tuple(self._initial_state)
            self._initial_state = self._pack_state([self._state_copy(a) for a in arrays])
            self._state_carried = carried
        return self

    def _state_tuple(self, state):
        return (state,) if self.state_arrays == 1 else tuple(state)

    def _pack_state(self, arrays):
        return arrays[0] if self.state_arrays == 1 else tuple(arrays)

    def reset_state(self):
        """Forget the carried (or set) initial state: the next forward starts from zeros."""
        self._initial_state = None
        self._state_carried = False

    def _start_state(self, batch):
        """(num_layers, N, H) arrays the forward starts from."""
        if self._initial_state is not None:
            arrays = self._state_tuple(self._initial_state)
            if arrays[0].shape[1] == batch:
                return arrays
            if not self._state_carried:
                raise ConfigError(
                    f"{type(self).__name__}.initial_state has batch size {arrays[0].shape[1]}, the input has {batch}"
                )
        shape = (self.num_layers, batch, self.hidden_size)
        if self.device == "cuda":
            return tuple(self.backend.zeros(shape, self.dtype) for _ in range(self.state_arrays))
        zeros = np.zeros(shape, dtype=self.dtype)
        return tuple(zeros.copy() for _ in range(self.state_arrays))

    # -- computation ----------------------------------------------------------------
    def _param(self, name, layer):
        return self.params[f"{name}_l{layer}"]

    def _split(self, batch):
        """(row blocks the time-loop kernels run in parallel, the built-in rule's rows
        per BLAS call in a block).

        One block without a BLAS thread limit; rows per call from
        :func:`~rabbitkit.backend.cpu.rows_per_product` (the recurrent product is
        rows x hidden by hidden x gates*hidden, forward and backward alike).  The
        rule is what runs with tuning off; with it on, :meth:`_time_loop` measures
        it against the other :meth:`_row_block_candidates`.

        The split itself is not a tuning candidate: batch rows never interact and
        each thread runs its block's whole time loop (one fork/join per layer), so
        fewer blocks than threads leaves threads idle.  On a shared 2-core machine
        one block timed level with two while another process held a core: such a
        measurement records the moment's load, which a per-machine cache must not
        keep.
        """
        chunks = 1
        if SINGLE_THREADED_BLAS.available:
            chunks = max(1, min(numba.get_num_threads(), batch // MIN_ROWS_PER_THREAD))
        block = -(-batch // chunks)
        return chunks, rows_per_product(self.hidden_size, self.gates * self.hidden_size, block)

    def _row_block_candidates(self, batch):
        """Rows per BLAS call worth timing for a batch: the rule's, ROW_BLOCK_CANDIDATES
        and a thread's whole block, ascending, each size once."""
        chunks, rule = self._split(batch)
        block = -(-batch // chunks)
        return sorted({min(rows, block) for rows in (rule, *ROW_BLOCK_CANDIDATES, block)})

    def _product_candidates(self, batch):
        """The tuner's candidates for the per-step product: {name: (rows per call,
        transposed)} for every row-block candidate in both orientations of
        :func:`~rabbitkit.backend.cpu.product_rows`."""
        return {f"{rows} rows" + (" transposed" if transposed else ""): (rows, transposed)
                for rows in self._row_block_candidates(batch) for transposed in (False, True)}

    def _recurrent_weights(self, layer, cache):
        """(W_hh, W_hh^T as a C array), the operands of the per-step products in either
        orientation; W_hh^T is kept in ``cache`` for backward."""
        w_hh = self._param("weight_hh", layer)
        cache["w_hh_t"] = np.ascontiguousarray(w_hh.T)
        return w_hh, cache["w_hh_t"]

    def _swap(self, chunks, rows, transposed):
        """Per-thread scratch of a transposed per-step product (empty: the direct one)."""
        size = rows * self.gates * self.hidden_size if transposed else 0
        return np.empty((chunks, size), dtype=self.dtype)

    def _time_loop(self, direction, kernel, args, time_major):
        """Run the time-loop ``kernel(*args, swap, chunks, rows)`` of one layer.

        ``args[0]`` is (T, N, ...); ``time_major`` lists the arguments whose first
        axis is time (T or T + 1 long).  ``rows`` (per BLAS call of the recurrent
        product) and its orientation (``swap``, see
        :func:`~rabbitkit.backend.cpu.product_rows`) are :attr:`row_block` and
        :attr:`transposed_product` if ``row_block`` is set, else the tuner's choice
        for this product shape, measured on the first use of the shape (see
        :meth:`_measured_product`), else the built-in rule in the direct
        orientation.  Any choice gives the same results up to float32 rounding.
        """
        batch = args[0].shape[1]
        chunks, rows = self._split(batch)
        with SINGLE_THREADED_BLAS:
            if self.row_block is not None:
                rows, transposed = self.row_block, self.transposed_product
            else:
                rows, transposed = self._measured_product(direction, kernel, args, time_major, chunks, rows)
            kernel(*args, self._swap(chunks, rows, transposed), chunks, rows)

    def _measured_product(self, direction, kernel, args, time_major, chunks, rule):
        """The tuner's (rows per call, transposed) for ``kernel`` at this product shape
        (``rule`` rows, direct, with tuning off).  Candidates run ``kernel`` itself, on
        copies of ``args`` cut to the first steps of the sequence: nothing the layer
        keeps is written, and no random numbers are drawn.  Before each timed run the
        copies are reset from ``args``, untimed, so every candidate works on the same
        inputs (the kernels overwrite some of theirs in place: gates, the carried
        state gradients).
        """
        from ..backend import tuning

        steps, batch = args[0].shape[:2]
        width = self.gates * self.hidden_size
        sources, trial = [], []  # filled on the first reset: a known shape copies nothing

        def reset_trial_arrays():
            if not trial:
                trial_steps = max(1, min(steps, TRIAL_MULTIPLY_ADDS // (batch * self.hidden_size * width)))
                sources.extend(a[:a.shape[0] - steps + trial_steps] if any(a is t for t in time_major) else a
                               for a in args)
                trial.extend(np.empty_like(a) if isinstance(a, np.ndarray) else a for a in sources)
            for copy, source in zip(trial, sources):
                if isinstance(source, np.ndarray):
                    np.copyto(copy, source)

        candidates = self._product_candidates(batch)
        # The product at each step: batch rows x hidden by hidden x width, split over threads.
        shape = (batch, self.hidden_size, width, self.dtype.name, f"{chunks} threads")
        choice = tuning.choose(
            f"{type(self).__name__.lower()}.{direction}", shape,
            {name: (lambda plan=plan: kernel(*trial, self._swap(chunks, *plan), chunks, plan[0]))
             for name, plan in candidates.items()},
            default=f"{rule} rows", setup=reset_trial_arrays,
        )
        return candidates[choice]

    def _bias(self, layer):
        """b_ih + b_hh: where the cell adds both, the kernel adds them once."""
        return self._param("bias_ih", layer) + self._param("bias_hh", layer)

    def _check_input(self, x):
        if x.ndim != 3 or x.shape[2] != self.input_size:
            raise ConfigError(
                f"{type(self).__name__} expects input (N, T, {self.input_size}), got shape {tuple(x.shape)}"
            )
        if x.shape[1] < 1:
            raise ConfigError(f"{type(self).__name__} needs at least one time step")
        return x.shape[0], x.shape[1]

    def _drops_after(self, layer, training):
        """Whether dropout applies to this layer's output (training, between layers)."""
        return training and self.dropout > 0 and layer < self.num_layers - 1

    def _finish_forward(self, caches, shape, finals):
        self._cache = {"caches": caches, "shape": shape}
        self.final_state = self._pack_state(finals)
        if self.stateful:
            # Carry the state into the next forward, detached: BPTT stops at this boundary.
            self._initial_state = self._pack_state([self._state_copy(f) for f in finals])
            self._state_carried = True

    def forward_cpu(self, x, training):
        batch, steps = self._check_input(x)
        start = self._start_state(batch)
        inp = np.ascontiguousarray(x.transpose(1, 0, 2))  # time-major (T, N, F)
        caches = []
        finals = [np.empty((self.num_layers, batch, self.hidden_size), dtype=self.dtype) for _ in start]
        for layer in range(self.num_layers):
            cache = {"input": inp}
            xproj = self._input_projection(layer, inp.reshape(steps * batch, -1), cache)
            out = self._forward_layer(layer, xproj.reshape(steps, batch, -1), [s[layer] for s in start], cache)
            for final, value in zip(finals, cache["final"]):
                final[layer] = value
            if self._drops_after(layer, training):
                cache["mask"] = self.dropout_masks.take(self.rng)
                dropped = np.empty_like(out)  # out is the kept states' view: not in place
                apply_mask_cpu(cache["mask"], out.reshape(-1), dropped.reshape(-1))
                out = dropped
            caches.append(cache)
            inp = out
        self._finish_forward(caches, x.shape, finals)
        if self.return_sequences:
            return np.ascontiguousarray(inp.transpose(1, 0, 2))
        return np.ascontiguousarray(inp[-1])

    def backward(self, dy, state_grad=None):
        """Input gradient for ``dy`` (None: no gradient from the outputs) plus, optionally,
        ``state_grad`` arriving at the final state (same structure as ``final_state``)."""
        if self.device == "cuda":
            if dy is not None:
                dy = self.backend.asarray(dy, self.dtype)
            return self._backward_cuda(dy, state_grad)
        if dy is not None:
            dy = np.ascontiguousarray(dy, dtype=self.dtype)
        return self._backward(dy, state_grad)

    def backward_cpu(self, dy):
        return self._backward(dy, None)

    def _backward(self, dy, state_grad):
        if self._cache is None:
            raise RuntimeError(f"{type(self).__name__}.backward called before forward")
        batch, steps, _ = self._cache["shape"]
        shape = (steps, batch, self.hidden_size)
        if dy is None:
            dout = np.zeros(shape, dtype=self.dtype)
        elif self.return_sequences:
            dout = np.ascontiguousarray(dy.reshape(batch, steps, self.hidden_size).transpose(1, 0, 2))
        else:
            dout = np.zeros(shape, dtype=self.dtype)
            dout[-1] = dy.reshape(batch, self.hidden_size)
        if state_grad is None:
            dstate = [np.zeros((self.num_layers, batch, self.hidden_size), dtype=self.dtype) for _ in range(self.state_arrays)]
        else:
            dstate = [np.array(a, dtype=self.dtype, copy=True) for a in self._state_tuple(state_grad)]
        dinp = None
        for layer in range(self.num_layers - 1, -1, -1):
            cache = self._cache["caches"][layer]
            dcarry = [np.ascontiguousarray(d[layer]) for d in dstate]
            dgx, dgh = self._backward_layer(layer, dout, dcarry, cache)
            for d, value in zip(dstate, dcarry):
                d[layer] = value  # now the gradient w.r.t. the initial state
            inp = cache["input"]
            rows = steps * batch
            inp2 = inp.reshape(rows, -1)
            dgx2 = dgx.reshape(rows, -1)
            dgh2 = dgh.reshape(rows, -1)
            self._input_weight_grad(layer, dgx2, inp2, cache)
            matmul(dgh2.T, cache["hs"][:steps].reshape(rows, -1), self.grads[f"weight_hh_l{layer}"], accumulate=True)
            dbias = dgx2.sum(axis=0)
            self.grads[f"bias_ih_l{layer}"] += dbias
            self.grads[f"bias_hh_l{layer}"] += dbias if dgh is dgx else dgh2.sum(axis=0)
            if layer == 0 and not self.needs_input_grad:
                dinp = None
                break
            dinp = matmul(dgx2, self._param("weight_ih", layer)).reshape(steps, batch, -1)
            if layer > 0:
                below = self._cache["caches"][layer - 1]
                if "mask" in below:  # the forward's mask, made again, in place
                    flat = dinp.reshape(-1)  # (matmul's fresh array: a view)
                    apply_mask_cpu(below["mask"], flat, flat)
                dout = dinp
        self.initial_state_grad = self._pack_state(dstate)
        if dinp is None:
            return None
        return np.ascontiguousarray(dinp.transpose(1, 0, 2))

    # -- CUDA: the same structure, time loop on the host, one GEMM + one fused kernel a step --
    def forward_cuda(self, x, training):
        batch, steps = self._check_input(x)
        backend = self.backend
        start = self._start_state(batch)
        rows = steps * batch
        inp = backend.empty((steps, batch, self.input_size), self.dtype)  # time-major (T, N, F)
        swap_leading_axes_cuda.launch(x.size, x, inp)
        caches = []
        finals = [backend.empty((self.num_layers, batch, self.hidden_size), self.dtype) for _ in start]
        for layer in range(self.num_layers):
            cache = {"input": inp}
            # X W_ih^T for all steps in one product (one-hot input too: exact either way).
            xproj = backend.empty((rows, self.gates * self.hidden_size), self.dtype)
            backend.gemm(inp.reshape(rows, inp.shape[2]), self._param("weight_ih", layer), xproj, trans_b=True)
            out = self._forward_layer_cuda(layer, xproj.reshape(steps, batch, xproj.shape[1]),
                                           [s[layer] for s in start], cache)
            for final, value in zip(finals, cache["final"]):
                final[layer].copy_to_device(value)
            if self._drops_after(layer, training):
                cache["mask"] = self.dropout_masks.take(self.rng)
                dropped = backend.empty(out.shape, self.dtype)
                apply_mask_cuda(cache["mask"], out.reshape(out.size), dropped.reshape(out.size))
                out = dropped
            caches.append(cache)
            inp = out
        self._finish_forward(caches, x.shape, finals)
        if self.return_sequences:
            y = backend.empty((batch, steps, self.hidden_size), self.dtype)
            swap_leading_axes_cuda.launch(inp.size, inp, y)
            return y
        y = backend.empty((batch, self.hidden_size), self.dtype)
        y.copy_to_device(inp[steps - 1])
        return y

    def backward_cuda(self, dy):
        return self._backward_cuda(dy, None)

    def _backward_cuda(self, dy, state_grad):
        if self._cache is None:
            raise RuntimeError(f"{type(self).__name__}.backward called before forward")
        backend = self.backend
        batch, steps, _ = self._cache["shape"]
        hidden = self.hidden_size
        shape = (steps, batch, hidden)
        if dy is not None and self.return_sequences:
            dout = backend.empty(shape, self.dtype)
            swap_leading_axes_cuda.launch(dy.size, dy.reshape(batch, steps, hidden), dout)
        else:
            dout = backend.zeros(shape, self.dtype)
            if dy is not None:
                dout[steps - 1].copy_to_device(dy.reshape(batch, hidden))
        if state_grad is None:
            dstate = [backend.zeros((self.num_layers, batch, hidden), self.dtype) for _ in range(self.state_arrays)]
        else:
            dstate = [self._state_copy(a) for a in self._state_tuple(state_grad)]
        rows = steps * batch
        dinp = None
        for layer in range(self.num_layers - 1, -1, -1):
            cache = self._cache["caches"][layer]
            # (N, H) views of the state gradients: the step kernels update them in place,
            # leaving the gradient w.r.t. this layer's initial state.
            dgx, dgh = self._backward_layer_cuda(layer, dout, [d[layer] for d in dstate], cache)
            inp = cache["input"]
            inp2 = inp.reshape(rows, inp.shape[2])
            dgx2 = dgx.reshape(rows, dgx.shape[2])
            dgh2 = dgh.reshape(rows, dgh.shape[2])
            backend.gemm(dgx2, inp2, self.grads[f"weight_ih_l{layer}"], trans_a=True, beta=1.0)
            backend.gemm(dgh2, cache["hs"][:steps].reshape(rows, hidden), self.grads[f"weight_hh_l{layer}"],
                         trans_a=True, beta=1.0)
            width = dgx2.shape[1]
            add_column_sums_cuda.launch(width, dgx2, self.grads[f"bias_ih_l{layer}"])
            add_column_sums_cuda.launch(width, dgh2, self.grads[f"bias_hh_l{layer}"])
            if layer == 0 and not self.needs_input_grad:
                dinp = None
                break
            dinp = backend.empty((steps, batch, inp.shape[2]), self.dtype)
            backend.gemm(dgx2, self._param("weight_ih", layer), dinp.reshape(rows, inp.shape[2]))
            if layer > 0:
                below = self._cache["caches"][layer - 1]
                if "mask" in below:
                    flat = dinp.reshape(dinp.size)
                    apply_mask_cuda(below["mask"], flat, flat)
                dout = dinp
        self.initial_state_grad = self._pack_state(dstate)
        if dinp is None:
            return None
        dx = backend.empty((batch, steps, dinp.shape[2]), self.dtype)
        swap_leading_axes_cuda.launch(dinp.size, dinp, dx)
        return dx

    def _bias_cuda(self, layer):
        """b_ih + b_hh on the device."""
        b_ih, b_hh = self._param("bias_ih", layer), self._param("bias_hh", layer)
        out = self.backend.empty(b_ih.shape, self.dtype)
        add_cuda.launch(out.size, b_ih, b_hh, out)
        return out

    def _states_cuda(self, steps, batch, start):
        """(T+1, N, H) device arrays with row 0 set to each start state."""
        arrays = []
        for value in start:
            array = self.backend.empty((steps + 1, batch, self.hidden_size), self.dtype)
            array[0].copy_to_device(value)
            arrays.append(array)
        return arrays

    # -- the input projection: one matrix product, or a row gather for one-hot input --------
    def _input_projection(self, layer, rows, cache):
        """X W_ih^T for all steps at once, (T*N, gates*H).

        When every input row of the first layer is a one-hot code (char-rnn's input),
        the product is a gather of W_ih's columns, and the weight gradient below a
        scatter-add: two (T*N x V x gates*H) products saved, results identical.
        """
        weight = self._param("weight_ih", layer)
        if layer == 0 and self.input_size > 1:
            indices = np.empty(rows.shape[0], dtype=np.int64)
            if one_hot_rows_cpu(rows, indices):
                cache["one_hot"] = indices
                out = np.empty((rows.shape[0], weight.shape[0]), dtype=self.dtype)
                gather_rows_cpu(out.size, indices, np.ascontiguousarray(weight.T), out)
                return out
        return matmul(rows, weight.T)

    def _input_weight_grad(self, layer, dgx2, rows, cache):
        """grad W_ih += dgates^T X (a scatter-add of dgates rows for one-hot input)."""
        grad = self.grads[f"weight_ih_l{layer}"]
        if "one_hot" in cache:
            grad_t = np.zeros((grad.shape[1], grad.shape[0]), dtype=self.dtype)
            scatter_add_rows_cpu(cache["one_hot"], dgx2, grad_t)
            grad += grad_t.T
        else:
            matmul(dgx2.T, rows, grad, accumulate=True)

    # -- per-cell hooks ---------------------------------------------------------------
    def _forward_layer(self, layer, xproj, start, cache):
        """Run one layer over the sequence; fill ``cache`` (incl. "hs" (T+1, N, H) and
        "final", a list of (N, H) arrays); return its output (T, N, H)."""
        raise NotImplementedError

    def _backward_layer(self, layer, dout, dcarry, cache):
        """BPTT for one layer: update ``dcarry`` (final- to initial-state gradients) in
        place; return (input pre-activation grads, recurrent pre-activation grads)."""
        raise NotImplementedError

    def _forward_layer_cuda(self, layer, xproj, start, cache):
        """CUDA twin of :meth:`_forward_layer` (device arrays, one GEMM + one kernel a step)."""
        raise NotImplementedError

    def _backward_layer_cuda(self, layer, dout, dcarry, cache):
        """CUDA twin of :meth:`_backward_layer`."""
        raise NotImplementedError

    # -- shapes and summary -------------------------------------------------------------
    def output_shape(self, input_shape):
        steps = input_shape[0]
        return (steps, self.hidden_size) if self.return_sequences else (self.hidden_size,)

    def flops(self, input_shape):
        steps = input_shape[0]
        rows = self.gates * self.hidden_size
        total = 0
        for layer in range(self.num_layers):
            features = self.input_size if layer == 0 else self.hidden_size
            total += 2 * steps * rows * (features + self.hidden_size)
        return total

    def extra_repr(self):
        text = f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}"
        if not self.return_sequences:
            text += ", return_sequences=False"
        if self.dropout:
            text += f", dropout={self.dropout}"
        if self.stateful:
            text += ", stateful=True"
        return text


class RNN(Recurrent):
    """Elman RNN with tanh: h_t = tanh(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)."""

    gates = 1
    state_arrays = 1

    def _forward_layer(self, layer, xproj, start, cache):
        steps, batch, _ = xproj.shape
        hs = np.empty((steps + 1, batch, self.hidden_size), dtype=self.dtype)
        hs[0] = start[0]
        w_hh, w_hh_t = self._recurrent_weights(layer, cache)
        scratch = np.empty((batch, self.hidden_size), dtype=self.dtype)
        self._time_loop("forward", rnn_forward_sequence, (xproj, w_hh_t, w_hh, self._bias(layer), hs, scratch),
                        time_major=(xproj, hs))
        cache["hs"] = hs
        cache["final"] = [hs[-1]]
        return hs[1:]

    def _backward_layer(self, layer, dout, dcarry, cache):
        dpre = np.empty_like(dout)
        self._time_loop("backward", rnn_backward_sequence, (dout, self._param("weight_hh", layer), cache["w_hh_t"],
                                                            cache["hs"], dcarry[0], dpre),
                        time_major=(dout, cache["hs"], dpre))
        return dpre, dpre

    def _forward_layer_cuda(self, layer, xproj, start, cache):
        steps, batch, _ = xproj.shape
        (hs,) = self._states_cuda(steps, batch, start)
        weight, bias = self._param("weight_hh", layer), self._bias_cuda(layer)
        rec = self.backend.empty((batch, self.hidden_size), self.dtype)
        for t in range(steps):
            self.backend.gemm(hs[t], weight, rec, trans_b=True)
            rnn_step_forward_cuda.launch(rec.size, xproj[t], rec, bias, hs[t + 1])
        cache["hs"] = hs
        cache["final"] = [hs[steps]]
        return hs[1:]

    def _backward_layer_cuda(self, layer, dout, dcarry, cache):
        steps = dout.shape[0]
        hs, dh = cache["hs"], dcarry[0]
        weight = self._param("weight_hh", layer)
        dpre = self.backend.empty(dout.shape, self.dtype)
        for t in range(steps - 1, -1, -1):
            rnn_step_backward_cuda.launch(dh.size, dout[t], hs[t + 1], dh, dpre[t])
            self.backend.gemm(dpre[t], weight, dh)
        return dpre, dpre


class LSTM(Recurrent):
    """Long short-term memory, gates (i, f, g, o) stacked as in ``torch.nn.LSTM``.

    ``peephole=True`` adds Gers' peephole connections: the input and forget gates see
    c_{t-1}, the output gate sees c_t, through diagonal weights ``weight_ci_l{k}``,
    ``weight_cf_l{k}``, ``weight_co_l{k}`` of shape (H,).  States are ``(h, c)``.
    """

    gates = 4
    state_arrays = 2

    def __init__(self, input_size, hidden_size, num_layers=1, return_sequences=True, dropout=0.0,
                 stateful=False, peephole=False, dtype=np.float32):
        self.peephole = bool(peephole)
        super().__init__(input_size, hidden_size, num_layers, return_sequences, dropout, stateful, dtype)
        self._no_peep = np.zeros((3, self.hidden_size), dtype=self.dtype)

    def _add_layer_params(self, layer, bound):
        if self.peephole:
            # role "other": diagonal weights, left alone by initializers and weight decay.
            for gate in ("ci", "cf", "co"):
                self.add_param(f"weight_{gate}_l{layer}", self.rng.uniform(-bound, bound, self.hidden_size), role="other")

    def _peepholes(self, layer):
        if not self.peephole:
            return self._no_peep
        return np.stack([self._param(f"weight_{gate}", layer) for gate in ("ci", "cf", "co")])

    def _forward_layer(self, layer, gates, start, cache):
        steps, batch, _ = gates.shape
        shape = (steps + 1, batch, self.hidden_size)
        hs = np.empty(shape, dtype=self.dtype)
        cs = np.empty(shape, dtype=self.dtype)
        hs[0] = start[0]
        cs[0] = start[1]
        tanh_cs = np.empty((steps, batch, self.hidden_size), dtype=self.dtype)
        w_hh, w_hh_t = self._recurrent_weights(layer, cache)
        scratch = np.empty((batch, self.gates * self.hidden_size), dtype=self.dtype)
        peep = self._peepholes(layer)
        self._time_loop("forward", lstm_forward_sequence, (gates, w_hh_t, w_hh, self._bias(layer), peep, hs, cs,
                                                           tanh_cs, scratch), time_major=(gates, hs, cs, tanh_cs))
        cache.update(gates=gates, hs=hs, cs=cs, tanh_cs=tanh_cs, peep=peep, final=[hs[-1], cs[-1]])
        return hs[1:]

    def _backward_layer(self, layer, dout, dcarry, cache):
        dgates = np.empty_like(cache["gates"])
        chunks, _ = self._split(dout.shape[1])
        dpeep = np.zeros((chunks, 3, self.hidden_size), dtype=self.dtype)
        self._time_loop(
            "backward", lstm_backward_sequence,
            (dout, cache["gates"], self._param("weight_hh", layer), cache["w_hh_t"], cache["peep"], cache["cs"],
             cache["tanh_cs"], dcarry[0], dcarry[1], dgates, dpeep),
            time_major=(dout, cache["gates"], cache["cs"], cache["tanh_cs"], dgates),
        )
        if self.peephole:
            dpeep = dpeep.sum(axis=0)
            for row, gate in enumerate(("ci", "cf", "co")):
                self.grads[f"weight_{gate}_l{layer}"] += dpeep[row]
        return dgates, dgates

    def _peepholes_cuda(self, layer):
        """(p_i, p_f, p_o) device arrays: the parameters, or one shared zeros array."""
        if self.peephole:
            return tuple(self._param(f"weight_{gate}", layer) for gate in ("ci", "cf", "co"))
        zeros = getattr(self, "_no_peep_cuda", None)
        if zeros is None or zeros.shape[0] != self.hidden_size:
            zeros = self._no_peep_cuda = self.backend.zeros((self.hidden_size,), self.dtype)
        return zeros, zeros, zeros

    def _forward_layer_cuda(self, layer, gates, start, cache):
        steps, batch, width = gates.shape
        hs, cs = self._states_cuda(steps, batch, start)
        tanh_cs = self.backend.empty((steps, batch, self.hidden_size), self.dtype)
        weight, bias = self._param("weight_hh", layer), self._bias_cuda(layer)
        peep = self._peepholes_cuda(layer)
        rec = self.backend.empty((batch, width), self.dtype)
        units = batch * self.hidden_size
        for t in range(steps):
            self.backend.gemm(hs[t], weight, rec, trans_b=True)
            lstm_step_forward_cuda.launch(units, gates[t], rec, bias, *peep, cs[t], cs[t + 1], tanh_cs[t], hs[t + 1])
        cache.update(gates=gates, hs=hs, cs=cs, tanh_cs=tanh_cs, peep=peep, final=[hs[steps], cs[steps]])
        return hs[1:]

    def _backward_layer_cuda(self, layer, dout, dcarry, cache):
        steps = dout.shape[0]
        gates, cs, tanh_cs = cache["gates"], cache["cs"], cache["tanh_cs"]
        dh, dc = dcarry
        weight = self._param("weight_hh", layer)
        dgates = self.backend.empty(gates.shape, self.dtype)
        for t in range(steps - 1, -1, -1):
            lstm_step_backward_cuda.launch(dh.size, dout[t], gates[t], *cache["peep"], cs[t], tanh_cs[t], dh, dc,
                                           dgates[t])
            self.backend.gemm(dgates[t], weight, dh)
        if self.peephole:
            grads = tuple(self.grads[f"weight_{gate}_l{layer}"] for gate in ("ci", "cf", "co"))
            lstm_peephole_grads_cuda.launch(3 * self.hidden_size, dgates, cs, *grads)
        return dgates, dgates

    def extra_repr(self):
        return super().extra_repr() + (", peephole=True" if self.peephole else "")


class GRU(Recurrent):
    """Gated recurrent unit as in ``torch.nn.GRU`` (gates r, z, n):
    n = tanh(W_in x + b_in + r * (W_hn h + b_hn)), h' = (1 - z) n + z h."""

    gates = 3
    state_arrays = 1

    def _forward_layer(self, layer, gates, start, cache):
        steps, batch, _ = gates.shape
        hs = np.empty((steps + 1, batch, self.hidden_size), dtype=self.dtype)
        hs[0] = start[0]
        hn = np.empty((steps, batch, self.hidden_size), dtype=self.dtype)
        w_hh, w_hh_t = self._recurrent_weights(layer, cache)
        scratch = np.empty((batch, self.gates * self.hidden_size), dtype=self.dtype)
        self._time_loop("forward", gru_forward_sequence, (gates, w_hh_t, w_hh, self._param("bias_ih", layer),
                                                          self._param("bias_hh", layer), hs, hn, scratch),
                        time_major=(gates, hs, hn))
        cache.update(gates=gates, hs=hs, hn=hn, final=[hs[-1]])
        return hs[1:]

    def _backward_layer(self, layer, dout, dcarry, cache):
        dgx = np.empty_like(cache["gates"])
        dgh = np.empty_like(dgx)
        scratch = np.empty_like(dcarry[0])
        self._time_loop(
            "backward", gru_backward_sequence,
            (dout, cache["gates"], self._param("weight_hh", layer), cache["w_hh_t"], cache["hs"], cache["hn"],
             dcarry[0], dgx, dgh, scratch),
            time_major=(dout, cache["gates"], cache["hs"], cache["hn"], dgx, dgh),
        )
        return dgx, dgh

    def _forward_layer_cuda(self, layer, gates, start, cache):
        steps, batch, width = gates.shape
        (hs,) = self._states_cuda(steps, batch, start)
        hn = self.backend.empty((steps, batch, self.hidden_size), self.dtype)
        weight = self._param("weight_hh", layer)
        b_ih, b_hh = self._param("bias_ih", layer), self._param("bias_hh", layer)
        rec = self.backend.empty((batch, width), self.dtype)
        units = batch * self.hidden_size
        for t in range(steps):
            self.backend.gemm(hs[t], weight, rec, trans_b=True)
            gru_step_forward_cuda.launch(units, gates[t], rec, b_ih, b_hh, hs[t], hs[t + 1], hn[t])
        cache.update(gates=gates, hs=hs, hn=hn, final=[hs[steps]])
        return hs[1:]

    def _backward_layer_cuda(self, layer, dout, dcarry, cache):
        steps = dout.shape[0]
        gates, hs, hn = cache["gates"], cache["hs"], cache["hn"]
        dh = dcarry[0]
        weight = self._param("weight_hh", layer)
        dgx = self.backend.empty(gates.shape, self.dtype)
        dgh = self.backend.empty(gates.shape, self.dtype)
        for t in range(steps - 1, -1, -1):
            gru_step_backward_cuda.launch(dh.size, dout[t], gates[t], hs[t], hn[t], dh, dgx[t], dgh[t])
            self.backend.gemm(dgh[t], weight, dh, beta=1.0)  # dh = dgh W_hh + z * dh
        return dgx, dgh


@hookimpl
def rabbit_layers():
    return {"RNN": RNN, "LSTM": LSTM, "GRU": GRU}
