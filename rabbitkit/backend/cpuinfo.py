"""The processor's name as the tuning cache, ``rabbit --version`` and the benchmarks give it.

``lscpu``'s "Model name" alone does not tell processors apart: this project's
machines have said "AMD EPYC" on a Zen 4 with AVX-512 (OpenBLAS picked its SkylakeX
kernels) and on a Zen 3 without (OpenBLAS's Haswell kernels), and kernel choices or
speed figures of the one say nothing about the other.  So the name carries the
family and model numbers and the widest vector instructions:
``"AMD EPYC (family 25 model 1, AVX2)"``.

Standard library only, and nothing imported from rabbitkit: the benchmarks load this
file by its path in processes that must not import rabbitkit (its thread settings
would reach PyTorch's runtime there).
"""
import functools
import platform

CPUINFO = "/proc/cpuinfo"


def parse(text):
    """``{field: value}`` of the first processor listed in a /proc/cpuinfo text."""
    fields = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break  # the first processor's block ends here
            continue
        name, sep, value = line.partition(":")
        if sep:
            fields.setdefault(name.strip().lower(), value.strip())
    return fields


def vector_extensions(flags):
    """The widest vector instructions among /proc/cpuinfo's ``flags``: "AVX-512"
    (with ", AMX" where the matrix tiles are there), "AVX2", "AVX", "SSE4.2" or ""."""
    flags = set(flags.split())
    if "avx512f" in flags:
        return "AVX-512, AMX" if "amx_tile" in flags else "AVX-512"
    for flag, name in (("avx2", "AVX2"), ("avx", "AVX"), ("sse4_2", "SSE4.2")):
        if flag in flags:
            return name
    return ""  # other architectures list "Features" (aarch64) and their names stay out


def describe(fields):
    """The processor's name with its family, model and vector instructions."""
    name = fields.get("model name") or fields.get("cpu model") or fields.get("hardware")
    details = [f"family {fields['cpu family']} model {fields['model']}"] if "cpu family" in fields and "model" in fields else []
    vectors = vector_extensions(fields.get("flags", ""))
    if vectors:
        details.append(vectors)
    name = name or platform.processor() or platform.machine()
    return f"{name} ({', '.join(details)})" if details else name


@functools.cache  # fixed for the process; the tuner asks for it at every choice
def cpu_model():
    try:
        with open(CPUINFO) as handle:
            return describe(parse(handle.read()))
    except OSError:
        return platform.processor() or platform.machine() or "unknown"
