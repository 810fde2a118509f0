"""Admission: a request runs only if the llm has room for it; a bounded queue holds the rest.

The gateway admits against the llm's reported room: streams it decodes together, and KV positions (its page
pool). Each request costs the positions it is expected to need (`cost`, estimated from the script); a request
runs when a stream and its positions are free, or when nothing runs (a script larger than the pool still
gets its turn; the llm swaps streams out to fit it). Beyond that, up to `queue_size` requests wait:
the next one to run comes from the API key with the fewest running streams (fair across keys), and within
that key the shortest estimated job goes first. Beyond the queue, requests are refused at once with
RESOURCE_EXHAUSTED and a RetryInfo delay estimated from how fast jobs finish.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from services.common.errors import resource_exhausted

log = logging.getLogger(__name__)

CAPACITY_REFRESH_S = 1.0


@dataclass(frozen=True)
class Room:
    """What the llm can hold at once: streams, and KV positions over all their branches."""

    streams: int
    positions: int
    stream_positions: int = 0  # what one stream's branch may hold (the llm's context); 0 until the llm answers


@dataclass(order=True)
class _Waiter:
    cost: int
    order: int
    key: str = field(compare=False)
    granted: asyncio.Future = field(compare=False)


class Admission:
    def __init__(self, room: Callable[[], Awaitable[Room]], queue_size: int, max_wait_s: float = 50.0) -> None:
        self._fetch_room = room
        self.queue_size = queue_size
        # A queued request sends nothing; Envoy ends streams idle for 60 s, so waits end before that.
        self.max_wait_s = max_wait_s
        self.room = Room(0, 0)
        self._room_at = 0.0
        self.running: Counter[str] = Counter()
        self.positions = 0  # the running requests' costs
        self.waiting: list[_Waiter] = []
        self._order = itertools.count()
        self._job_seconds = 10.0  # moving average of how long an admitted job runs

    @property
    def in_flight(self) -> int:
        return sum(self.running.values())

    async def _refresh(self) -> None:
        if time.monotonic() - self._room_at > CAPACITY_REFRESH_S:
            self.room = await self._fetch_room()
            self._room_at = time.monotonic()

    def fits(self, cost: int) -> bool:
        if self.in_flight >= self.room.streams:
            return False
        return self.in_flight == 0 or self.positions + cost <= self.room.positions

    def retry_after(self) -> float:
        """Seconds until a place is likely free: queued work ahead divided by the streams running at once."""
        ahead = len(self.waiting) + 1
        return min(60.0, max(0.5, self._job_seconds * ahead / max(self.in_flight, 1)))

    async def acquire(self, key: str, cost: int) -> float:
        """Wait for a place (raises RESOURCE_EXHAUSTED when the queue is full); returns the admission time."""
        await self._refresh()
        if not self.waiting and self.fits(cost):
            self._start(key, cost)
            return time.monotonic()
        if len(self.waiting) >= self.queue_size:
            raise resource_exhausted(
                f"the service is at capacity ({self.in_flight} streams running, {len(self.waiting)} queued)",
                self.retry_after(),
            )
        waiter = _Waiter(cost, next(self._order), key, asyncio.get_running_loop().create_future())
        self.waiting.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter.granted), self.max_wait_s)
        except TimeoutError:
            if waiter in self.waiting:
                self.waiting.remove(waiter)
                raise resource_exhausted(
                    f"no room for the stream came free within {self.max_wait_s:.0f} s", self.retry_after()
                ) from None
            return time.monotonic()  # granted at the last moment
        except BaseException:
            if waiter in self.waiting:
                self.waiting.remove(waiter)
            elif waiter.granted.done() and not waiter.granted.cancelled():
                self.release(key, cost, started=None)  # granted just as the caller gave up
            raise
        return time.monotonic()

    def _start(self, key: str, cost: int) -> None:
        self.running[key] += 1
        self.positions += cost

    def release(self, key: str, cost: int, started: float | None) -> None:
        self.running[key] -= 1
        self.positions -= cost
        if self.running[key] <= 0:
            del self.running[key]
        if started is not None:
            self._job_seconds = 0.9 * self._job_seconds + 0.1 * (time.monotonic() - started)
        self._grant()

    def _grant(self) -> None:
        while self.waiting:
            # Fair across keys first, then the shortest job.
            best = min(self.waiting, key=lambda w: (self.running[w.key], w))
            if not best.granted.done() and not self.fits(best.cost):
                return
            self.waiting.remove(best)
            if best.granted.done():
                continue
            self._start(best.key, best.cost)
            best.granted.set_result(None)

    async def refresh_loop(self) -> None:
        """Keeps the room fresh so queued requests start as soon as the llm has room."""
        while True:
            try:
                self._room_at = 0.0
                await self._refresh()
                self._grant()
            except Exception as e:  # the llm may be restarting; keep the last known value
                log.debug("capacity refresh failed: %s", e)
            await asyncio.sleep(CAPACITY_REFRESH_S)
