"""rabbitkit's thread-pool settings: set for itself, overridable, never passed on to other frameworks."""
import json
import os
import subprocess
import sys

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
