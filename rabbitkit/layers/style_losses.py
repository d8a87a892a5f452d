"""The losses of neural style transfer (Gatys, Ecker & Bethge 2016), as kernels.

Definitions follow jcjohnson/neural-style (``neural_style.lua``), for features
``F`` of shape (N, C, H, W) seen as (N, C, P) with P = H * W:

* **Gram matrix** ``G_n = F_n F_nᵀ / (C·H·W)`` (neural-style divides by the
  number of feature elements, ``input:nElement()``).
* **Style loss** ``w · Σ_n mean_ij (G_n - A)²``: the squared Frobenius distance
  to the target ``A`` divided by C² (``nn.MSECriterion``), times the weight.  A
  blend of several style images has ``A = Σ_k b_k G(style_k)`` with the blend
  weights normalised to sum to one.
* **Content loss** ``w · mean (F - P)²`` over all elements (``nn.MSECriterion``).
* **Total variation** ``w/2 · Σ_{n,c} Σ_{i<H-1, j<W-1} (x_ij - x_i,j+1)² + (x_ij - x_i+1,j)²``:
  the energy whose gradient is neural-style's ``TVLoss:updateGradInput`` (which
  never computes the value; the sums stop one short of the last row and column
  in both terms, as there).

Every loss follows :class:`rabbitkit.losses.Loss`: ``value = loss.forward(x)``
computes the value and the gradient in one pass, ``loss.backward()`` returns the
gradient (an array the loss owns, on ``x``'s device).

On the CPU the two products of the Gram matrix (``F Fᵀ`` forward, ``S F``
backward) go to BLAS through ``np.dot`` (numpy's ``F Fᵀ`` is a SYRK); a small
kernel scales the product, forms the residual, sums the loss and writes ``dG``,
another symmetrises ``dG``.  On CUDA the products run on the backend's tiled GEMM
and the same element functions (:func:`~rabbitkit.backend.cuda.device_pair`)
run in grid-stride kernels.  The content loss is the squared-error kernel of
:mod:`rabbitkit.losses`, scaled.
"""
import numpy as np
from numba import prange

from ..backend import device_of, get_backend, to_host
from ..backend.cpu import sized_kernel
from ..backend.cuda import cuda_kernel, device_pair
from ..errors import ConfigError

cuda = None  # numba.cuda, bound on the first CUDA launch

__all__ = ["gram_matrix", "GramMatrix", "StyleLoss", "ContentLoss", "TotalVariationLoss", "blend_grams"]


# -- element functions (one source for CPU and CUDA) ---------------------------
def _gram_residual(g, target, dg, i, cc, scale, grad_scale):
    """Scale entry i of the raw product into the Gram matrix, write d(loss)/dG and
    return the squared residual (``target`` is one (C, C) matrix, flat)."""
    value = g[i] * scale
    g[i] = value
    d = value - target[i % cc]
    dg[i] = d * grad_scale
    return d * d


def _symmetrised(dg, s, index, c, scale):
    """s = (dG + dGᵀ) * scale at flat index ``index`` of (N, C, C) arrays."""
    cc = c * c
    n = index // cc
    rest = index - n * cc
    i = rest // c
    j = rest - i * c
    s[index] = (dg[index] + dg[n * cc + j * c + i]) * scale


def _total_variation_at(x, dx, index, h, w, weight):
    """Gradient of the TV energy at one pixel of flat (M, H, W) planes; returns the
    energy of the pair of differences starting at this pixel."""
    rest = index % (h * w)
    i = rest // w
    j = rest - i * w
    v = x[index]
    g = 0.0
    term = 0.0
    if i < h - 1 and j < w - 1:  # this pixel's own right and lower differences
        right = v - x[index + 1]
        down = v - x[index + w]
        g += right + down
        term = right * right + down * down
    if i < h - 1 and j > 0:  # the right neighbour in the difference of (i, j-1)
        g -= x[index - 1] - v
    if i > 0 and j < w - 1:  # the lower neighbour in the difference of (i-1, j)
        g -= x[index - w] - v
    dx[index] = weight * g
    return 0.5 * weight * term


gram_residual_cpu, gram_residual_cuda = device_pair(_gram_residual)
symmetrised_cpu, symmetrised_cuda = device_pair(_symmetrised)
total_variation_at_cpu, total_variation_at_cuda = device_pair(_total_variation_at)


