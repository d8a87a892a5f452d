"""The processor's name for the benchmarks' reports, without importing rabbitkit.

Loads ``rabbitkit/backend/cpuinfo.py`` by its path (standard library only), so the
PyTorch-alone processes, which must not import rabbitkit, name the processor exactly
as the tuning cache and ``rabbit --version`` do: "AMD EPYC (family 25 model 1, AVX2)".
"""
import importlib.util
import os

_SOURCE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "rabbitkit", "backend", "cpuinfo.py")
_spec = importlib.util.spec_from_file_location("rabbitkit_bench_cpuinfo", _SOURCE)
_cpuinfo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_cpuinfo)

cpu_model = _cpuinfo.cpu_model
