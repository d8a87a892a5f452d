"""Choose kernel variants by measuring them on this machine, and remember the choice.

Which way of running a layer is fastest depends on the processor, the BLAS and
its kernel, the thread count and the shape: on one AMD EPYC, per-sample
lowering with one single-threaded BLAS product per thread wins; on an Intel Xeon
whose OpenBLAS multiplies small products unpacked, the same layer can prefer
one multi-threaded product per sample.  So rather than decide by assumption, a
layer offers its candidate variants to :func:`choose` the first time it meets a
shape; each is timed (after one untimed call that compiles and warms it), the
fastest is kept, and the choice is stored in ``<cache>/tuning.json`` under this
machine's key (CPU model, BLAS library, version and kernel, thread count), in
the spirit of cuDNN's benchmark mode.  The next run starts tuned.

A close call (the runner-up within ``CLOSE_CALL`` of the winner) is measured once
more by the next process that meets the shape, and each candidate keeps the best
of its times from both: one noisy moment on a shared machine should not settle a
choice for good, and the minimum over more calls is nearer each variant's real cost.

Variants differ only in the order of floating-point sums (float32 rounding).
``[experiment] tune = false`` or ``RABBIT_TUNE=0`` turns tuning off: every layer
then takes its built-in default and runs are bit-reproducible.
``rabbit tune EXP.toml`` tunes an experiment's shapes ahead and prints the choices.

A run keeps the choices it used in its checkpoints (:func:`used`), and a resumed run
takes them again (:func:`start_run` with ``pinned``) whatever the cache says by
then: a close call measured again, or a new generation of kernels, would otherwise
give the resumed epochs other float32 rounding than the uninterrupted run had.  A
run also writes them to ``kernel_choices.json`` in its folder, and a fresh run given
that folder (``[experiment] kernel_choices``, :func:`read_choices`) takes them too:
the same seed on the same machine then reproduces that run bit for bit.

Users: Conv2D (per-sample, whole-batch or banded lowering, shifted products, Winograd)
and the recurrent layers (rows per BLAS call of the per-step product,
``Recurrent._time_loop``).
"""
import functools
import json
import os
import threading
import time

from .cpuinfo import cpu_model

TIMED_CALLS = 3  # timed calls per candidate (the minimum counts), after one untimed call
CLOSE_CALL = 0.10  # runner-up within 10 % of the winner: measured again by the next process
MEASURING_ROUNDS = 2  # processes that measure a close call, at most

_lock = threading.Lock()
_enabled = None  # None: decided by RABBIT_TUNE (default on)
# {machine key: {op key: {"choice": name, "seconds": {name: s}}}}, read from the cache
# file per machine key as it is first needed (the key changes with the thread count).
_choices = {}
_ignore_stored = False  # forget(measure_again=True): time every shape afresh
_measured = []  # (op key, choice, {name: s}) measured by this process (what `rabbit tune` prints)
_used = {}  # {op key: choice} returned since start_run (what a run's checkpoints keep)
_pinned = {}  # {op key: choice} a resumed run takes instead of the cache's


def set_enabled(flag):
    """Turn measuring on or off for this process (``None``: back to ``RABBIT_TUNE``)."""
    global _enabled
    _enabled = None if flag is None else bool(flag)


def enabled():
    if _enabled is not None:
        return _enabled
    return os.environ.get("RABBIT_TUNE", "1").strip().lower() not in ("0", "false", "no", "off")


@functools.cache
def blas_description():
    """'openblas 0.3.29 SkylakeX' for the BLAS the kernels call (or 'unknown')."""
    from .cpu import _LOADED_BLAS

    kernel_side, every = _LOADED_BLAS
    for controller in kernel_side or every:
        return f"{controller.internal_api} {controller.version} {controller.architecture}"
    return "unknown"


# The generation of the tuned kernels: raised whenever a change makes a variant
# faster or slower, so choices measured among the older kernels are measured again
# instead of holding for good (2: max-pool, LRN, whole-batch gradient load and
# Winograd backward of 2026-12-01 night; the stored choices had timed a whole-batch
# backward 15x slower than it now is).
KERNELS = 2


def machine_key():
    import numba

    return f"{cpu_model()} | {blas_description()} | kernels {KERNELS} | {numba.get_num_threads()} threads"


def cache_path():
    from ..data.paths import cache_root

    return cache_root() / "tuning.json"