# -- CPU kernels ----------------------------------------------------------------
@sized_kernel
def gram_residual_kernel_cpu(g, target, dg, cc, scale, grad_scale):
    """Flat (N*C*C): g *= scale, dg = (g - target) * grad_scale; returns sum (g - target)²."""
    total = 0.0
    for i in prange(g.size):
        total += gram_residual_cpu(g, target, dg, i, cc, scale, grad_scale)
    return total


@sized_kernel
def symmetrise_kernel_cpu(dg, s, c, scale):
    for index in prange(dg.size):
        symmetrised_cpu(dg, s, index, c, scale)


@sized_kernel
def total_variation_kernel_cpu(x, dx, h, w, weight):
    total = 0.0
    for index in prange(x.size):
        total += total_variation_at_cpu(x, dx, index, h, w, weight)
    return total


# -- CUDA kernels ---------------------------------------------------------------
@cuda_kernel
def gram_residual_kernel_cuda(g, target, dg, squares, cc, scale, grad_scale):
    for i in range(cuda.grid(1), g.size, cuda.gridsize(1)):
        squares[i] = gram_residual_cuda(g, target, dg, i, cc, scale, grad_scale)


@cuda_kernel
def symmetrise_kernel_cuda(dg, s, c, scale):
    for index in range(cuda.grid(1), dg.size, cuda.gridsize(1)):
        symmetrised_cuda(dg, s, index, c, scale)


@cuda_kernel
def total_variation_kernel_cuda(x, dx, terms, h, w, weight):
    for index in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        terms[index] = total_variation_at_cuda(x, dx, index, h, w, weight)


def _cuda_sum(array):
    from ..backend import get_backend

    return get_backend("cuda").reduce_to_host((array, "sum"))[0]  # fixed-order block sums


# -- helpers --------------------------------------------------------------------
def _features(x, what):
    shape = tuple(x.shape)
    if len(shape) != 4:
        raise ConfigError(f"{what} needs features of shape (N, C, H, W), got {shape}")
    return shape


def _host_or_device(x):
    """(backend, x) with a CPU x made a C-contiguous float array."""
    device = device_of(x)
    if device == "cpu":
        x = np.ascontiguousarray(x)
        if x.dtype not in (np.float32, np.float64):
            x = x.astype(np.float32)
    return get_backend(device), x


def _reused(buffer, shape, dtype, backend):
    """``buffer`` when it has this shape, dtype and device (the last call's gradient), else a new array.

    A loss's gradient is overwritten by its next ``forward`` (as in :mod:`rabbitkit.losses`), so an
    image optimiser that calls it a thousand times touches the pages of its gradients only once.
    """
    if (buffer is not None and tuple(buffer.shape) == tuple(shape) and buffer.dtype == np.dtype(dtype)
            and device_of(buffer) == backend.name):
        return buffer
    return backend.empty(tuple(shape), dtype)


def _raw_products(f3, backend):
    """(N, C, C) array of F_n F_nᵀ (unscaled) for features viewed as (N, C, P)."""
    n, c, _ = f3.shape
    g = backend.empty((n, c, c), f3.dtype)
    for k in range(n):
        if backend.name == "cuda":
            backend.gemm(f3[k], f3[k], g[k], trans_b=True)
        else:
            np.dot(f3[k], f3[k].T, out=g[k])
    return g


def _gram_backward(dg, f3, backend, scale, out=None):
    """dF_n = (dG_n + dG_nᵀ) F_n * scale, as (N, C, P) (into ``out`` when it fits)."""
    n, c, p = f3.shape
    s = backend.empty((n, c, c), f3.dtype)
    flat_dg, flat_s = dg.reshape(dg.size), s.reshape(s.size)
    if backend.name == "cuda":
        symmetrise_kernel_cuda.launch(s.size, flat_dg, flat_s, c, scale)
    else:
        symmetrise_kernel_cpu(s.size, flat_dg, flat_s, c, scale)
    df = _reused(out, (n, c, p), f3.dtype, backend)
    for k in range(n):
        if backend.name == "cuda":
            backend.gemm(s[k], f3[k], df[k])
        else:
            np.dot(s[k], f3[k], out=df[k])
    return df


