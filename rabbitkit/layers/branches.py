"""Non-sequential building blocks: parallel branches on one input.

* :class:`Concat` joins the branches' outputs along an axis (channels by default):
  the Inception module (Szegedy et al. 2015).
* :class:`Add` sums them: a residual connection is ``Add([block, Identity()])``
  (He et al. 2016).
* :class:`Identity` passes its input through.

Both containers are layers whose children are the branches, so parameters are
named ``"<branch>.<name>"`` (``"1.0.weight"``) and move, seed and save like a
:class:`~rabbitkit.layers.sequential.Sequential`'s.  Every branch sees the same
input; backward gives each branch its share of the output gradient and sums the
branches' input gradients.  The joins have CPU and CUDA kernels, so the
containers run on CUDA exactly when all their branches do.
"""
import numpy as np
from numba import prange

from ..backend.cpu import sized_kernel
from ..backend.cuda import cuda_kernel
from ..errors import ConfigError
from ..hookspecs import hookimpl
from .base import Layer

cuda = None  # numba.cuda, bound on the first CUDA launch


# -- kernels ------------------------------------------------------------------
# A concatenation along an axis is, per index of the axes before it, a
# concatenation of contiguous blocks: arrays are viewed as (outer, width) with
# width = (size along the axis) x (size of the axes after it).


@sized_kernel
def add_into_cpu(acc, x):
    """acc += x on flat arrays."""
    for i in prange(acc.size):
        acc[i] += x[i]


@cuda_kernel
def add_into_cuda(acc, x):
    for i in range(cuda.grid(1), acc.size, cuda.gridsize(1)):
        acc[i] += x[i]


@cuda_kernel
def copy_block_in_cuda(src, dst, offset):
    """dst[o, offset + k] = src[o, k] for src (outer, width), dst (outer, total width)."""
    width = src.shape[1]
    for i in range(cuda.grid(1), src.size, cuda.gridsize(1)):
        o = i // width
        k = i - o * width
        dst[o, offset + k] = src[o, k]


@cuda_kernel
def copy_block_out_cuda(src, offset, dst):
    """dst[o, k] = src[o, offset + k]: the adjoint of :func:`copy_block_in_cuda`."""
    width = dst.shape[1]
    for i in range(cuda.grid(1), dst.size, cuda.gridsize(1)):
        o = i // width
        k = i - o * width
        dst[o, k] = src[o, offset + k]


def _flat(array):
    return array.reshape(array.size)


class Branches(Layer):
    """Shared plumbing of :class:`Concat` and :class:`Add`: children, input-gradient sum."""

    device_agnostic = True  # joins have kernels for both devices; branches decide

    def __init__(self, branches, dtype=None, names=None):
        if isinstance(branches, dict):
            names, branches = list(branches), list(branches.values())
        branches = list(branches)
        if not branches:
            raise ConfigError(f"{type(self).__name__} needs at least one branch")
        super().__init__(dtype if dtype is not None else branches[0].dtype)
        self.branches = branches
        if names is not None:
            self.set_child_names(names)

    def children(self):
        return self.branches

    def _add_into(self, acc, x):
        if self.device == "cuda":
            add_into_cuda.launch(acc.size, _flat(acc), _flat(x))
        else:
            add_into_cpu(acc.size, _flat(acc), _flat(x))

    def _copy(self, array):
        out = self.backend.empty(array.shape, self.dtype)
        self.backend.copy_into(out, array)
        return out

    def _backward_branches(self, gradients):
        """Run each branch's backward on its gradient; return the summed input gradient."""
        dx = None
        for branch, dy in zip(self.branches, gradients):
            grad = branch.backward(dy)
            if dx is None:
                # a fresh array: a branch such as Identity may hand back dy itself
                dx = self._copy(grad)
            else:
                self._add_into(dx, grad)
        return dx

    def flops(self, input_shape):
        return sum(branch.flops(tuple(input_shape)) for branch in self.branches)

    def extra_repr(self):
        return ", ".join(repr(branch) for branch in self.branches)


