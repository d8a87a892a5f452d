"""rabbitkit's process settings: thread pools (set for itself, overridable, never passed on to other
frameworks), glibc's reuse of freed memory, and the unpacked small-product path of the kernels' BLAS."""
import json
import os
import platform
import subprocess
import sys

import pytest

import rabbitkit.backend.cpu as cpu

SETTINGS = ("OPENBLAS_THREAD_TIMEOUT", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")

PROBE = (
    "import json, os, rabbitkit, rabbitkit.backend.cpu; "
    "foreign = rabbitkit.foreign_environment(); "
    f"print(json.dumps({{n: [os.environ.get(n), foreign.get(n)] for n in {SETTINGS!r}}}))"
)


def probe(**user_settings):
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    env.update(user_settings)
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_defaults_are_set_for_rabbitkit_and_kept_from_child_frameworks():
    seen = probe()
    assert seen == {
        "OPENBLAS_THREAD_TIMEOUT": ["4", None],
        "OMP_WAIT_POLICY": ["PASSIVE", None],
        "GOMP_SPINCOUNT": ["1000", None],
    }


def test_users_own_settings_win_and_are_passed_on():
    seen = probe(GOMP_SPINCOUNT="50", OMP_WAIT_POLICY="ACTIVE")
    assert seen["GOMP_SPINCOUNT"] == ["50", "50"]
    assert seen["OMP_WAIT_POLICY"] == ["ACTIVE", "ACTIVE"]
    assert seen["OPENBLAS_THREAD_TIMEOUT"] == ["4", None]


FAULT_PROBE = """
import resource
import numpy as np
import rabbitkit.backend.cpu as cpu

def faults_of_one_allocation():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    array = np.empty(16 << 20, dtype=np.uint8)
    array.fill(1)  # touch every page
    del array
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

faults_of_one_allocation()
print(cpu.FREED_MEMORY_KEPT, max(faults_of_one_allocation() for _ in range(3)))
"""


def run_fault_probe(**env_settings):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(env_settings)
    out = subprocess.run([sys.executable, "-c", FAULT_PROBE], env=env, capture_output=True, text=True, check=True)
    kept, faults = out.stdout.split()
    return kept == "True", int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_memory_is_reused_without_page_faults():
    # A fresh 16 MiB buffer costs at least 8 page faults (2 MiB huge pages; 4,096 with
    # 4 KiB pages); a reused one none.
    kept, faults = run_fault_probe()
    assert kept
    assert faults < 8
    # The user's own glibc setting wins, and then the buffer is faulted in again.
    kept, faults = run_fault_probe(MALLOC_MMAP_THRESHOLD_="131072")
    assert not kept
    assert faults >= 8


class FakeBlas:
    """What threadpoolctl reports of a loaded BLAS library."""

    def __init__(self, architecture, version="0.3.30", internal_api="openblas"):
        self.architecture, self.version, self.internal_api = architecture, version, internal_api


@pytest.mark.parametrize("blas,expected", [
    (FakeBlas("SkylakeX"), True),
    (FakeBlas("SapphireRapids", "0.3.31.188.0"), True),
    (FakeBlas("Cooperlake"), True),
    (FakeBlas("Haswell"), False),  # no unpacked small-product kernels on AVX2 cores
    (FakeBlas("Zen"), False),
    (FakeBlas("SkylakeX", "0.3.15"), False),  # before OpenBLAS had them
    (FakeBlas(None, "2024.0", "mkl"), False),
])
def test_unpacked_small_products_are_detected_from_the_kernels_blas(monkeypatch, blas, expected):
    monkeypatch.setattr(cpu, "_kernel_blas_controllers", lambda: ([blas], [blas, FakeBlas("Haswell")]))
    assert cpu.kernel_blas_unpacked_products() is expected


def test_rows_per_product_keeps_each_call_under_the_unpacked_limit(monkeypatch):
    monkeypatch.setattr(cpu, "KERNEL_BLAS_UNPACKED_PRODUCTS", True)
    assert cpu.rows_per_product(128, 512, 16) == 8  # 16 rows would be 1,048,576 > 1e6 multiply-adds
    assert cpu.rows_per_product(256, 1024, 16) == 3
    assert cpu.rows_per_product(64, 256, 5) == 5
    assert cpu.rows_per_product(512, 2048, 16) == 16  # even one row is over: one call, packed
    for inner, columns in ((128, 512), (256, 1024), (100, 300)):
        rows = cpu.rows_per_product(inner, columns, 64)
        assert rows * inner * columns <= cpu.UNPACKED_PRODUCT_LIMIT
    monkeypatch.setattr(cpu, "KERNEL_BLAS_UNPACKED_PRODUCTS", False)
    assert cpu.rows_per_product(128, 512, 16) == 16  # packed BLAS: splitting only packs more often


def run_python(code, **env_settings):
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    env.update(env_settings)
    return subprocess.run([sys.executable, "-W", "always", "-c", code], env=env, capture_output=True, text=True,
                          check=True)


def test_importing_the_package_alone_sets_the_thread_settings_before_any_pool_starts():
    # Numba's threads may be started right after `import rabbitkit` (numba.set_num_threads in a
    # script), before any rabbitkit module that runs kernels is imported: libgomp must find
    # its wait policy in place then.
    out = run_python("import os, rabbitkit; print(os.environ['OMP_WAIT_POLICY'], os.environ['GOMP_SPINCOUNT'])")
    assert out.stdout.split() == ["PASSIVE", "1000"]
    assert "RuntimeWarning" not in out.stderr


STARTED_FIRST = (
    "import numba, numba.np.ufunc.parallel as parallel; numba.set_num_threads(1); "
    "print(parallel._threading_layer); import rabbitkit"
)


def test_a_numba_pool_started_before_rabbitkit_is_reported():
    out = run_python(STARTED_FIRST)
    if out.stdout.strip() != "omp":
        pytest.skip(f"Numba runs the {out.stdout.strip()} threading layer here, not OpenMP")
    assert "Numba's OpenMP threads were started before rabbitkit was imported" in out.stderr
    assert "OMP_WAIT_POLICY=PASSIVE" in out.stderr
    # With the user's own wait policy in place the pool was started as they chose: no warning.
    quiet = run_python(STARTED_FIRST, OMP_WAIT_POLICY="PASSIVE", GOMP_SPINCOUNT="1000")
    assert "RuntimeWarning" not in quiet.stderr


TORCH_PROBE = (
    "import sys, types, warnings\n"
    "{first}\n"
    "import rabbitkit\n"
    "{after}\n"
    "with warnings.catch_warnings(record=True) as seen:\n"
    "    warnings.simplefilter('always')\n"
    "    rabbitkit.warn_if_sharing_cores_with_torch()\n"
    "    rabbitkit.warn_if_sharing_cores_with_torch()\n"
    "print(len(seen)); [print(w.message) for w in seen]\n"
)
FAKE_TORCH = "sys.modules['torch'] = types.ModuleType('torch')"  # what the check looks at; no real torch needed


@pytest.mark.parametrize("first, after, expected", [
    (FAKE_TORCH, "", "imported before rabbitkit"),
    ("", FAKE_TORCH, "compete with rabbitkit's kernels"),
    ("", "", None),
])
def test_pytorch_in_the_same_process_is_warned_about_once(first, after, expected):
    out = subprocess.run([sys.executable, "-c", TORCH_PROBE.format(first=first, after=after)],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    if expected is None:
        assert out == ["0"]
    else:
        assert out[0] == "1" and expected in out[1] and "separate processes" in out[1]


@pytest.mark.parametrize("first, settings, warned", [
    ("numpy", {}, True),
    ("rabbitkit", {}, False),
    ("numpy", {"OPENBLAS_THREAD_TIMEOUT": "4"}, False),
    ("numpy", {"OPENBLAS_NUM_THREADS": "1"}, False),
])
def test_numpy_imported_first_is_warned_about_once(first, settings, warned):
    """numpy's OpenBLAS started before rabbitkit's settings spins after every product:
    one warning that says what to do, and none where the settings reached it or it
    runs one thread."""
    if not any(c.internal_api == "openblas" for c in cpu._LOADED_BLAS[1] if c not in cpu._LOADED_BLAS[0]):
        pytest.skip("numpy's BLAS here is not a separate OpenBLAS")
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS + ("OPENBLAS_NUM_THREADS",)}
    env.update(settings, OPENBLAS_NUM_THREADS=settings.get("OPENBLAS_NUM_THREADS", "2"))
    order = "import numpy, rabbitkit.backend.cpu" if first == "numpy" else "import rabbitkit.backend.cpu, numpy"
    done = subprocess.run([sys.executable, "-W", "always", "-c", order], env=env, capture_output=True, text=True,
                          check=True)
    assert done.stderr.count("numpy was imported before rabbitkit") == (1 if warned else 0), done.stderr
    if warned:
        assert "OPENBLAS_THREAD_TIMEOUT=4" in done.stderr
