"""OpenBLAS against MKL and BLIS on the float32 products rabbitkit's layers make.

    python benchmarks/bench_blas.py              # every library found, 1 and all threads
    python benchmarks/bench_blas.py --quick      # fewer repetitions

Issue 13 asks whether another BLAS wins by a margin that matters on the machine at
hand.  rabbitkit's kernels call OpenBLAS (scipy's inside Numba kernels, numpy's from
Python); the candidates are

* ``openblas``: numpy's ``np.dot`` (the library rabbitkit uses today);
* ``mkl``: ``cblas_sgemm`` from Intel's ``libmkl_rt`` (``pip install mkl``, found in
  ``<prefix>/lib`` or at ``--mkl-lib``), called through ctypes, GNU threading layer
  so its threads are the same OpenMP runtime as Numba's;
* ``blis``: ``blis.py.gemm`` from the ``blis`` wheel (explosion's cython-blis).

Each library runs alone in its own process (two BLAS thread pools in one process
slow each other down), on the same operands, checked against numpy's product first.
The shapes are the layers' real products, forward and both backward ones (the
transposed operands are views, as the layers pass them): the per-sample conv
lowering of the reference ConvNet and of VGG-16 at 224 px, a recurrent step, and a
dense layer.  Figures are GFLOP/s, the best of five rounds; the ratio column is
against OpenBLAS at the same thread count.  Benchmark-only dependencies: mkl, blis.
"""
import argparse
import ctypes
import glob
import json
import os
import subprocess
import sys
import time

from machine import cpu_model  # benchmarks/machine.py: the name rabbitkit's tuning cache uses

import numpy as np

# (name, m, k, n, transpose a, transpose b): C[m, n] = op(A) @ op(B), k the inner size.
PRODUCTS = [
    ("convnet conv 32->32, fwd (W @ col)", 32, 288, 1024, False, False),
    ("convnet conv 32->32, dW (dY @ colT)", 32, 1024, 288, False, True),
    ("convnet conv 32->32, dcol (WT @ dY)", 288, 32, 1024, True, False),
    ("convnet conv 64->64, fwd", 64, 576, 256, False, False),
    ("vgg16 conv1_1 3->64 @224, fwd", 64, 27, 50176, False, False),
    ("vgg16 conv2_2 128->128 @112, fwd", 128, 1152, 12544, False, False),
    ("vgg16 conv3_3 256->256 @56, fwd", 256, 2304, 3136, False, False),
    ("vgg16 conv3_3, dcol", 2304, 256, 3136, True, False),
    ("vgg16 conv4_3 512->512 @28, fwd", 512, 4608, 784, False, False),
    ("vgg16 conv5_3 512->512 @14, fwd", 512, 4608, 196, False, False),
    ("lstm 2x128 step, batch 32 (h @ U)", 32, 128, 512, False, False),
    ("mlp 784->256, batch 128, fwd", 128, 784, 256, False, False),
    ("mlp 784->256, dW (xT @ dY)", 784, 128, 256, True, False),
]


def find_mkl(explicit):
    if explicit:
        return explicit
    for pattern in (os.path.join(sys.prefix, "lib", "libmkl_rt.so*"),):
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    return None


def library_multiply(library, threads, mkl_path):
    """(multiply(a, b, c, trans_a, trans_b), description) for one library."""
    if library == "openblas":
        from threadpoolctl import threadpool_info, threadpool_limits

        threadpool_limits(threads, user_api="blas")
        info = [i for i in threadpool_info() if i["user_api"] == "blas"]
        description = ", ".join(f"{i['internal_api']} {i['version']} {i.get('architecture')}" for i in info)

        def multiply(a, b, c, trans_a, trans_b):
            np.dot(a.T if trans_a else a, b.T if trans_b else b, c)

        return multiply, description
    if library == "mkl":
        os.environ.setdefault("MKL_THREADING_LAYER", "GNU")
        lib = ctypes.CDLL(mkl_path, mode=ctypes.RTLD_GLOBAL)
        lib.MKL_Set_Num_Threads(threads)
        version = ctypes.create_string_buffer(256)
        lib.MKL_Get_Version_String(version, 256)
        sgemm = lib.cblas_sgemm
        sgemm.restype = None
        sgemm.argtypes = [ctypes.c_int] * 6 + [ctypes.c_float, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                                               ctypes.c_int, ctypes.c_float, ctypes.c_void_p, ctypes.c_int]
        row_major, no_trans, trans = 101, 111, 112

        def multiply(a, b, c, trans_a, trans_b):
            m, n = c.shape
            k = a.shape[0] if trans_a else a.shape[1]
            sgemm(row_major, trans if trans_a else no_trans, trans if trans_b else no_trans, m, n, k, 1.0,
                  a.ctypes.data, a.shape[1], b.ctypes.data, b.shape[1], 0.0, c.ctypes.data, n)

        return multiply, version.value.decode().strip()
    if library == "blis":
        os.environ["BLIS_NUM_THREADS"] = str(threads)
        import blis
        import blis.py

        def multiply(a, b, c, trans_a, trans_b):
            blis.py.gemm(a, b, trans1=trans_a, trans2=trans_b, out=c, alpha=1.0, beta=0.0)

        return multiply, f"blis (cython-blis {getattr(blis, '__version__', '?')})"
    raise SystemExit(f"unknown library {library!r}")


