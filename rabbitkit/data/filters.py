"""Numba image filters shared by preprocessing (LCN) and augmentation (elastic fields).

Gaussian blurs are separable and *normalised at the borders*: near an edge each
output is the weighted mean of the in-image neighbours only, so borders do not
darken (the usual zero padding would bias LCN's local mean toward zero there).
"""
import math

import numpy as np
from numba import prange

from ..backend.cpu import kernel


def gaussian_weights(sigma, radius=None):
    """1-D Gaussian taps (float64, odd length 2*radius+1, summing to 1)."""
    sigma = float(sigma)
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    if radius is None:
        radius = max(1, int(math.ceil(3 * sigma)))
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-0.5 * (t / sigma) ** 2)
    return w / w.sum()


@kernel(parallel=False)
def inside_taps_inverse(weights, position, size):
    """1 / (sum of the taps that land inside [0, size) for an output at ``position``):
    the border normalisation of one row or column."""
    r = weights.size // 2
    norm = 0.0
    for k in range(max(0, r - position), min(weights.size, size - position + r)):
        norm += weights[k]
    return 1.0 / norm


@kernel(parallel=False)
def blur_plane(src, dst, weights, tmp):
    """dst = normalised separable convolution of the 2-D plane ``src`` with ``weights``.

    ``tmp`` is a scratch plane of the same shape; ``src`` and ``dst`` may be the
    same array.  Loops run tap-outer, pixel-inner so the inner loop is a
    contiguous multiply-add that vectorises.
    """
    h, w = src.shape
    taps = weights.size
    r = taps // 2
    # Horizontal pass, then divide by the sum of the in-image taps of each column.
    tmp[:, :] = 0.0
    for i in range(h):
        src_row = src[i]
        tmp_row = tmp[i]
        for k in range(taps):
            wk = weights[k]
            shift = k - r
            for j in range(max(0, -shift), min(w, w - shift)):
                tmp_row[j] += wk * src_row[j + shift]
    for j in range(w):
        inv = inside_taps_inverse(weights, j, w)
        for i in range(h):
            tmp[i, j] *= inv
    # Vertical pass, row by row (contiguous), then the same normalisation per row.
    for i in range(h):
        dst_row = dst[i]
        dst_row[:] = 0.0
        for k in range(max(0, r - i), min(taps, h - i + r)):
            wk = weights[k]
            tmp_row = tmp[i + k - r]
            for j in range(w):
                dst_row[j] += wk * tmp_row[j]
        inv = inside_taps_inverse(weights, i, h)
        for j in range(w):
            dst[i, j] *= inv


@kernel
def blur_planes(planes, weights, out):
    """Blur every plane of ``planes`` (P, H, W) into ``out``, one plane per thread."""
    for p in prange(planes.shape[0]):
        tmp = np.empty(planes.shape[1:], planes.dtype)
        blur_plane(planes[p], out[p], weights, tmp)
