"""Losses: ``value = loss.forward(y, target)`` then ``dy = loss.backward()``.

Both losses are averaged over the batch and compute the value and the gradient
in one fused pass (forward does all the work; backward returns the gradient it
kept).  They run on numpy arrays with CPU kernels and on numba CUDA device
arrays with CUDA kernels; the device is read off ``y``.

The L2 term lambda/2 ||w||^2 is not part of any loss: it comes from the ``l2``
regularizer (:mod:`rabbitkit.regularizers`).
"""
import math

import numpy as np
from numba import prange

from .backend import device_of, get_backend
from .backend.cpu import TRANSCENDENTAL_WORK, sized_kernel
from .backend.cuda import cuda_kernel
from .errors import ConfigError, DataError
from .hookspecs import hookimpl
from .layers.activations import softmax_row, softmax_rows_cuda

cuda = None  # numba.cuda, bound on the first CUDA launch

__all__ = ["Loss", "SoftmaxCrossEntropy", "SquaredError"]


# -- CPU kernels ----------------------------------------------------------------
@sized_kernel
def softmax_cross_entropy_cpu(logits, targets, dy, scale, ignore_index, smoothing):
    """Per row: dy = (softmax - q) * scale for the target distribution
    q = (1 - smoothing) onehot + smoothing / V; returns (sum of -sum_j q_j log p_j, bad targets).

    Rows whose target is ``ignore_index`` get dy = 0 and add no loss.  Targets
    outside [0, V) are counted, not read, so the caller can report them.
    """
    rows, classes = logits.shape
    total = 0.0
    invalid = 0
    for r in prange(rows):
        t = targets[r]
        if t == ignore_index or t < 0 or t >= classes:
            for j in range(classes):
                dy[r, j] = 0.0
            if t != ignore_index:
                invalid += 1
            continue
        top, norm = softmax_row(logits[r], dy[r])
        factor = scale / norm
        if smoothing == 0.0:
            total += math.log(norm) + top - logits[r, t]
            for j in range(classes):
                dy[r, j] *= factor
        else:
            # -sum_j q_j log p_j = lse - (1 - s) z_t - s * mean_j z_j
            spread = smoothing / classes * scale
            logit_sum = 0.0
            for j in range(classes):
                logit_sum += logits[r, j]
                dy[r, j] = dy[r, j] * factor - spread
            total += math.log(norm) + top - (1.0 - smoothing) * logits[r, t] - smoothing * logit_sum / classes
        dy[r, t] -= (1.0 - smoothing) * scale
    return total, invalid


@sized_kernel
def squared_error_cpu(y, t, dy, scale):
    """dy = (y - t) * scale; returns sum (y - t)^2."""
    total = 0.0
    for i in prange(y.size):
        d = y[i] - t[i]
        dy[i] = d * scale
        total += d * d
    return total


# -- CUDA kernels ---------------------------------------------------------------
@cuda_kernel
def cross_entropy_from_softmax_cuda(logits, log_sum_exp, targets, dy, row_loss, row_count, ignore_index, smoothing):
    """dy holds the softmax on entry; per row subtract the target distribution
    q = (1 - smoothing) onehot + smoothing / V and record the row's loss
    (lse - sum_j q_j z_j) and whether it counts (1), is ignored (0) or has a target
    outside [0, V) (-1).  Scaling by 1/count follows."""
    classes = logits.shape[1]
    for r in range(cuda.grid(1), logits.shape[0], cuda.gridsize(1)):
        t = targets[r]
        if t == ignore_index or t < 0 or t >= classes:
            for j in range(classes):
                dy[r, j] = 0.0
            row_loss[r] = 0.0
            row_count[r] = 0.0 if t == ignore_index else -1.0
        else:
            spread = smoothing / classes
            logit_sum = 0.0
            if smoothing != 0.0:
                for j in range(classes):
                    logit_sum += logits[r, j]
                    dy[r, j] -= spread
            dy[r, t] -= 1.0 - smoothing
            row_loss[r] = log_sum_exp[r] - (1.0 - smoothing) * logits[r, t] - spread * logit_sum
            row_count[r] = 1.0


