"""Python's garbage collector, kept out of the serving loop's way.

A full collection walks every object the process holds. After start-up that includes the model's modules, the
captured graphs' bookkeeping and every stream's state, so one pass can stall a step, and with it every stream's
next frame. `settle()`, called once a service is ready, moves what start-up made into the permanent generation
(`gc.freeze`), so later collections walk only what requests create, and logs every collection slower than
`SLOW_MS`, so that a stall in the step log can be told apart from one in the collector. `release()`, once the
service has stopped serving, stops the logging: a collection while the process tears down stalls nobody.
"""

from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger(__name__)

SLOW_MS = 20.0  # a sixth of a frame of audio


class _SlowCollections:
    def __init__(self) -> None:
        self.started: float | None = None

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self.started = time.perf_counter()
            return
        if self.started is None:
            return
        ms = (time.perf_counter() - self.started) * 1000
        self.started = None
        if ms > SLOW_MS:
            log.warning(
                "garbage collection of generation %d took %.0f ms (%d objects freed)",
                info["generation"],
                ms,
                info["collected"],
            )


def settle() -> None:
    gc.collect()
    gc.freeze()
    if not any(isinstance(c, _SlowCollections) for c in gc.callbacks):
        gc.callbacks.append(_SlowCollections())


def release() -> None:
    gc.callbacks[:] = [c for c in gc.callbacks if not isinstance(c, _SlowCollections)]
