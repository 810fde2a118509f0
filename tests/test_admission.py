"""The gateway's admission queue: bounded, fair across API keys, shortest job first, and time-limited."""

from __future__ import annotations

import asyncio

import pytest

from services.common.errors import RequestError
from services.gateway.admission import Admission, Room


def run(coro):
    return asyncio.run(coro)


async def slots(n: int, positions: int = 10**9) -> Room:
    return Room(n, positions)


def test_queue_is_bounded_and_rejection_carries_a_delay():
    async def main():
        adm = Admission(lambda: slots(1), queue_size=1)
        await adm.acquire("a", 10)  # runs
        waiting = asyncio.create_task(adm.acquire("a", 10))  # queued
        await asyncio.sleep(0)
        with pytest.raises(RequestError) as err:
            await adm.acquire("a", 10)
        waiting.cancel()
        return err.value.status

    status = run(main())
    assert status.code == 8  # RESOURCE_EXHAUSTED
    assert status.details and status.details[0].type_url.endswith("google.rpc.RetryInfo")


def test_next_slot_goes_to_the_quietest_key_then_the_shortest_job():
    async def main():
        adm = Admission(lambda: slots(2), queue_size=10)
        started = [await adm.acquire("busy", 100), await adm.acquire("busy", 100)]
        order = []

        async def wait(key, cost):
            await adm.acquire(key, cost)
            order.append((key, cost))

        tasks = [asyncio.create_task(wait(k, c)) for k, c in [("busy", 5), ("calm", 300), ("calm", 50)]]
        await asyncio.sleep(0)
        adm.release("busy", 100, started[0])  # "calm" has nothing running: its shortest job goes first
        await asyncio.sleep(0)
        adm.release("busy", 100, started[1])  # now each key runs one: the shortest job overall
        await asyncio.sleep(0)
        for t in tasks:
            t.cancel()
        return order

    assert run(main()) == [("calm", 50), ("busy", 5)]


def test_a_queued_request_gives_up_before_envoys_idle_timeout():
    async def main():
        adm = Admission(lambda: slots(1), queue_size=4, max_wait_s=0.05)
        await adm.acquire("a", 1)
        with pytest.raises(RequestError) as err:
            await adm.acquire("b", 1)
        return err.value.status, adm.waiting

    status, waiting = run(main())
    assert status.code == 8 and "within" in status.message
    assert waiting == []


def test_requests_wait_for_kv_positions_as_well_as_for_streams():
    """Room for many streams but positions for two jobs of 400: the third waits until one ends, and a job larger
    than the whole pool still runs when nothing else does."""

    async def main():
        adm = Admission(lambda: slots(8, positions=1000), queue_size=4)
        first = await adm.acquire("a", 400)
        await adm.acquire("b", 400)
        third = asyncio.create_task(adm.acquire("c", 400))
        await asyncio.sleep(0)
        waited = not third.done()
        adm.release("a", 400, first)
        await asyncio.wait_for(third, 1.0)
        return waited, adm.positions

    assert run(main()) == (True, 800)

    async def alone():
        adm = Admission(lambda: slots(8, positions=1000), queue_size=4)
        await adm.acquire("a", 5000)
        return adm.positions

    assert run(alone()) == 5000


def test_a_script_beyond_the_context_costs_at_most_what_one_segment_holds():
    """Such a script runs one segment after another: admission must not wait for a pool that holds all of it."""
    from vibevoice.tts.v1 import tts_pb2

    from services.common.stream_size import SEGMENT_FRAMES
    from services.synthesis.estimates import estimated_positions

    long = tts_pb2.SynthesizeRequest(text="Speaker 1: " + "word " * 30_000)
    assert estimated_positions(long) > 3 * 8192
    assert estimated_positions(long, max_positions=8192) == 2 * 8192 + SEGMENT_FRAMES
    short = tts_pb2.SynthesizeRequest(text="Speaker 1: Hello there.")
    assert estimated_positions(short, max_positions=8192) == estimated_positions(short)