def _read_all():
    try:
        data = json.loads(cache_path().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # no cache yet, or a damaged one: measure again


def _machine_choices():
    machine = machine_key()
    if machine not in _choices:
        _choices[machine] = {} if _ignore_stored else dict(_read_all().get(machine, {}))
    return _choices[machine]


def _store(op_key, record):
    """Add one choice to the cache file (read, merge, write atomically: runs may share it)."""
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read_all()
        data.setdefault(machine_key(), {})[op_key] = record
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache folder: the choice still holds for this process


def choose(op, shape, candidates, default, setup=None, release=None):
    """The name of the fastest of ``candidates`` ({name: zero-argument callable}) for
    ``op`` at ``shape`` (anything with a stable ``str``), measured once per machine.

    Candidates must be free of side effects beyond their output buffers: each runs
    1 + TIMED_CALLS times when measured.  ``setup``, if given, runs untimed before
    every call (e.g. to restore inputs a candidate overwrites in place).  ``release``,
    if given, runs once after a measurement, to free what the losing candidates
    allocated (their scratch would otherwise stay for the rest of the run).  A
    choice pinned by :func:`start_run` comes first; otherwise, with tuning off,
    returns ``default``.
    """
    op_key = f"{op} {shape}"
    with _lock:
        # Pins first: a run replaying another's choices takes them with tuning off too.
        if _pinned.get(op_key) in candidates:
            _used[op_key] = _pinned[op_key]
            return _pinned[op_key]
    if not enabled() or len(candidates) < 2:
        return default
    with _lock:
        known = _machine_choices().get(op_key)
        # A stored choice holds while the candidates are the ones it was measured
        # among (a candidate added in a later version is measured, not ignored) and
        # it was not a close call still short of its rounds.
        if known is not None and set(known.get("seconds", ())) == set(candidates):
            if not _measure_again(op_key, known):
                _used[op_key] = known["choice"]
                return known["choice"]
        else:
            known = None
        for call in candidates.values():
            if setup is not None:
                setup()
            call()  # compiles on first use, warms caches and thread pools
        # Rounds of one timed call per candidate, rather than all of one candidate's
        # calls in a row: load from other processes that comes and goes then hits
        # every candidate alike instead of the one that happened to run during it.
        seconds = dict.fromkeys(candidates, float("inf"))
        for _ in range(TIMED_CALLS):
            for name, call in candidates.items():
                if setup is not None:
                    setup()
                started = time.perf_counter()
                call()
                seconds[name] = min(seconds[name], time.perf_counter() - started)
        rounds = 1
        if known is not None:  # a close call measured again: the best of both rounds
            seconds = {name: min(t, float(known["seconds"][name])) for name, t in seconds.items()}
            rounds = int(known.get("rounds", 1)) + 1
        choice = min(seconds, key=seconds.get)
        record = {"choice": choice, "seconds": seconds, "rounds": rounds}
        _machine_choices()[op_key] = record
        _measured.append((op_key, choice, seconds))
        _used[op_key] = choice
        _store(op_key, record)
        if release is not None:
            release()
        return choice


def _measure_again(op_key, record):
    """Whether a stored record is a close call that fewer than MEASURING_ROUNDS processes
    measured, none of them this one."""
    if int(record.get("rounds", 1)) >= MEASURING_ROUNDS or any(key == op_key for key, _, _ in _measured):
        return False
    times = sorted(float(t) for t in record["seconds"].values())
    return len(times) > 1 and times[1] <= times[0] * (1 + CLOSE_CALL)


def start_run(pinned=None):
    """Begin recording the choices of one run afresh; ``pinned`` ({op key: choice},
    from :func:`used` of an earlier process) are taken instead of the cache's where
    the choice is among a shape's candidates (a resumed run: the same kernels as
    before it was stopped)."""
    with _lock:
        _used.clear()
        _pinned.clear()
        _pinned.update(pinned or {})
        _used.update(_pinned)


CHOICES_FILE = "kernel_choices.json"  # in a run's folder: its choices so far (with each checkpoint, after the test)


def read_choices(path):
    """The kernel choices a run kept ({op key: choice}): ``path`` is its folder (with
    :data:`CHOICES_FILE`) or such a file.  Raises ConfigError in one line naming the
    file where it is missing or is not a JSON object of variant names."""
    from ..errors import ConfigError

    path = os.fspath(path)
    file = os.path.join(path, CHOICES_FILE) if os.path.isdir(path) else path
    try:
        with open(file) as handle:
            choices = json.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"{file}: no such file (kernel choices: a run's folder, which holds {CHOICES_FILE}, "
                          "or such a file)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"{file}: not a kernel-choices JSON file ({error})") from None
    if not isinstance(choices, dict) or not all(isinstance(v, str) for v in choices.values()):
        raise ConfigError(f"{file}: kernel choices must be a JSON object of kernel shapes to variant names, "
                          f"got {json.dumps(choices)[:80]}")
    return choices


def used():
    """{op key: choice} of every variant chosen since :func:`start_run` (and the
    pinned ones), to be kept with a run's checkpoints."""
    with _lock:
        return dict(_used)


def measured():
    """[(op key, choice, {candidate: seconds})] measured by this process, in order."""
    return list(_measured)


def known_choices():
    """Every stored choice of this machine: {op key: record}."""
    return dict(_machine_choices())


def forget(measure_again=False):
    """Drop this process's view of the cache (tests, or after deleting the file);
    ``measure_again``: ignore the stored choices too (each shape is timed afresh and
    its new choice replaces the stored one)."""
    global _ignore_stored
    _choices.clear()
    _ignore_stored = bool(measure_again)
    _measured.clear()
    start_run()
