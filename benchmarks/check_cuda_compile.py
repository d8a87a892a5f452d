"""Compile every CUDA kernel the simulator tests launch with the real CUDA compiler
(NVVM, for an H100/H200: sm_90), without a GPU.

    python benchmarks/check_cuda_compile.py [test files...]   # default: tests/test_cuda_*.py

The simulator runs kernels as Python, so it accepts code that numba.cuda's compiler
refuses (a typing error, an unsupported call).  This script runs the given tests
in the simulator recording each kernel's argument types, then, in a second process
with the simulator off, compiles each (kernel, signature) to PTX with the tile and
block sizes a real GPU gets.  It needs a CUDA toolkit's libnvvm and libdevice
(``CUDA_HOME``, e.g. /usr/local/cuda), not a driver or a device.  Exit status 1 if
any kernel fails to compile.
"""
import glob
import os
import pickle
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CC = (9, 0)


def record(paths, out):
    """Run the tests in the simulator; pickle {(module, name): {argument types}}."""
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
    with open(out, "wb") as handle:
        pickle.dump(seen, handle)
    return status


def compile_all(path):
    """Compile each recorded (kernel, signature) for CC with the simulator off."""
    os.environ["NUMBA_ENABLE_CUDASIM"] = "0"
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

    with open(path, "rb") as handle:
        seen = pickle.load(handle)
    failures = 0
    for (module_name, name), signatures in sorted(seen.items()):
        kernel = getattr(importlib.import_module(module_name), name)
        kernel.bind(cuda, build)
        for signature in sorted(signatures, key=str):
            try:
                ptx, _ = cuda.compile_ptx(kernel.pyfunc, signature, cc=CC)
                print(f"ok    {module_name}.{name}{tuple(str(t) for t in signature)}: {len(ptx):,} bytes of PTX")
            except Exception as err:  # report every failure, then fail
                failures += 1
                lines = [line for line in str(err).strip().splitlines() if line.strip(" :")]
                print(f"FAIL  {module_name}.{name}{tuple(str(t) for t in signature)}: {type(err).__name__}")
                print("      " + "\n      ".join(lines[:12]))
    print(f"{sum(len(s) for s in seen.values())} signatures of {len(seen)} kernels; {failures} failed")
    return 1 if failures else 0


def main(argv):
    if len(argv) == 2 and argv[0] == "--compile":
        return compile_all(argv[1])
    paths = argv or sorted(glob.glob(os.path.join(ROOT, "tests", "test_cuda_*.py")))
    with tempfile.TemporaryDirectory() as folder:
        types = os.path.join(folder, "types.pickle")
        status = subprocess.run([sys.executable, __file__, "--record", types, *paths], cwd=ROOT).returncode
        if status not in (0, 5) or not os.path.exists(types):
            print(f"the simulator tests failed (status {status}); nothing compiled")
            return 1
        return subprocess.run([sys.executable, __file__, "--compile", types], cwd=ROOT).returncode


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--record":
        sys.exit(record(sys.argv[3:], sys.argv[2]))
    sys.exit(main(sys.argv[1:]))