@cuda_kernel
def squared_error_cuda(y, t, dy, squares, scale):
    for i in range(cuda.grid(1), y.size, cuda.gridsize(1)):
        d = y[i] - t[i]
        dy[i] = d * scale
        squares[i] = d * d


# -- losses ---------------------------------------------------------------------
class Loss:
    """Base class: ``forward(y, target) -> float`` then ``backward() -> dy``.

    ``backward`` returns an array owned by the loss on ``y``'s device; the next
    ``forward`` overwrites it (copy it to keep it).
    """

    def forward(self, y, target):
        raise NotImplementedError

    def backward(self):
        if self._dy is None:
            raise RuntimeError(f"{type(self).__name__}.backward() called before forward()")
        return self._dy

    def __call__(self, y, target):
        return self.forward(y, target)

    def _gradient_buffer(self, y, backend):
        """Reuse the gradient array of the previous step when it fits (saves an allocation)."""
        dy = self._dy
        if dy is None or dy.shape != y.shape or dy.dtype != y.dtype or device_of(dy) != backend.name:
            dy = backend.empty(y.shape, y.dtype)
        return dy

    def __repr__(self):
        return f"{type(self).__name__}()"


class SoftmaxCrossEntropy(Loss):
    """Softmax over the last axis fused with the cross-entropy of integer class targets.

    ``y`` holds logits (N, V) with targets (N,), or (N, T, V) with targets (N, T)
    for sequences; the value is the mean of -log softmax(y)[target] over all N
    (resp. N*T) positions, computed via log-sum-exp so logits of 1e4 neither
    overflow nor give NaN.  Positions whose target equals ``ignore_index`` (e.g.
    padding) contribute nothing and the mean is over the others.  The gradient is
    (softmax - onehot) / count.

    ``label_smoothing`` (Szegedy et al. 2016, as PyTorch's): the target
    distribution is (1 - s) onehot + s / V; the gradient becomes (softmax - q) / count.
    """

    def __init__(self, ignore_index=None, label_smoothing: float = 0.0):
        self.ignore_index = ignore_index
        self.label_smoothing = float(label_smoothing)
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self._dy = None

    def _checked_targets(self, y, target):
        shape = tuple(y.shape)
        target_shape = tuple(np.shape(target))
        if len(shape) < 2 or target_shape != shape[:-1]:
            raise DataError(
                f"SoftmaxCrossEntropy needs targets of shape {shape[:-1]} (one class index per row of "
                f"logits {shape}), got {target_shape}"
            )
        return (math.prod(shape[:-1]), shape[-1])

    def forward(self, y, target):
        """The mean cross-entropy as a Python float; keeps the gradient for ``backward``."""
        rows = self._checked_targets(y, target)
        # An impossible class index stands for "ignore nothing", keeping one kernel signature.
        ignore = -(1 << 62) if self.ignore_index is None else int(self.ignore_index)
        if device_of(y) == "cuda":
            return self._forward_cuda(y, target, rows, ignore)
        y = np.ascontiguousarray(y)
        if y.dtype not in (np.float32, np.float64):
            y = y.astype(np.float32)
        targets = np.ascontiguousarray(target, dtype=np.int64).reshape(rows[0])
        count = rows[0] if self.ignore_index is None else int(np.count_nonzero(targets != ignore))
        dy = self._gradient_buffer(y, get_backend("cpu"))
        scale = 1.0 / count if count else 0.0
        total, invalid = softmax_cross_entropy_cpu(y.size * TRANSCENDENTAL_WORK, y.reshape(rows), targets,
                                                   dy.reshape(rows), scale, ignore, self.label_smoothing)
        self._dy = dy
        if invalid:
            self._dy = None
            raise DataError(self._invalid_message(targets, rows[1], ignore))
        return total / count if count else 0.0

    def _forward_cuda(self, y, target, rows, ignore):
        backend = get_backend("cuda")
        targets = target if device_of(target) == "cuda" else None
        if targets is None or targets.dtype != np.int64:
            targets = backend.asarray(np.ascontiguousarray(backend.to_host(target), dtype=np.int64))
        targets = targets.reshape(rows[0])
        y2 = y.reshape(*rows)
        dy = self._gradient_buffer(y, backend)
        dy2 = dy.reshape(*rows)
        log_sum_exp = backend.empty(rows[0], np.float64)
        row_loss = backend.empty(rows[0], np.float64)
        row_count = backend.empty(rows[0], np.float64)
        softmax_rows_cuda.launch(rows[0], y2, dy2, log_sum_exp)
        cross_entropy_from_softmax_cuda.launch(rows[0], y2, log_sum_exp, targets, dy2, row_loss, row_count, ignore,
                                               self.label_smoothing)
        # The loss, the invalid targets and the counted rows: three deterministic sums,
        # one transfer to the host.
        total, invalid, counted = backend.reduce_to_host((row_loss, "sum"), (row_count, "negatives"),
                                                         (row_count, "sum"))
        if rows[0] and invalid:
            raise DataError(self._invalid_message(targets.copy_to_host(), rows[1], ignore))
        count = rows[0] if self.ignore_index is None else int(round(counted))
        if count:
            backend.scale(dy, 1.0 / count)
        self._dy = dy
        return total / count if count else 0.0

    @staticmethod
    def _invalid_message(targets, classes, ignore):
        bad = targets[(targets != ignore) & ((targets < 0) | (targets >= classes))]
        return (
            f"SoftmaxCrossEntropy: {bad.size} target(s) outside the {classes} classes [0, {classes}), "
            f"e.g. {int(bad.flat[0])}"
        )

    def __repr__(self):
        return f"SoftmaxCrossEntropy(ignore_index={self.ignore_index}, label_smoothing={self.label_smoothing})"


