"""The serving loop's stalls: stretches in which a service's event loop ran nothing else.

Each service relays every stream's messages on one asyncio loop, so whatever holds that loop (a large message
built, parsed or checked on it; a device synchronisation; a garbage collection; other threads holding the GIL)
delays every stream's next frame at once. `watch()` runs beside the server: it wakes every `TICK_S` and counts each
wake that came more than `SLOW_MS` late, and at most once a second logs how many stalls there were and the longest,
so that a gap a client saw can be matched to the service that held it.

While the loop is late, a sampling thread looks at every thread's stack every `SAMPLE_S`, and the report names
where the loop was and which other threads were running Python code: the cause, not only the symptom.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import sys
import threading
import time
from types import FrameType

log = logging.getLogger(__name__)

TICK_S = 0.01
# Beside a step of 30-70 ms this much can make a stream's gap pass a frame (133 ms); on a machine short of cores,
# the scheduler alone delays a loop by 20-50 ms.
SLOW_MS = 50.0
REPORT_EVERY_S = 1.0
SAMPLE_S = 0.005
PLACES_REPORTED = 3
# A thread whose innermost frame is one of these is waiting, or in C code its `run` called (grpc's poller).
IDLE_FUNCTIONS = frozenset(
    {"wait", "select", "poll", "get", "_poll_wrapper", "channel_spin", "_worker", "sleep", "run"}
)


class Stalls:
    """Stalls seen since the last report: their count, the longest (ms), and where the samples found each thread."""

    def __init__(self) -> None:
        self.count = 0
        self.longest_ms = 0.0
        self.reported_at = 0.0
        self.loop_places: collections.Counter[str] = collections.Counter()
        self.busy_threads: collections.Counter[str] = collections.Counter()
        self.lock = threading.Lock()  # the sampling thread adds while the loop reports

    def add(self, late_ms: float) -> None:
        if late_ms > SLOW_MS:
            self.count += 1
            self.longest_ms = max(self.longest_ms, late_ms)

    def sampled(self, loop_place: str | None, busy: list[str]) -> None:
        with self.lock:
            if loop_place:
                self.loop_places[loop_place] += 1
            self.busy_threads.update(busy)

    def report(self, now: float) -> str | None:
        """The line to log at `now` (loop time, s): stalls seen since the last report, once a second at most."""
        if not self.count or now - self.reported_at < REPORT_EVERY_S:
            return None
        line = f"event loop stalled {self.count} time(s) over {SLOW_MS:.0f} ms, longest {self.longest_ms:.0f} ms"
        with self.lock:
            if self.loop_places:
                line += "; the loop was in " + _most_common(self.loop_places)
            if self.busy_threads:
                line += "; other threads running Python: " + _most_common(self.busy_threads)
            self.loop_places.clear()
            self.busy_threads.clear()
        self.count, self.longest_ms, self.reported_at = 0, 0.0, now
        return line


def _most_common(places: collections.Counter[str]) -> str:
    return ", ".join(f"{place} ({n} samples)" for place, n in places.most_common(PLACES_REPORTED))


def place(frame: FrameType) -> str:
    """Where a thread is: its innermost frame, and the innermost one of this project's code if that is another."""
    inner = f"{frame.f_code.co_filename.rsplit('/', 1)[-1]}:{frame.f_lineno} {frame.f_code.co_name}"
    f: FrameType | None = frame
    while f is not None and "/services/" not in f.f_code.co_filename:
        f = f.f_back
    if f is None or f is frame:
        return inner
    ours = f.f_code.co_filename.rsplit("/services/", 1)[-1]
    return f"{inner} < services/{ours}:{f.f_lineno} {f.f_code.co_name}"


class Sampler(threading.Thread):
    """Samples every thread's stack while the loop's last wake (`beat`, monotonic s) is more than SLOW_MS old."""

    def __init__(self, stalls: Stalls, loop_thread: int) -> None:
        super().__init__(name="loop-stall-sampler", daemon=True)
        self.stalls = stalls
        self.loop_thread = loop_thread
        self.beat = time.monotonic()
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(SAMPLE_S):
            if (time.monotonic() - self.beat) * 1000 > SLOW_MS:
                self.sample()

    def sample(self) -> None:
        names = {t.ident: t.name for t in threading.enumerate()}
        loop_place, busy = None, []
        for ident, frame in sys._current_frames().items():
            if ident == self.loop_thread:
                loop_place = place(frame)
            elif ident != self.ident and frame.f_code.co_name not in IDLE_FUNCTIONS:
                busy.append(f"{names.get(ident, ident)}: {place(frame)}")
        self.stalls.sampled(loop_place, busy)


async def watch() -> None:
    """Runs until cancelled, logging the loop's stalls and where they were spent."""
    loop = asyncio.get_running_loop()
    stalls = Stalls()
    stalls.reported_at = loop.time()
    sampler = Sampler(stalls, threading.get_ident())
    sampler.start()
    try:
        while True:
            before = loop.time()
            sampler.beat = time.monotonic()
            await asyncio.sleep(TICK_S)
            now = loop.time()
            stalls.add((now - before - TICK_S) * 1000)
            if line := stalls.report(now):
                log.warning("%s", line)
    finally:
        sampler.stopped.set()
