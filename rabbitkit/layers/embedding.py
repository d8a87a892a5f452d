"""Layers that take integer class indices: Embedding (learned vectors) and OneHot.

Both accept an integer array of any shape, typically (N, T) token indices, and
append one axis.  Float arrays holding whole numbers are accepted too (a feeder
that casts everything to float32); anything else is refused.  Neither has a
gradient with respect to its input (indices are not differentiable): ``backward``
returns None, which a :class:`~rabbitkit.layers.sequential.Sequential` passes on
as the (unused) input gradient of the whole model.
"""
import numpy as np
from numba import prange

from ..backend import to_host
from ..backend.cpu import kernel, sized_kernel
from ..backend.cuda import cuda_kernel
from ..errors import ConfigError, DataError
from ..hookspecs import hookimpl
from .base import Layer

cuda = None  # numba.cuda, bound on the first CUDA launch


def as_indices(x, num_classes, owner):
    """``x`` as a C-contiguous int64 array of indices in [0, num_classes), or a clear error."""
    x = np.asarray(x)
    if np.issubdtype(x.dtype, np.floating):
        if not np.all(np.isfinite(x)) or not np.array_equal(x, np.round(x)):
            raise ConfigError(f"{owner} expects integer class indices, got non-integral {x.dtype} values")
    elif not np.issubdtype(x.dtype, np.integer):
        raise ConfigError(f"{owner} expects integer class indices, got dtype {x.dtype}")
    indices = np.ascontiguousarray(x, dtype=np.int64)
    if indices.size and (indices.min() < 0 or indices.max() >= num_classes):
        bad = indices[(indices < 0) | (indices >= num_classes)][0]
        raise DataError(f"{owner}: index {bad} is out of range [0, {num_classes})")
    return indices


# -- CPU kernels ------------------------------------------------------------------------
@sized_kernel
def gather_rows_cpu(indices, table, out):
    """out[k, :] = table[indices[k], :] (the embedding lookup)."""
    width = table.shape[1]
    for k in prange(indices.size):
        row = indices[k]
        for j in range(width):
            out[k, j] = table[row, j]


@kernel(parallel=False)
def scatter_add_rows_cpu(indices, grad_out, grad_table):
    """grad_table[indices[k], :] += grad_out[k, :].

    Serial on purpose: a repeated index (the same character twice in a batch) would
    make a parallel split over k race on one row.  The work is tiny next to the
    layers around it (tokens x dim additions).
    """
    width = grad_table.shape[1]
    for k in range(indices.size):
        row = indices[k]
        for j in range(width):
            grad_table[row, j] += grad_out[k, j]


@sized_kernel
def one_hot_cpu(indices, out):
    """out (K, C) = 0 except out[k, indices[k]] = 1."""
    classes = out.shape[1]
    for k in prange(indices.size):
        for j in range(classes):
            out[k, j] = 0.0
        out[k, indices[k]] = 1.0


# -- CUDA kernels -----------------------------------------------------------------------
@cuda_kernel
def gather_rows_cuda(indices, table, out):
    width = table.shape[1]
    for e in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        k = e // width
        j = e - k * width
        out[k, j] = table[indices[k], j]


@cuda_kernel
def scatter_add_rows_cuda(indices, grad_out, grad_table):
    """grad_table[indices[k], :] += grad_out[k, :] by ownership: the thread of entry
    (row, j) scans every index in order and adds the matching gradients itself.  No
    two threads write one entry (no atomics), and the additions happen in the CPU's
    order, so the result is the CPU's, bit for bit, on every run.  The scan costs
    rows x indices reads per column: fine for vocabularies of characters and words
    in the thousands; a bigger table would sort the indices first."""
    width = grad_table.shape[1]
    for e in range(cuda.grid(1), grad_table.size, cuda.gridsize(1)):
        row = e // width
        j = e - row * width
        acc = grad_table[row, j]
        for k in range(indices.size):
            if indices[k] == row:
                acc += grad_out[k, j]
        grad_table[row, j] = acc


@cuda_kernel
def one_hot_cuda(indices, out):
    classes = out.shape[1]
    for e in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        k = e // classes
        j = e - k * classes
        out[k, j] = 1 if indices[k] == j else 0


