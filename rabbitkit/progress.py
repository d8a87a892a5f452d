"""Progress bars for every long wait (training, decoding, downloads, evaluation, sweeps).

One small helper over `tqdm <https://tqdm.github.io>`_, so the rest of rabbitkit
(and plugins, and the visualisation commands) never talks to the library itself::

    from rabbitkit.progress import bar

    with bar(len(files), "decoding") as progress:
        for name in files:
            ...
            progress.update(1, loss=0.25)      # advance by 1, show "loss=0.25"

A bar is shown only on a terminal (its stream's ``isatty()``); off a terminal
(logs, CI, pipes, Dask workers) it writes nothing.  ``enabled=False`` silences it
everywhere, and ``RABBIT_PROGRESS=0`` in the environment silences every bar.

Why tqdm rather than rich: tqdm is one small pure-Python package with no
dependencies, the de-facto standard in the scientific Python stack (so often
installed already), it writes plain carriage-return lines to stderr that mix well
with the trainer's per-epoch ``print`` lines and with ``click`` output, and it
turns itself off on non-terminals (``disable=None``), which is exactly the
behaviour rabbitkit had.  rich is a full terminal-rendering framework (markup,
live layouts, its own console that wants to own stdout), a much larger dependency
for the one thing needed here.
"""
import os
import sys

__all__ = ["bar", "Bar"]


def _wanted(enabled, stream):
    if enabled is False:
        return False
    if os.environ.get("RABBIT_PROGRESS", "").strip().lower() in ("0", "false", "no", "off"):
        return False
    return bool(getattr(stream, "isatty", None) and stream.isatty())


class Bar:
    """A progress bar (or a silent stand-in): ``update(n, **postfix)``, ``close()``, a context manager."""

    def __init__(self, total, desc, enabled=None, *, unit="it", initial=0, stream=None, unit_scale=False):
        stream = stream or sys.stderr
        self.enabled = _wanted(enabled, stream)
        self.total = total
        self.n = initial
        self._tqdm = None
        if self.enabled:
            from tqdm import tqdm

            self._tqdm = tqdm(total=total, desc=desc, unit=unit, initial=initial, file=stream, leave=False,
                              dynamic_ncols=True, unit_scale=unit_scale, mininterval=0.2)

    def update(self, n=1, **postfix):
        """Advance by ``n`` and show ``postfix`` (``key=value`` pairs; floats shortened)."""
        self.n += n
        if self._tqdm is None:
            return
        if postfix:
            self._tqdm.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()},
                                   refresh=False)
        self._tqdm.update(n)

    def close(self):
        if self._tqdm is not None:
            self._tqdm.close()
            self._tqdm = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def bar(total, desc, enabled=None, **options):
    """A :class:`Bar` of ``total`` steps labelled ``desc``; ``enabled=None`` means "on a terminal".

    ``options``: ``unit`` ("it"), ``initial`` (steps already done, e.g. on resume),
    ``stream`` (default stderr), ``unit_scale`` (True for bytes).  ``total`` may be
    None when unknown.
    """
    return Bar(total, desc, enabled, **options)
