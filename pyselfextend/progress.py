"""A progress line on stderr for long prompt evaluation: tokens done, tokens/s and ETA."""
from __future__ import annotations

import sys
import time
from typing import Optional, TextIO


def log_line(msg: str) -> None:
    """One line of a long job's log on stderr, at once (the long commands' ``log`` callbacks)."""
    print(msg, file=sys.stderr, flush=True)


def _fmt_seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class ProgressBar:
    """Callable as a ``progress(done, total)`` callback. Redraws in place on a terminal and
    prints a line every few seconds otherwise (logs stay readable)."""

    def __init__(self, label: str = "prompt", stream: Optional[TextIO] = None, min_total: int = 1024,
                 log_every: float = 10.0) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.min_total = min_total  # short prompts finish too fast to need a bar
        self.log_every = log_every
        self.start = time.monotonic()
        self.last_log = 0.0
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()

    def __call__(self, done: int, total: int) -> bool:
        if total < self.min_total:
            return True
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = done / elapsed
        eta = (total - done) / rate if rate > 0 else 0.0
        width = 30
        filled = int(width * done / total)
        line = (f"{self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} tokens "
                f"{rate:6.1f} t/s  {'ETA ' + _fmt_seconds(eta) if done < total else 'in ' + _fmt_seconds(elapsed)}")
        if self.tty:
            self.stream.write("\r" + line + ("\n" if done >= total else ""))
            self.stream.flush()
        elif done >= total or elapsed - self.last_log >= self.log_every:
            self.last_log = elapsed
            self.stream.write(line + "\n")
            self.stream.flush()
        return True
