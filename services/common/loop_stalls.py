"""The serving loop's stalls: stretches in which a service's event loop ran nothing else.

Each service relays every stream's messages on one asyncio loop, so whatever holds that loop (a large message
built, parsed or checked on it; a garbage collection) delays every stream's next frame at once. `watch()` runs
beside the server: it wakes every `TICK_S` and counts each wake that came more than `SLOW_MS` late, and at most
once a second logs how many stalls there were and the longest, so that a gap a client saw can be matched to the
service that held it.
"""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger(__name__)

TICK_S = 0.01
# Beside a step of 30-70 ms this much can make a stream's gap pass a frame (133 ms); on a machine short of cores,
# the scheduler alone delays a loop by 20-50 ms.
SLOW_MS = 50.0
REPORT_EVERY_S = 1.0


class Stalls:
    """Stalls seen since the last report: their count and the longest, in ms."""

    def __init__(self) -> None:
        self.count = 0
        self.longest_ms = 0.0
        self.reported_at = 0.0

    def add(self, late_ms: float) -> None:
        if late_ms > SLOW_MS:
            self.count += 1
            self.longest_ms = max(self.longest_ms, late_ms)

    def report(self, now: float) -> str | None:
        """The line to log at `now` (loop time, s): stalls seen since the last report, once a second at most."""
        if not self.count or now - self.reported_at < REPORT_EVERY_S:
            return None
        line = f"event loop stalled {self.count} time(s) over {SLOW_MS:.0f} ms, longest {self.longest_ms:.0f} ms"
        self.count, self.longest_ms, self.reported_at = 0, 0.0, now
        return line


async def watch() -> None:
    """Runs until cancelled, logging the loop's stalls."""
    loop = asyncio.get_running_loop()
    stalls = Stalls()
    stalls.reported_at = loop.time()
    while True:
        before = loop.time()
        await asyncio.sleep(TICK_S)
        now = loop.time()
        stalls.add((now - before - TICK_S) * 1000)
        if line := stalls.report(now):
            log.warning("%s", line)
