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

:class:`DropoutMasks` keeps that key and stream, and :func:`apply_mask_cpu` /
:func:`apply_mask_cuda` run the kernels on flat arrays: the recurrent layers'
dropout between stacked layers uses the same three.
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


class DropoutMasks:
    """The masks of one layer's dropout with drop probability ``p``: the Philox key,
    drawn from the layer's generator at the first mask after :meth:`reset`, and the
    stream of the next mask, which counts the masks taken since."""

    def __init__(self, p, dtype):
        self.threshold = keep_threshold(p)
        # p = 1 drops everything; the scale then never multiplies a kept value.
        self.scale = np.dtype(dtype).type(1.0 / (1.0 - p) if p < 1.0 else 0.0)
        self.reset()

    def reset(self):
        """A new key at the next mask, and streams from 0 (what ``layer.seed`` does)."""
        self.key = None
        self.stream = 0

    def take(self, rng):
        """The next mask, as the kernel arguments ``(key, stream, threshold, scale)``:
        :func:`apply_mask_cpu` / :func:`apply_mask_cuda` with it make the same mask
        again (backward)."""
        if self.key is None:
            self.key = int(rng.integers(0, 2 ** 64, dtype=np.uint64))
        mask = (np.uint64(self.key), np.uint64(self.stream), self.threshold, self.scale)
        self.stream += 1
        return mask


def apply_mask_cpu(mask, x, y):
    """y = x dropped by ``mask`` (from :meth:`DropoutMasks.take`) and scaled; flat
    arrays, y may be x."""
    dropout_cpu(x, *mask, y)


def apply_mask_cuda(mask, x, y):
    """:func:`apply_mask_cpu` on flat device arrays."""
    dropout_cuda.launch(-(-x.size // PHILOX_WORDS), x, *mask, y)


class Dropout(Layer):
    """Inverted dropout with drop probability ``p`` (0 <= p <= 1); works on any shape."""

    def __init__(self, p=0.5, dtype=np.float32):
        super().__init__(dtype)
        self.p = float(p)
        if not 0.0 <= self.p <= 1.0:
            raise ConfigError(f"Dropout probability must be in [0, 1], got {p}")
        self.masks = DropoutMasks(self.p, self.dtype)
        self._mask = None  # the last training forward's mask: what backward applies again

    @property
    def key(self):
        """The Philox key of the masks (None until the first training forward after a seed)."""
        return self.masks.key

    @property
    def stream(self):
        """The Philox stream of the next training forward's mask."""
        return self.masks.stream

    def seed(self, seed):
        """Reset the generator and with it the masks: a new key, and streams from 0."""
        super().seed(seed)
        self.masks.reset()

    def _active(self, training):
        return training and self.p > 0.0

    def forward_cpu(self, x, training):
        if not self._active(training):
            self._mask = None
            return x
        self._mask = self.masks.take(self.rng)
        return self._apply_cpu(x)

    def backward_cpu(self, dy):
        if self._mask is None:
            return dy
        return self._apply_cpu(dy)

    def _apply_cpu(self, x):
        y = np.empty_like(x)
        apply_mask_cpu(self._mask, x.reshape(-1), y.reshape(-1))
        return y

    def forward_cuda(self, x, training):
        if not self._active(training):
            self._mask = None
            return x
        self._mask = self.masks.take(self.rng)
        return self._apply_cuda(x)

    def backward_cuda(self, dy):
        if self._mask is None:
            return dy
        return self._apply_cuda(dy)

    def _apply_cuda(self, x):
        y = self.backend.empty(x.shape, self.dtype)
        apply_mask_cuda(self._mask, x.reshape(x.size), y.reshape(y.size))
        return y

    def output_shape(self, input_shape):
        return tuple(input_shape)

    def extra_repr(self):
        return f"p={self.p}"


@hookimpl
def rabbit_layers():
    return {"Dropout": Dropout}
