"""The processor's name: family, model and vector instructions tell apart what "AMD EPYC" does not."""
from rabbitkit.backend import cpuinfo, tuning

ZEN3 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 1
model name\t: AMD EPYC
flags\t\t: fpu sse sse2 ssse3 fma sse4_1 sse4_2 avx avx2 sha_ni vaes

processor\t: 1
model name\t: something else
"""

SAPPHIRE_RAPIDS = """processor\t: 0
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz
flags\t\t: avx avx2 avx512f avx512bw amx_bf16 amx_tile amx_int8
"""

ZEN4 = "cpu family\t: 25\nmodel\t\t: 17\nmodel name\t: AMD EPYC\nflags\t\t: avx2 avx512f avx512_bf16\n"

AARCH64 = "processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd evtstrm\nCPU implementer\t: 0x41\n"


def test_the_first_processor_is_described_with_family_model_and_vectors():
    assert cpuinfo.describe(cpuinfo.parse(ZEN3)) == "AMD EPYC (family 25 model 1, AVX2)"
    assert cpuinfo.describe(cpuinfo.parse(ZEN4)) == "AMD EPYC (family 25 model 17, AVX-512)"
    assert cpuinfo.describe(cpuinfo.parse(SAPPHIRE_RAPIDS)) == (
        "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz (family 6 model 143, AVX-512, AMX)")


def test_two_processors_of_one_marketing_name_get_two_tuning_keys():
    assert cpuinfo.describe(cpuinfo.parse(ZEN3)) != cpuinfo.describe(cpuinfo.parse(ZEN4))


def test_a_cpuinfo_without_model_name_or_x86_flags_falls_back_to_the_platform(monkeypatch):
    monkeypatch.setattr(cpuinfo.platform, "processor", lambda: "")
    monkeypatch.setattr(cpuinfo.platform, "machine", lambda: "aarch64")
    assert cpuinfo.describe(cpuinfo.parse(AARCH64)) == "aarch64"


def test_the_tuning_key_and_this_machine_use_the_same_name():
    assert tuning.cpu_model() == cpuinfo.cpu_model()
    assert tuning.machine_key().startswith(cpuinfo.cpu_model() + " | ")