class IndexInput(Layer):
    """Shared plumbing: the forward takes indices instead of casting to float."""

    def _device_indices(self, x, num_classes):
        """The batch's indices, checked on the host as on the CPU, then on the device
        as a flat int64 array (the one transfer: the batch going in)."""
        indices = as_indices(to_host(x), num_classes, repr(self))
        return indices.shape, self.backend.asarray(indices.reshape(-1), np.int64)

    def forward(self, x, training=True):
        if self.device == "cuda":
            return self.forward_cuda(x, training)
        return self.forward_cpu(x, training)

    def backward(self, dy):
        if self.device == "cuda":
            return self.backward_cuda(dy)
        return self.backward_cpu(np.ascontiguousarray(dy, dtype=self.dtype))


class Embedding(IndexInput):
    """Learned vectors by index: (…) integer indices -> (…, embedding_dim).

    ``weight`` is (num_embeddings, embedding_dim), initialised N(0, 1) as in
    ``torch.nn.Embedding``.  The gradient is a scatter-add into the rows used;
    ``backward`` returns None (no gradient w.r.t. indices).
    """

    def __init__(self, num_embeddings, embedding_dim, dtype=np.float32):
        super().__init__(dtype)
        self.num_embeddings = int(num_embeddings)
        self.embedding_dim = int(embedding_dim)
        if self.num_embeddings < 1 or self.embedding_dim < 1:
            raise ConfigError(f"Embedding sizes must be positive, got {num_embeddings}, {embedding_dim}")
        self.add_param("weight", self.rng.standard_normal((self.num_embeddings, self.embedding_dim)))

    def forward_cpu(self, x, training):
        indices = as_indices(x, self.num_embeddings, repr(self))
        self._indices = indices.reshape(-1)
        out = np.empty((self._indices.size, self.embedding_dim), dtype=self.dtype)
        gather_rows_cpu(out.size, self._indices, self.params["weight"], out)
        return out.reshape(*indices.shape, self.embedding_dim)

    def backward_cpu(self, dy):
        scatter_add_rows_cpu(self._indices, dy.reshape(-1, self.embedding_dim), self.grads["weight"])
        return None

    def forward_cuda(self, x, training):
        shape, self._indices = self._device_indices(x, self.num_embeddings)
        out = self.backend.empty((self._indices.size, self.embedding_dim), self.dtype)
        gather_rows_cuda.launch(out.size, self._indices, self.params["weight"], out)
        return out.reshape(*shape, self.embedding_dim)

    def backward_cuda(self, dy):
        dy2 = self.backend.asarray(dy, self.dtype).reshape(self._indices.size, self.embedding_dim)
        scatter_add_rows_cuda.launch(self.grads["weight"].size, self._indices, dy2, self.grads["weight"])
        return None

    def output_shape(self, input_shape):
        return (*input_shape, self.embedding_dim)

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.embedding_dim}"


class OneHot(IndexInput):
    """1-of-k encoding: (…) integer indices -> (…, num_classes) floats, no parameters.

    ``backward`` returns None: indices have no gradient, and the layer has nothing to
    learn.  A recurrent layer right after it may skip its own input gradient
    (``needs_input_grad = False``), as :func:`rabbitkit.models.char_rnn.build_char_rnn` does.
    """

    def __init__(self, num_classes, dtype=np.float32):
        super().__init__(dtype)
        self.num_classes = int(num_classes)
        if self.num_classes < 1:
            raise ConfigError(f"OneHot needs at least one class, got {num_classes}")

    def forward_cpu(self, x, training):
        indices = as_indices(x, self.num_classes, repr(self))
        out = np.empty((indices.size, self.num_classes), dtype=self.dtype)
        one_hot_cpu(out.size, indices.reshape(-1), out)
        return out.reshape(*indices.shape, self.num_classes)

    def backward_cpu(self, dy):
        return None

    def forward_cuda(self, x, training):
        shape, indices = self._device_indices(x, self.num_classes)
        out = self.backend.empty((indices.size, self.num_classes), self.dtype)
        one_hot_cuda.launch(out.size, indices, out)
        return out.reshape(*shape, self.num_classes)

    def backward_cuda(self, dy):
        return None

    def output_shape(self, input_shape):
        return (*input_shape, self.num_classes)

    def extra_repr(self):
        return str(self.num_classes)


@hookimpl
def rabbit_layers():
    return {"Embedding": Embedding, "OneHot": OneHot}
