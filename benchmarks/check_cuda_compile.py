"""Compile the CUDA kernels with the real CUDA compiler (NVVM, for an H100/H200:
sm_90), without a GPU.

    python benchmarks/check_cuda_compile.py [test files...]   # default: tests/test_cuda_*.py
    python benchmarks/check_cuda_compile.py --listed          # the listed signatures only (seconds)

The simulator runs kernels as Python, so it accepts code that numba.cuda's compiler
refuses (a typing error, an unsupported call).  This script runs the given tests
in the simulator recording each kernel's argument types, then, in a second process
with the simulator off, compiles each (kernel, signature) to PTX with the tile and
block sizes a real GPU gets.  To the recorded signatures it adds the listed ones
(:func:`listed_signatures`: the recurrent, gradient-norm and dropout kernels in
both float dtypes, whether or not the tests launch them), and the kernels of
:data:`FLOAT32_KERNELS` must not compute in float64 when given float32 arrays (a
float64 literal or helper in such a kernel halves its speed or worse on GPUs
whose float64 units are few).  ``--listed`` compiles the listed signatures alone,
with no simulator run (``tests/test_recurrent_cuda.py`` does so).  It needs a CUDA
toolkit's libnvvm and libdevice (``CUDA_HOME``, e.g. /usr/local/cuda, or the
``nvidia-cuda-nvcc`` wheel), not NVRTC, a driver or a device.  Prints one line per
(kernel, signature); exit status 1 if any fails to compile or computes in float64
where it must not.
"""
import glob
import os
import json
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CC = (9, 0)


def record(paths, out):
    """Run the tests in the simulator; write {(module, name): {argument types}} as JSON
    (:func:`type_record`: plain names, so reading it back executes nothing)."""
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
    sys.path.insert(0, ROOT)
    import numba
    import numpy as np
    import pytest

    from rabbitkit.backend import cuda as cuda_backend

    seen = {}
    compiled = cuda_backend.CudaKernel.compiled

    def argument_type(value):
        if hasattr(value, "_ary"):  # a simulator device array
            value = value._ary
        if isinstance(value, np.ndarray):
            return numba.typeof(np.ascontiguousarray(value) if value.flags.c_contiguous else value)
        return numba.typeof(value)

    def recording(kernel):
        launcher = compiled(kernel)
        if kernel.device:
            return launcher

        class Recorder:
            def __getitem__(self, config):
                def launch(*args):
                    key = (kernel.pyfunc.__module__, kernel.__name__)
                    seen.setdefault(key, set()).add(tuple(argument_type(a) for a in args))
                    return launcher[config](*args)
                return launch
        return Recorder()

    cuda_backend.CudaKernel.compiled = recording
    status = pytest.main(["-q", "-p", "no:cacheprovider", *paths])
    records = [[module, name, [[type_record(t) for t in signature] for signature in signatures]]
               for (module, name), signatures in seen.items()]
    with open(out, "w") as handle:
        json.dump(records, handle)
    return status


def type_record(numba_type):
    """A kernel argument's Numba type as JSON: ["array", dtype, ndim, layout] or ["scalar", dtype]."""
    from numba import types

    if isinstance(numba_type, types.Array):
        return ["array", str(numba_type.dtype), numba_type.ndim, numba_type.layout]
    return ["scalar", "bool" if numba_type == types.boolean else str(numba_type)]


def type_from_record(record):
    import numpy as np
    from numba import types
    from numba.np.numpy_support import from_dtype

    if record[0] == "array":
        _, dtype, ndim, layout = record
        return types.Array(from_dtype(np.dtype(dtype)), int(ndim), layout)
    return from_dtype(np.dtype(record[1]))


RECURRENT = "rabbitkit.layers._recurrent_kernels"
BACKEND = "rabbitkit.backend.cuda"
DROPOUT = "rabbitkit.layers.dropout"

#: Kernels whose every operation on float32 arrays must be float32: their PTX may
#: convert to and from float64 (``cvt``) but not compute in it.
FLOAT32_KERNELS = {
    (RECURRENT, name) for name in (
        "swap_leading_axes_cuda", "add_cuda", "rnn_step_forward_cuda", "rnn_step_backward_cuda",
        "lstm_step_forward_cuda", "lstm_step_backward_cuda", "gru_step_forward_cuda", "gru_step_backward_cuda")
} | {(DROPOUT, "dropout_cuda")} | {
    ("rabbitkit.layers.adaptive_pool", name) for name in ("adaptive_avg_forward_cuda", "adaptive_avg_backward_cuda")}


