"""A one-line progress bar per epoch (loss, accuracy, samples/s, ETA); silent off a terminal."""
import sys
import time


class Progress:
    def __init__(self, total, label, enabled=True, stream=None):
        self.stream = stream or sys.stderr
        self.total = max(int(total), 1)
        self.label = label
        self.enabled = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self._last = 0.0

    def update(self, done, sums, started, earlier_seconds=0.0):
        if not self.enabled:
            return
        now = time.perf_counter()
        if now - self._last < 0.2 and done < self.total:
            return
        self._last = now
        elapsed = now - started + earlier_seconds
        rate = sums["samples"] / max(elapsed, 1e-9)
        eta = (self.total - done) * elapsed / max(done, 1)
        width = 24
        filled = int(width * done / self.total)
        bar = "#" * filled + "-" * (width - filled)
        text = f"\r{self.label} [{bar}] {done}/{self.total} loss {sums['loss'] / max(sums['count'], 1):.4f}"
        if sums.get("correct"):
            text += f" acc {sums['correct'] / max(sums['count'], 1):.3f}"
        text += f" {rate:.0f}/s ETA {eta:.0f}s"
        self.stream.write(text)
        self.stream.flush()

    def close(self):
        if self.enabled:
            self.stream.write("\r" + " " * 100 + "\r")
            self.stream.flush()
