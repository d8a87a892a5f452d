"""Inverted dropout: zero each input with probability p in training and scale the
kept ones by 1/(1-p), so evaluation is the identity.

The keep mask is never stored or copied: the kernel makes it where it applies it,
from Philox-4x32-10 (:mod:`rabbitkit.backend.philox`), a counter-based generator
whose one definition the CPU and CUDA kernels share.  Element ``i`` of a
training forward reads one 32-bit word of the generator at counter ``(i mod q,
stream)`` under the layer's key (``q`` = a quarter of the elements, rounded up; one
call gives the words of elements ``b, b + q, b + 2q, b + 3q``, so neighbouring CUDA
threads touch neighbouring elements), and drops the element when the word is
below ``p * 2**32``.  So both devices drop the same units bit for bit, and a step
on CUDA uploads no mask.

The key is drawn from the layer's own generator (``self.rng``) at the first
training forward after the layer is made or ``layer.seed(s)`` is called, and the
stream counts the training forwards since, so ``layer.seed(s)`` or
``rabbitkit.manual_seed`` reproduce the masks on any device and with any thread
count.  The trainer reseeds the model before every step from (seed, epoch,
batch), which makes a resumed run's masks those of an uninterrupted one with
nothing to checkpoint.  Backward runs the same kernel with the forward's key and
stream: the same mask, made again instead of kept.
"""
import numpy as np

from ..backend.cpu import kernel
from ..backend.cuda import cuda_kernel, device_pair
from ..backend.philox import PHILOX_WORDS, keep_threshold, philox4x32_10_cpu, philox4x32_10_cuda
from ..errors import ConfigError
from ..hookspecs import hookimpl
from .base import Layer

cuda = None  # numba.cuda, bound on the first CUDA launch


def apply_words(x, y, block, quarter, words, threshold, scale):
    """y = x * scale at the four elements of ``block`` whose Philox ``words`` are
    >= threshold, else 0 (see the module docstring for which word is whose)."""
    for lane in range(PHILOX_WORDS):
        i = lane * quarter + block
        if i < x.size:
            if words[lane] >= threshold:
                y[i] = x[i] * scale
            else:  # not "x * scale if kept else 0.0": that is float64, converted twice
                y[i] = 0


apply_words_cpu, apply_words_cuda = device_pair(apply_words)


# Serial: LLVM vectorises this loop, Philox rounds included (0.5-0.9 ns an element,
# 4M float32 elements, one or two threads, measured here), where under prange, even
# over chunks of serial loops, it does not (9-15 ns an element).
@kernel(parallel=False)
def dropout_cpu(x, key, stream, threshold, scale, y):
    """y = x * scale where the element's Philox word is >= threshold, else 0 (flat
    arrays); also the backward pass."""
    quarter = (x.size + PHILOX_WORDS - 1) // PHILOX_WORDS
    for block in range(quarter):
        apply_words_cpu(x, y, block, quarter, philox4x32_10_cpu(block, stream, key), threshold, scale)


@cuda_kernel
def dropout_cuda(x, key, stream, threshold, scale, y):
    """:func:`dropout_cpu` with a grid-stride loop over the blocks of four words."""
    quarter = (x.size + PHILOX_WORDS - 1) // PHILOX_WORDS
    for block in range(cuda.grid(1), quarter, cuda.gridsize(1)):
        apply_words_cuda(x, y, block, quarter, philox4x32_10_cuda(block, stream, key), threshold, scale)


class Dropout(Layer):
    """Inverted dropout with drop probability ``p`` (0 <= p <= 1); works on any shape."""

    def __init__(self, p=0.5, dtype=np.float32):
        super().__init__(dtype)
        self.p = float(p)
        if not 0.0 <= self.p <= 1.0:
            raise ConfigError(f"Dropout probability must be in [0, 1], got {p}")
        # p = 1 drops everything; the scale then never multiplies a kept value.
        self.scale = 1.0 / (1.0 - self.p) if self.p < 1.0 else 0.0
        self.threshold = keep_threshold(self.p)
        self.key = None  # drawn from self.rng by the first training forward (see the module docstring)
        self.stream = 0  # the Philox stream of the next training forward's mask
        self._mask = None  # (key, stream) of the last training forward: what backward applies again

    def seed(self, seed):
        """Reset the generator and with it the masks: a new key, and streams from 0."""
        super().seed(seed)
        self.key = None
        self.stream = 0

    def _next_mask(self):
        if self.key is None:
            self.key = int(self.rng.integers(0, 2 ** 64, dtype=np.uint64))
        mask = (self.key, self.stream)
        self.stream += 1
        return mask

    def _active(self, training):
        return training and self.p > 0.0

    def _mask_args(self):
        key, stream = self._mask
        return np.uint64(key), np.uint64(stream), self.threshold, self.dtype.type(self.scale)

    def forward_cpu(self, x, training):
        if not self._active(training):
            self._mask = None
            return x
        self._mask = self._next_mask()
        return self._apply_cpu(x)

    def backward_cpu(self, dy):
        if self._mask is None:
            return dy
        return self._apply_cpu(dy)

    def _apply_cpu(self, x):
        y = np.empty_like(x)
        dropout_cpu(x.reshape(-1), *self._mask_args(), y.reshape(-1))
        return y

    def forward_cuda(self, x, training):
        if not self._active(training):
            self._mask = None
            return x
        self._mask = self._next_mask()
        return self._apply_cuda(x)

    def backward_cuda(self, dy):
        if self._mask is None:
            return dy
        return self._apply_cuda(dy)

    def _apply_cuda(self, x):
        y = self.backend.empty(x.shape, self.dtype)
        blocks = -(-x.size // PHILOX_WORDS)
        dropout_cuda.launch(blocks, x.reshape(x.size), *self._mask_args(), y.reshape(y.size))
        return y

    def output_shape(self, input_shape):
        return tuple(input_shape)

    def extra_repr(self):
        return f"p={self.p}"


@hookimpl
def rabbit_layers():
    return {"Dropout": Dropout}
