"""Where a service's per-step time goes: a summary per window, and a warning for every step slower than
one frame of audio (a playing stream waited longer than the audio it already has)."""

from __future__ import annotations

import logging
import time
from collections import defaultdict

from services.common.audio import FRAME_MS


class StepStats:
    def __init__(self, log: logging.Logger, what: str, window_s: float = 10.0, slow_ms: float = FRAME_MS) -> None:
        self.log = log
        self.what = what
        self.window_s = window_s
        self.slow_ms = slow_ms
        self._sums: dict[str, float] = defaultdict(float)
        self._steps = 0
        self._rows = 0
        self._since = time.monotonic()

    def add(self, rows: int, phases_ms: dict[str, float], elapsed_ms: float | None = None, context: str = "") -> None:
        """One step of `rows` streams; `elapsed_ms` defaults to the sum of its phases."""
        elapsed_ms = sum(phases_ms.values()) if elapsed_ms is None else elapsed_ms
        parts = ", ".join(f"{k} {v:.0f} ms" for k, v in phases_ms.items())
        if elapsed_ms > self.slow_ms:
            self.log.warning("slow %s: %.0f ms with %d streams%s; %s", self.what, elapsed_ms, rows, context, parts)
        self._steps += 1
        self._rows += rows
        for k, v in phases_ms.items():
            self._sums[k] += v
        now = time.monotonic()
        if now - self._since >= self.window_s:
            n = self._steps
            self.log.info(
                "%s times: %d steps, %.1f streams/step, mean ms per step: %s",
                self.what,
                n,
                self._rows / n,
                ", ".join(f"{k} {v / n:.2f}" for k, v in self._sums.items()),
            )
            self._sums.clear()
            self._steps = self._rows = 0
            self._since = now