def gram_matrix(features):
    """G = F Fᵀ / (C·H·W) per sample: (N, C, C) on the features' device."""
    return GramMatrix().forward(features)


class GramMatrix:
    """``forward(F) -> G`` (N, C, C) and ``backward(dG) -> dF`` (N, C, H, W)."""

    def __init__(self):
        self._features = None

    def forward(self, features):
        n, c, h, w = _features(features, "GramMatrix")
        backend, features = _host_or_device(features)
        f3 = features.reshape(n, c, h * w)
        g = _raw_products(f3, backend)
        if backend.name == "cuda":
            backend.scale(g, 1.0 / (c * h * w))
        else:
            g *= g.dtype.type(1.0 / (c * h * w))
        self._features = features
        return g

    def backward(self, dg):
        if self._features is None:
            raise RuntimeError("GramMatrix.backward() called before forward()")
        n, c, h, w = self._features.shape
        backend = get_backend(device_of(self._features))
        dg = backend.asarray(dg, self._features.dtype)
        df = _gram_backward(dg, self._features.reshape(n, c, h * w), backend, 1.0 / (c * h * w))
        return df.reshape(n, c, h, w)


def normalised_blend(blend, count):
    """Blend weights as neural-style takes them: equal when None, else ``count`` of
    them, non-negative, scaled to sum to one."""
    if blend is None:
        return [1.0 / count] * count
    weights = [float(b) for b in blend]
    if len(weights) != count:
        raise ConfigError(f"style blend weights {','.join(f'{b:g}' for b in weights)}: {len(weights)} weight(s) "
                          f"for {count} style image(s); expected one weight per style image")
    if any(b < 0 or not np.isfinite(b) for b in weights) or sum(weights) <= 0:
        raise ConfigError(f"style blend weights {','.join(f'{b:g}' for b in weights)}: expected non-negative "
                          f"numbers with a positive sum")
    total = sum(weights)
    return [b / total for b in weights]


def blend_grams(grams, blend=None):
    """A = Σ_k b_k G_k (each G_k (C, C) or (1, C, C)) with normalised blend weights, on the host."""
    weights = normalised_blend(blend, len(grams))
    target = None
    for weight, gram in zip(weights, grams):
        gram = np.asarray(to_host(gram), dtype=np.float64)
        gram = gram.reshape(gram.shape[-2:]) if gram.ndim == 3 and gram.shape[0] == 1 else gram
        if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
            raise ConfigError(f"a Gram matrix is square (C, C), got {gram.shape}")
        if target is not None and gram.shape != target.shape:
            raise ConfigError(f"Gram matrices of {target.shape} and {gram.shape} cannot be blended")
        target = weight * gram if target is None else target + weight * gram
    return target


class StyleLoss:
    """``weight · Σ_n mean_ij (G_n - target)²`` for features (N, C, H, W).

    ``target`` is a (C, C) Gram matrix (:func:`gram_matrix` of the style image's
    features, or :func:`blend_grams` of several).  ``forward`` keeps the features'
    Gram matrix in ``self.gram``.  ``backward`` forms the features' gradient afresh at
    each call, an array the caller may keep or overwrite: style transfer asks for it
    only when its backward pass reaches the layer, so the gradients of the five style
    layers (138 MiB at 512 px) are never all alive at once.
    """

    def __init__(self, target, weight=1.0):
        target = np.asarray(to_host(target), dtype=np.float64)
        if target.ndim == 3 and target.shape[0] == 1:
            target = target[0]
        if target.ndim != 2 or target.shape[0] != target.shape[1]:
            raise ConfigError(f"StyleLoss needs a square (C, C) target Gram matrix, got {target.shape}")
        self.target = target
        self.weight = float(weight)
        self.gram = None
        self._pending = None  # (dG, features as (N, C, H*W), scale, backend, shape) of the last forward
        self._device_targets = {}

    @classmethod
    def from_features(cls, features, weight=1.0, blend=None):
        """The loss whose target blends the Gram matrices of ``features`` (one array per style image)."""
        features = list(features)
        return cls(blend_grams([gram_matrix(f) for f in features], blend), weight)

    def _target_on(self, backend, dtype):
        key = (backend.name, np.dtype(dtype).str)
        if key not in self._device_targets:
            self._device_targets[key] = backend.asarray(np.ascontiguousarray(self.target.reshape(-1)), dtype)
        return self._device_targets[key]

    def forward(self, features):
        n, c, h, w = _features(features, "StyleLoss")
        if c != self.target.shape[0]:
            raise ConfigError(f"StyleLoss: features have {c} channels, the target Gram matrix {self.target.shape}")
        backend, features = _host_or_device(features)
        f3 = features.reshape(n, c, h * w)
        g = _raw_products(f3, backend)
        dg = backend.empty((n, c, c), features.dtype)
        target = self._target_on(backend, features.dtype)
        scale = 1.0 / (c * h * w)
        grad_scale = 2.0 * self.weight / (c * c)
        flat_g, flat_dg = g.reshape(g.size), dg.reshape(dg.size)
        if backend.name == "cuda":
            squares = backend.empty(g.size, np.float64)
            gram_residual_kernel_cuda.launch(g.size, flat_g, target, flat_dg, squares, c * c, scale, grad_scale)
            total = _cuda_sum(squares)
        else:
            total = gram_residual_kernel_cpu(g.size, flat_g, target, flat_dg, c * c, scale, grad_scale)
        self.gram = g
        self._pending = (dg, f3, scale, backend, (n, c, h, w))
        return self.weight * total / (c * c)

    def backward(self):
        if self._pending is None:
            raise RuntimeError("StyleLoss.backward() called before forward()")
        dg, f3, scale, backend, shape = self._pending
        return _gram_backward(dg, f3, backend, scale).reshape(shape)

    def __repr__(self):
        return f"StyleLoss(channels={self.target.shape[0]}, weight={self.weight:g})"