class Concat(Branches):
    """Parallel branches on one input, outputs concatenated along ``axis``.

    ``axis`` counts the batch axis (1 = channels of NCHW, -1 = features); all
    branch outputs must agree on every other axis.
    """

    def __init__(self, branches, axis=1, dtype=None, names=None):
        super().__init__(branches, dtype, names)
        self.axis = int(axis)
        if self.axis == 0:
            raise ConfigError("Concat cannot join along the batch axis (axis=0)")

    def _axis(self, ndim):
        axis = self.axis if self.axis > 0 else ndim + self.axis
        if not 0 < axis < ndim:
            raise ConfigError(f"Concat axis {self.axis} is out of range for {ndim}-d outputs")
        return axis

    def _check(self, shapes, axis):
        reference = shapes[0][:axis] + shapes[0][axis + 1:]
        for index, shape in enumerate(shapes):
            if len(shape) != len(shapes[0]) or shape[:axis] + shape[axis + 1:] != reference:
                listed = ", ".join(str(tuple(s)) for s in shapes)
                raise ConfigError(f"Concat branch {index}: outputs {listed} differ outside axis {self.axis}")

    def _forward(self, x, training):
        outputs = [branch.forward(x, training) for branch in self.branches]
        shapes = [tuple(out.shape) for out in outputs]
        axis = self._axis(len(shapes[0]))
        self._check(shapes, axis)
        self._split = (shapes, axis)
        return outputs, shapes, axis

    def forward_cpu(self, x, training):
        outputs, _, axis = self._forward(x, training)
        return np.concatenate([np.asarray(out, dtype=self.dtype) for out in outputs], axis=axis)

    def backward_cpu(self, dy):
        shapes, axis = self._split
        bounds = np.cumsum([shape[axis] for shape in shapes])[:-1]
        return self._backward_branches(np.ascontiguousarray(part) for part in np.split(dy, bounds, axis=axis))

    def forward_cuda(self, x, training):
        outputs, shapes, axis = self._forward(x, training)
        out_shape = list(shapes[0])
        out_shape[axis] = sum(shape[axis] for shape in shapes)
        y = self.backend.empty(tuple(out_shape), self.dtype)
        outer = int(np.prod(out_shape[:axis]))
        y2 = y.reshape(outer, y.size // outer)
        offset = 0
        for out in outputs:
            block = out.reshape(outer, out.size // outer)
            copy_block_in_cuda.launch(block.size, block, y2, offset)
            offset += block.shape[1]
        return y

    def backward_cuda(self, dy):
        shapes, axis = self._split
        outer = int(np.prod(shapes[0][:axis]))
        dy2 = dy.reshape(outer, dy.size // outer)

        def parts():
            offset = 0
            for shape in shapes:
                part = self.backend.empty(shape, self.dtype)
                block = part.reshape(outer, part.size // outer)
                copy_block_out_cuda.launch(block.size, dy2, offset, block)
                offset += block.shape[1]
                yield part

        return self._backward_branches(parts())

    def output_shape(self, input_shape):
        shapes = [tuple(branch.output_shape(tuple(input_shape))) for branch in self.branches]
        axis = self._axis(len(shapes[0]) + 1) - 1  # per-sample shapes have no batch axis
        self._check(shapes, axis)
        return (*shapes[0][:axis], sum(shape[axis] for shape in shapes), *shapes[0][axis + 1:])

    def extra_repr(self):
        return f"[{super().extra_repr()}], axis={self.axis}"


class Add(Branches):
    """Parallel branches on one input, outputs summed (all of one shape).

    ``Add([block, Identity()])`` is a residual connection.
    """

    def _forward(self, x, training):
        y = None
        for index, branch in enumerate(self.branches):
            out = branch.forward(x, training)
            if y is None:
                y = self._copy(out)  # never sum into a branch's own (maybe saved) output
            elif tuple(out.shape) != tuple(y.shape):
                raise ConfigError(f"Add branch {index} outputs {tuple(out.shape)}, branch 0 outputs {tuple(y.shape)}")
            else:
                self._add_into(y, out)
        return y

    def _backward(self, dy):
        # Every branch receives the whole gradient; all but the last get a copy so a
        # branch that works on its gradient in place cannot disturb the others.
        last = len(self.branches) - 1
        return self._backward_branches(dy if index == last else self._copy(dy) for index in range(len(self.branches)))

    forward_cpu = forward_cuda = _forward
    backward_cpu = backward_cuda = _backward

    def output_shape(self, input_shape):
        shapes = [tuple(branch.output_shape(tuple(input_shape))) for branch in self.branches]
        if len(set(shapes)) != 1:
            raise ConfigError(f"Add branches output different shapes: {', '.join(map(str, shapes))}")
        return shapes[0]

    def extra_repr(self):
        return f"[{super().extra_repr()}]"


class Identity(Layer):
    """y = x (the skip path of a residual connection)."""

    device_agnostic = True

    def forward_cpu(self, x, training):
        return x

    def backward_cpu(self, dy):
        return dy

    forward_cuda = forward_cpu
    backward_cuda = backward_cpu

    def output_shape(self, input_shape):
        return tuple(input_shape)


@hookimpl
def rabbit_layers():
    return {"Concat": Concat, "Add": Add, "Identity": Identity}
