"""Compile the recurrent and gradient-norm CUDA kernels for a real GPU target (sm_90)
without a GPU: the simulator runs kernels as Python and accepts code that Numba's
CUDA compiler would refuse, so this catches what the parity tests cannot.

Run with NUMBA_ENABLE_CUDASIM=0 where libnvvm and libnvrtc can be found (e.g. the
``nvidia-cuda-nvcc`` and ``nvidia-cuda-nvrtc`` wheels); ``test_recurrent_cuda.py``
does so when they are present.  Prints one line per kernel and exits non-zero on
the first that does not compile, or when float32 gate kernels compute in float64.
"""
import sys

from numba import cuda, types
import numba.cuda.dispatcher as dispatcher


class _Target:
    compute_capability = (9, 0)


# Device functions are compiled for "the current device"; there is none here.
dispatcher.get_current_device = lambda: _Target()

import rabbitkit.backend.cuda as backend_cuda  # noqa: E402
import rabbitkit.layers._recurrent_kernels as kernels  # noqa: E402
from rabbitkit.backend.cuda import CudaKernel  # noqa: E402


def bind(module):
    """What CudaKernel.compiled() does at the first launch: bind ``cuda`` and the device functions."""
    module.cuda = cuda
    for name, value in list(vars(module).items()):
        if isinstance(value, CudaKernel) and value.device:
            setattr(module, name, cuda.jit(device=True)(value.pyfunc))


def main():
    bind(kernels)
    bind(backend_cuda)
    f64 = types.float64
    for dt in (types.float32, types.float64):
        a1, a2, a3 = (types.Array(dt, n, "C") for n in (1, 2, 3))
        gate_kernels = {
            "swap_leading_axes_cuda": (a3, a3),
            "multiply_cuda": (a1, a1, a1),
            "add_cuda": (a1, a1, a1),
            "rnn_step_forward_cuda": (a2, a2, a1, a2),
            "rnn_step_backward_cuda": (a2, a2, a2, a2),
            "lstm_step_forward_cuda": (a2, a2, a1, a1, a1, a1, a2, a2, a2, a2),
            "lstm_step_backward_cuda": (a2, a2, a1, a1, a1, a2, a2, a2, a2, a2),
            "gru_step_forward_cuda": (a2, a2, a1, a1, a2, a2, a2),
            "gru_step_backward_cuda": (a2, a2, a2, a2, a2, a2, a2),
        }
        for name, sig in gate_kernels.items():
            ptx, _ = cuda.compile_ptx(getattr(kernels, name).pyfunc, sig, cc=(9, 0))
            wide = sum(".f64" in line and "cvt" not in line for line in ptx.splitlines())
            print(f"{dt} {name}: ok, {wide} float64 instructions")
            if dt == types.float32 and wide:
                sys.exit(f"{name} computes in float64 for float32 arrays")
        cuda.compile_ptx(kernels.lstm_peephole_grads_cuda.pyfunc, (a3, a3, a1, a1, a1), cc=(9, 0))
        cuda.compile_ptx(backend_cuda._partial_sum_squares_kernel.pyfunc,
                         (a1, types.Array(f64, 2, "C"), types.int64), cc=(9, 0))
        cuda.compile_ptx(backend_cuda._scale_by_device_factor_kernel.pyfunc, (a1, a1), cc=(9, 0))
        print(f"{dt} reductions: ok")
    cuda.compile_ptx(backend_cuda._finish_norm_kernel.pyfunc,
                     (types.Array(f64, 2, "C"), types.boolean, f64, types.Array(f64, 1, "C"),
                      types.Array(types.float32, 1, "C"), types.Array(f64, 1, "C")), cc=(9, 0))
    print("_finish_norm_kernel: ok")


if __name__ == "__main__":
    main()
