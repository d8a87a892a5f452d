"""``status.json``: what state a run directory is in, written atomically by the trainer.

The trainer writes ``{"state": "running", "pid": ..., "host": ...}`` when training
starts, the epoch count after every epoch, and the final state when it stops:
``completed``, ``early_stopping``, ``interrupted`` (Ctrl-C, checkpoint saved),
``diverged`` or ``failed`` (an unexpected error).  A run killed outright
(SIGKILL, power cut) stays ``running`` on disk; :func:`read_status` reports it as
``interrupted`` once its process is gone.

Run directories from before ``status.json`` existed are classified from what they
hold: ``final_metrics.json`` means the run finished, else it was interrupted.
"""
import json
import os
import socket
import time

from .rundir import atomic_write_text

FILE = "status.json"
STATES = ("running", "completed", "early_stopping", "interrupted", "diverged", "failed")
LABELS = {"early_stopping": "stopped early"}


def label(state):
    """The words ``rabbit runs`` shows for a state (``early_stopping`` -> ``stopped early``)."""
    return LABELS.get(state, state)


def now_iso():
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def write_status(run_dir, **fields):
    """Merge ``fields`` into ``run_dir/status.json`` (atomically); returns the record."""
    record = read_raw(run_dir) or {}
    record.update(fields)
    record["updated"] = now_iso()
    atomic_write_text(run_dir / FILE, json.dumps(record, indent=2, sort_keys=True) + "\n")
    return record


def read_raw(run_dir):
    """The recorded status dict, or None when there is none (or it is unreadable)."""
    try:
        return json.loads((run_dir / FILE).read_text())
    except (OSError, ValueError):
        return None


def process_alive(pid):
    """True when a process with ``pid`` exists on this machine."""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, belongs to someone else
        return True
    except (OSError, ValueError, TypeError):
        return False
    return True


def read_status(run_dir):
    """The effective state of a run directory (one of :data:`STATES`).

    A recorded ``running`` counts only while its process lives: on this host the
    pid is checked; a run recorded on another host is taken at its word.
    """
    record = read_raw(run_dir)
    if record is None:
        return "completed" if (run_dir / "final_metrics.json").is_file() else "interrupted"
    state = record.get("state", "interrupted")
    if state == "running" and record.get("host") == socket.gethostname() and not process_alive(record.get("pid")):
        return "interrupted"
    return state if state in STATES else "interrupted"


def mark_running(run_dir, monitor, epochs_total, epochs_done):
    """Called when training starts (fresh or resumed): keeps the first start time."""
    previous = read_raw(run_dir) or {}
    return write_status(run_dir, state="running", pid=os.getpid(), host=socket.gethostname(), monitor=monitor,
                        epochs=epochs_total, epochs_done=epochs_done, started=previous.get("started", now_iso()),
                        error=None)