def measure_one_library(library, threads, mkl_path, quick):
    """Runs in the child process: JSON of GFLOP/s per product."""
    multiply, description = library_multiply(library, threads, mkl_path)
    rng = np.random.default_rng(0)
    results = {}
    for name, m, k, n, trans_a, trans_b in PRODUCTS:
        a = rng.standard_normal((k, m) if trans_a else (m, k), dtype=np.float32)
        b = rng.standard_normal((n, k) if trans_b else (k, n), dtype=np.float32)
        c = np.zeros((m, n), np.float32)
        multiply(a, b, c, trans_a, trans_b)
        expected = (a.T if trans_a else a) @ (b.T if trans_b else b)
        if not np.allclose(c, expected, rtol=1e-3, atol=1e-3 * np.sqrt(k)):
            raise SystemExit(f"{library}: wrong product for {name}")
        flops = 2.0 * m * n * k
        repetitions = max(2, int((3e8 if quick else 2e9) / flops))
        best = float("inf")
        for _ in range(3 if quick else 5):
            start = time.perf_counter()
            for _ in range(repetitions):
                multiply(a, b, c, trans_a, trans_b)
            best = min(best, (time.perf_counter() - start) / repetitions)
        results[name] = flops / best / 1e9
    print(json.dumps({"description": description, "gflops": results}))


def libraries_present(mkl_path):
    present = ["openblas"]
    if mkl_path and os.path.exists(mkl_path):
        present.append("mkl")
    try:
        import blis.py  # noqa: F401

        present.append("blis")
    except ImportError:
        pass
    return present


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", default=None, help="comma-separated thread counts (default: 1 and all)")
    parser.add_argument("--mkl-lib", default=None, help="path of libmkl_rt.so (default: <prefix>/lib)")
    parser.add_argument("--library", help=argparse.SUPPRESS)  # child process
    args = parser.parse_args()
    mkl_path = find_mkl(args.mkl_lib)
    if args.library:
        measure_one_library(args.library, int(args.threads), mkl_path, args.quick)
        return
    cores = len(os.sched_getaffinity(0))
    thread_counts = [int(t) for t in args.threads.split(",")] if args.threads else sorted({1, cores})
    libraries = libraries_present(mkl_path)
    print(f"CPU: {cpu_model()}, {cores} cores; libraries: {', '.join(libraries)}")
    for threads in thread_counts:
        figures, descriptions = {}, {}
        for library in libraries:  # each alone in its own process
            command = [sys.executable, __file__, "--library", library, "--threads", str(threads)]
            command += ["--quick"] if args.quick else []
            command += ["--mkl-lib", mkl_path] if mkl_path else []
            out = subprocess.run(command, capture_output=True, text=True)
            if out.returncode != 0:
                print(f"  {library}: failed: {(out.stderr or out.stdout).strip().splitlines()[-1:]}")
                continue
            record = json.loads(out.stdout.strip().splitlines()[-1])
            figures[library], descriptions[library] = record["gflops"], record["description"]
        print(f"\n{threads} thread(s): " + "; ".join(f"{lib} = {d}" for lib, d in descriptions.items()))
        others = [lib for lib in figures if lib != "openblas"]
        header = f"{'product (m x k x n)':<58}{'openblas':>10}" + "".join(f"{lib:>10}{'ratio':>7}" for lib in others)
        print(header)
        for name, m, k, n, _, _ in PRODUCTS:
            base = figures.get("openblas", {}).get(name)
            row = f"{name + f' ({m}x{k}x{n})':<58}{base or float('nan'):>10.1f}"
            for lib in others:
                value = figures[lib][name]
                row += f"{value:>10.1f}{value / base if base else float('nan'):>6.2f}x"
            print(row)


if __name__ == "__main__":
    main()
