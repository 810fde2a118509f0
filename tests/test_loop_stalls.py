"""A service's event-loop stalls are counted and reported at most once a second, with the longest."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

from services.common import loop_stalls
from services.common.loop_stalls import REPORT_EVERY_S, SLOW_MS, Stalls


def test_only_wakes_later_than_the_threshold_count_and_a_report_waits_a_second():
    stalls = Stalls()
    stalls.add(SLOW_MS / 2)
    assert stalls.report(10.0) is None  # a late wake under the threshold is no stall
    stalls.add(SLOW_MS + 5)
    stalls.add(SLOW_MS + 40)
    line = stalls.report(10.0)
    assert line is not None and "2 time(s)" in line and f"longest {SLOW_MS + 40:.0f} ms" in line
    stalls.add(SLOW_MS + 10)
    assert stalls.report(10.0 + REPORT_EVERY_S / 2) is None  # within a second of the last report
    later = stalls.report(10.0 + REPORT_EVERY_S)
    assert later is not None and "1 time(s)" in later and f"longest {SLOW_MS + 10:.0f} ms" in later


def reports_while(hold, caplog) -> list[str]:
    """The stall reports of a loop on which `hold()` runs once, a report's second later."""

    async def main():
        watcher = asyncio.create_task(loop_stalls.watch())
        await asyncio.sleep(0.05)
        hold()
        await asyncio.sleep(REPORT_EVERY_S + 0.2)
        watcher.cancel()

    with caplog.at_level(logging.WARNING, logger=loop_stalls.__name__):
        asyncio.run(main())
    return [r.getMessage() for r in caplog.records if r.name == loop_stalls.__name__]


def test_a_callback_that_holds_the_loop_is_reported(caplog):
    reports = reports_while(lambda: time.sleep(0.12), caplog)  # as a large message built on the loop would
    assert len(reports) == 1, reports
    longest = int(reports[0].rsplit("longest ", 1)[1].split(" ms")[0])
    assert 100 <= longest < 1000


def test_the_report_names_where_the_loop_was_held_and_which_threads_ran_python(caplog):
    spinning = threading.Event()

    def spin_in_python():  # another thread holding the GIL in Python code, as a voice decode would
        spinning.set()
        end = time.monotonic() + 0.3
        n = 0
        while time.monotonic() < end:
            n += 1

    def hold_the_loop():
        threading.Thread(target=spin_in_python, name="spinner").start()
        spinning.wait()
        time.sleep(0.15)

    reports = reports_while(hold_the_loop, caplog)
    assert len(reports) == 1, reports
    held, _, busy = reports[0].partition("; other threads running Python: ")
    assert "the loop was in test_loop_stalls.py:" in held and "hold_the_loop" in held, reports[0]
    assert "spin_in_python" not in held
    assert "spinner: test_loop_stalls.py:" in busy and "spin_in_python" in busy, reports[0]
