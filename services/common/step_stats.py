"""Where a service's per-step time goes, summed over a window and logged once per window."""

from __future__ import annotations

import logging
import time
from collections import defaultdict


class StepStats:
    def __init__(self, log: logging.Logger, what: str, window_s: float = 10.0) -> None:
        self.log = log
        self.what = what
        self.window_s = window_s
        self._sums: dict[str, float] = defaultdict(float)
        self._steps = 0
        self._rows = 0
        self._since = time.monotonic()

    def add(self, rows: int, phases_ms: dict[str, float]) -> None:
        self._steps += 1
        self._rows += rows
        for k, v in phases_ms.items():
            self._sums[k] += v
        now = time.monotonic()
        if now - self._since >= self.window_s:
            n = self._steps
            self.log.info(
                "%s: %d steps, %.1f rows/step, mean ms per step: %s",
                self.what,
                n,
                self._rows / n,
                ", ".join(f"{k} {v / n:.2f}" for k, v in self._sums.items()),
            )
            self._sums.clear()
            self._steps = self._rows = 0
            self._since = now