class ContentLoss:
    """``weight · mean (F - target)²`` over all elements (neural-style's content loss)."""

    def __init__(self, target, weight=1.0):
        self.target = np.ascontiguousarray(to_host(target))
        self.weight = float(weight)
        self._dy = None
        self._device_targets = {}

    def _target_on(self, backend, dtype):
        key = (backend.name, np.dtype(dtype).str)
        if key not in self._device_targets:
            self._device_targets[key] = backend.asarray(self.target.reshape(-1), dtype)
        return self._device_targets[key]

    def forward(self, features):
        from ..losses import squared_error_cpu, squared_error_cuda

        if tuple(features.shape) != self.target.shape:
            raise ConfigError(f"ContentLoss: features of shape {tuple(features.shape)}, target {self.target.shape}")
        backend, features = _host_or_device(features)
        size = features.size
        target = self._target_on(backend, features.dtype)
        dy = _reused(self._dy, features.shape, features.dtype, backend)
        scale = 2.0 * self.weight / size
        flat, flat_dy = features.reshape(size), dy.reshape(size)
        if backend.name == "cuda":
            squares = backend.empty(size, np.float64)
            squared_error_cuda.launch(size, flat, target, flat_dy, squares, scale)
            total = _cuda_sum(squares)
        else:
            total = squared_error_cpu(size, flat, target, flat_dy, scale)
        self._dy = dy
        return self.weight * total / size

    def backward(self):
        if self._dy is None:
            raise RuntimeError("ContentLoss.backward() called before forward()")
        return self._dy

    def __repr__(self):
        return f"ContentLoss(shape={self.target.shape}, weight={self.weight:g})"


class TotalVariationLoss:
    """neural-style's total variation of an image batch (N, C, H, W), times ``weight``."""

    def __init__(self, weight=1.0):
        self.weight = float(weight)
        self._dy = None

    def forward(self, x):
        n, c, h, w = _features(x, "TotalVariationLoss")
        backend, x = _host_or_device(x)
        dx = _reused(self._dy, (n, c, h, w), x.dtype, backend)
        flat, flat_dx = x.reshape(x.size), dx.reshape(x.size)
        if backend.name == "cuda":
            terms = backend.empty(x.size, np.float64)
            total_variation_kernel_cuda.launch(x.size, flat, flat_dx, terms, h, w, self.weight)
            total = _cuda_sum(terms)
        else:
            total = total_variation_kernel_cpu(x.size, flat, flat_dx, h, w, self.weight)
        self._dy = dx
        return float(total)

    def backward(self):
        if self._dy is None:
            raise RuntimeError("TotalVariationLoss.backward() called before forward()")
        return self._dy

    def __repr__(self):
        return f"TotalVariationLoss(weight={self.weight:g})"
