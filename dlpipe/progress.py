"""A progress bar on a terminal, silence in pipes."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, label: str, *, enabled: bool) -> None:
        self.total, self.label, self.enabled = total, label, enabled
        self.done = 0
        self._t0 = time.perf_counter()
        self._last = 0.0

    def __enter__(self) -> Progress:
        return self

    def update(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if self.enabled and (now - self._last > 0.1 or self.done >= self.total):
            self._last = now
            frac = self.done / self.total if self.total else 1.0
            bar = "#" * int(frac * 30)
            rate = self.done / max(now - self._t0, 1e-9)
            sys.stderr.write(f"\r{self.label:>6} [{bar:<30}] {frac:6.1%} {self.done:,}/{self.total:,} records "
                             f"{rate:,.0f}/s")
            sys.stderr.flush()

    def __exit__(self, *exc) -> None:
        if self.enabled and self._last:
            sys.stderr.write("\n")
            sys.stderr.flush()