def listed_signatures():
    """{(module, kernel name): {argument types}} compiled on every run, recorded or not."""
    from numba import types

    f64 = types.float64
    listed = {}

    def add(module, name, *signature):
        listed.setdefault((module, name), set()).add(tuple(signature))

    for dt in (types.float32, types.float64):
        a1, a2, a3 = (types.Array(dt, n, "C") for n in (1, 2, 3))
        add(RECURRENT, "swap_leading_axes_cuda", a3, a3)
        add(RECURRENT, "add_cuda", a1, a1, a1)
        add(RECURRENT, "rnn_step_forward_cuda", a2, a2, a1, a2)
        add(RECURRENT, "rnn_step_backward_cuda", a2, a2, a2, a2)
        add(RECURRENT, "lstm_step_forward_cuda", a2, a2, a1, a1, a1, a1, a2, a2, a2, a2)
        add(RECURRENT, "lstm_step_backward_cuda", a2, a2, a1, a1, a1, a2, a2, a2, a2, a2)
        add(RECURRENT, "gru_step_forward_cuda", a2, a2, a1, a1, a2, a2, a2)
        add(RECURRENT, "gru_step_backward_cuda", a2, a2, a2, a2, a2, a2, a2)
        add(RECURRENT, "lstm_peephole_grads_cuda", a3, a3, a1, a1, a1)
        add(BACKEND, "_partial_sum_squares_kernel", a1, types.Array(f64, 2, "C"), types.int64)
        add(BACKEND, "_scale_by_device_factor_kernel", a1, a1)
        add(DROPOUT, "dropout_cuda", a1, types.uint64, types.uint64, types.uint64, dt, a1)
    add(BACKEND, "_finish_norm_kernel", types.Array(f64, 2, "C"), types.boolean, f64, types.Array(f64, 1, "C"),
        types.Array(types.float32, 1, "C"), types.Array(f64, 1, "C"))
    return listed


def float64_instructions(ptx):
    """PTX lines that compute in float64 (conversions to and from it left out)."""
    return sum(".f64" in line and "cvt" not in line for line in ptx.splitlines())


def float32_only(signature):
    """Whether a signature's float arrays are all float32 (and there is one)."""
    from numba import types

    dtypes = {t.dtype for t in signature if isinstance(t, types.Array) and isinstance(t.dtype, types.Float)}
    return dtypes == {types.float32}


def compile_all(path=None):
    """Compile the listed and each recorded (kernel, signature) for CC with the simulator off."""
    os.environ["NUMBA_ENABLE_CUDASIM"] = "0"
    if os.path.isdir("/usr/local/cuda"):  # else numba finds a wheel's toolkit itself
        os.environ.setdefault("CUDA_HOME", "/usr/local/cuda")
    sys.path.insert(0, ROOT)
    import importlib

    from numba import cuda
    from numba.cuda import cuda_paths
    from numba.cuda.cudadrv import nvrtc

    # NVRTC only tells numba which architectures the toolkit supports; without it
    # (a toolkit with NVVM only) name the one we compile for.
    nvrtc.get_supported_ccs = lambda: [CC]
    cuda_paths._get_nvrtc_path = lambda: cuda_paths._env_path_tuple("none", None)
    # A device function called from a kernel is compiled for the current device's
    # compute capability: there is no device, so say which.
    from numba.cuda import dispatcher

    dispatcher.get_current_device = lambda: type("Device", (), {"compute_capability": CC})()

    from rabbitkit.backend import cuda as cuda_backend

    assert not cuda_backend.simulating() and cuda_backend.GEMM_BM == 64
    helpers = {}

    def build(helper):
        if helper not in helpers:
            helper.bind(cuda, build)
            helpers[helper] = cuda.jit(device=True)(helper.pyfunc)
        return helpers[helper]

    seen = listed_signatures()
    if path is not None:
        with open(path) as handle:
            for module, name, signatures in json.load(handle):
                seen.setdefault((module, name), set()).update(
                    tuple(type_from_record(record) for record in signature) for signature in signatures)
    failures = 0
    for (module_name, name), signatures in sorted(seen.items()):
        kernel = getattr(importlib.import_module(module_name), name)
        kernel.bind(cuda, build)
        for signature in sorted(signatures, key=str):
            label = f"{module_name}.{name}{tuple(str(t) for t in signature)}"
            try:
                ptx, _ = cuda.compile_ptx(kernel.pyfunc, signature, cc=CC)
            except Exception as err:  # report every failure, then fail
                failures += 1
                lines = [line for line in str(err).strip().splitlines() if line.strip(" :")]
                print(f"FAIL  {label}: {type(err).__name__}")
                print("      " + "\n      ".join(lines[:12]))
                continue
            wide = float64_instructions(ptx)
            if wide and (module_name, name) in FLOAT32_KERNELS and float32_only(signature):
                failures += 1
                print(f"FAIL  {label}: {wide} float64 instructions for float32 arrays")
                continue
            print(f"ok    {label}: {len(ptx):,} bytes of PTX, {wide} float64 instructions")
    print(f"{sum(len(s) for s in seen.values())} signatures of {len(seen)} kernels; {failures} failed")
    return 1 if failures else 0


def main(argv):
    if len(argv) == 2 and argv[0] == "--compile":
        return compile_all(argv[1])
    if argv == ["--listed"]:
        return compile_all()
    paths = argv or sorted(glob.glob(os.path.join(ROOT, "tests", "test_cuda_*.py")))
    with tempfile.TemporaryDirectory() as folder:
        types = os.path.join(folder, "types.json")
        status = subprocess.run([sys.executable, __file__, "--record", types, *paths], cwd=ROOT).returncode
        if status not in (0, 5) or not os.path.exists(types):
            print(f"the simulator tests failed (status {status}); nothing compiled")
            return 1
        return subprocess.run([sys.executable, __file__, "--compile", types], cwd=ROOT).returncode


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--record":
        sys.exit(record(sys.argv[3:], sys.argv[2]))
    sys.exit(main(sys.argv[1:]))