class SquaredError(Loss):
    """E = 1/2 * sum ||y - t||^2 per sample, averaged over the batch (N = y.shape[0]).

    ``target`` has the shape of ``y`` (or its size, e.g. (N,) targets for (N, 1)
    outputs).  The gradient is (y - t) / N.
    """

    def __init__(self):
        self._dy = None

    def forward(self, y, target):
        """The loss as a Python float; keeps the gradient for ``backward``."""
        if math.prod(np.shape(target)) != math.prod(y.shape):
            raise DataError(f"SquaredError needs targets shaped like the outputs {tuple(y.shape)}, got {np.shape(target)}")
        batch = y.shape[0] if len(y.shape) else 1
        scale = 1.0 / batch
        if device_of(y) == "cuda":
            backend = get_backend("cuda")
            t = backend.asarray(target, y.dtype)
            dy = self._gradient_buffer(y, backend)
            squares = backend.empty(y.size, np.float64)
            squared_error_cuda.launch(y.size, y.reshape(y.size), t.reshape(y.size), dy.reshape(y.size), squares, scale)
            total = backend.reduce_to_host((squares, "sum"))[0]
        else:
            y = np.ascontiguousarray(y)
            if y.dtype not in (np.float32, np.float64):
                y = y.astype(np.float32)
            t = np.ascontiguousarray(target, dtype=y.dtype)
            dy = self._gradient_buffer(y, get_backend("cpu"))
            total = squared_error_cpu(y.size, y.reshape(-1), t.reshape(-1), dy.reshape(-1), scale)
        self._dy = dy
        return 0.5 * total * scale


@hookimpl
def rabbit_losses():
    return {"softmax_cross_entropy": SoftmaxCrossEntropy, "squared_error": SquaredError}
