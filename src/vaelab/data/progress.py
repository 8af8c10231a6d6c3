"""Progress of a long data step: a tqdm bar on a terminal, else a line every 10 %.

Nothing is shown for steps that finish within ``delay`` seconds, so small folders and
tests stay quiet. Everything goes to standard error.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["Progress"]


class Progress:
    """Counts ``total`` units of work done in :meth:`update` calls.

    Args:
        total: units of work (e.g. images).
        description: what is being done, e.g. ``"reading /data/cats"``.
        enabled: False shows nothing.
        unit: name of one unit, for the bar and the lines.
        delay: seconds before anything is shown.
        stream: where to write (default ``sys.stderr``); a terminal gets a bar.
    """

    def __init__(self, total: int, description: str, enabled: bool = True, unit: str = "image",
                 delay: float = 1.0, stream: TextIO | None = None) -> None:
        self.total = max(int(total), 0)
        self.description = description
        self.unit = unit
        self.delay = delay
        self.stream = stream if stream is not None else sys.stderr
        self.done = 0
        self.start = time.perf_counter()
        self._next_line = 0.1
        self._bar = None
        self._enabled = enabled and self.total > 0
        self._lines = self._enabled and not _isatty(self.stream)
        if self._enabled and not self._lines:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc=description, unit=unit, delay=delay,
                             file=self.stream, leave=False, dynamic_ncols=True)

    @property
    def enabled(self) -> bool:
        """Whether anything is shown."""
        return self._enabled

    def update(self, count: int) -> None:
        self.done += count
        if self._bar is not None:
            self._bar.update(count)
        elif self._lines:
            fraction = self.done / self.total
            elapsed = time.perf_counter() - self.start
            if fraction >= self._next_line and elapsed >= self.delay and self.done < self.total:
                left = elapsed * (1 - fraction) / fraction
                print(f"vaelab: {self.description}: {self.done:,}/{self.total:,} {self.unit}s "
                      f"({100 * fraction:.0f}%), {elapsed:.0f} s, about {left:.0f} s left",
                      file=self.stream, flush=True)
            while self._next_line <= fraction:
                self._next_line += 0.1

    def close(self) -> float:
        """Stop showing progress; return the seconds since the start."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        return time.perf_counter() - self.start

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
