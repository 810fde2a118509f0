"""A stream whose consumer falls behind is held out of the steps, keeping its state, until the consumer catches up:
what waits unread stays bounded, the other streams go on, and the held stream's audio is what it would have been.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest
import torch
from vibevoice.mesh.v1 import mesh_pb2, mesh_pb2_grpc

from services.acoustic.engine import AcousticEngine
from services.acoustic.server import Acoustic
from services.common import stream_size
from services.common.checkpoint import resolve_checkpoint
from services.llm.engine import LMEngine, LMStream
from services.llm.scheduler import Failed, Finished, Frame, Job, Scheduler
from services.render.audio_out import AudioRouter
from services.render.local import LocalLink
from services.render.values import StreamSpec
from services.render.wire import WireLink

FRAMES = 24
LEAD, RESUME = 6, 3


@pytest.fixture(scope="module")
def ckpt(tiny_checkpoint):
    return resolve_checkpoint(str(tiny_checkpoint))


def prompt(ckpt, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, 50000, (40,), generator=g).tolist() + [ckpt.config.audio_bos_token_id]


def submit(scheduler: Scheduler, ckpt, seed: int, key: str = "", frames: int = FRAMES) -> Job:
    stream = LMStream(prompt_ids=prompt(ckpt, seed), voice_embeddings=None, fixed_frames=frames, max_frames=10_000)
    spec = StreamSpec(scheduler.new_stream_id(), seed, 1.3, 10, audio_key=key)
    job = Job(stream, spec)
    scheduler.submit(job)
    return job


async def frames_of(job: Job) -> list[Frame]:
    """The job's frames, read as fast as they come, until it finishes."""
    frames = []
    while True:
        event = await job.events.get()
        if isinstance(event, Frame):
            frames.append(event)
        elif isinstance(event, Finished):
            return frames
        elif isinstance(event, Failed):
            raise AssertionError(event.message)


def audio(frames: list[Frame]) -> np.ndarray:
    return np.concatenate([f.audio.numpy() for f in frames])


def engines(ckpt) -> tuple[LMEngine, AcousticEngine]:
    return LMEngine(ckpt, "cpu", max_streams=4), AcousticEngine(ckpt, "cpu", max_streams=4)


def alone(ckpt, seed: int) -> np.ndarray:
    async def main():
        lm, acoustic = engines(ckpt)
        scheduler = Scheduler(lm, LocalLink(acoustic))
        return audio(await frames_of(submit(scheduler, ckpt, seed)))

    return asyncio.run(main())


async def until(condition, timeout_s: float = 120.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_a_stream_whose_events_go_unread_is_held_and_resumes_with_the_same_audio(ckpt):
    async def main():
        lm, acoustic = engines(ckpt)
        scheduler = Scheduler(lm, LocalLink(acoustic), lead=(LEAD, RESUME))
        slow, fast = submit(scheduler, ckpt, 1), submit(scheduler, ckpt, 2)
        fast_frames = await frames_of(fast)  # the other stream runs to its end meanwhile
        assert len(fast_frames) == FRAMES
        await until(lambda: slow.stream.held)
        unread = slow.events.qsize()
        assert LEAD < unread <= LEAD + 2  # its prompt's event and the frames made up to the limit, no more
        await asyncio.sleep(0.3)
        assert slow.events.qsize() == unread  # held: nothing more is made while nobody reads
        slow_frames = await frames_of(slow)
        assert [f.index for f in slow_frames] == list(range(FRAMES))
        await until(lambda: not lm.streams)
        return audio(slow_frames)

    held = asyncio.run(main())
    expected = alone(ckpt, 1)
    assert np.abs(held - expected).max() <= 1e-5 * np.abs(expected).max()


def test_a_keyed_stream_whose_subscriber_falls_behind_is_held_until_it_reads(ckpt):
    """The audio goes to a StreamAudio mailbox; the acoustic side reports the subscriber behind, and the llm
    holds the stream although its own events are read."""

    async def main():
        lm, acoustic = engines(ckpt)
        router = AudioRouter(lead=(LEAD, RESUME))
        scheduler = Scheduler(lm, LocalLink(acoustic, router))
        slow = submit(scheduler, ckpt, 1, key="slow")
        subscriber = router.subscribe("slow")
        first = await anext(subscriber)  # subscribed, then reads nothing for a while
        llm_frames = await asyncio.create_task(asyncio.wait_for(_frames_while_held(slow), 120))
        box = router.boxes["slow"]
        # The report goes with a step's answer, before that step's frame is delivered: one frame past the limit.
        assert slow.stream.held and LEAD < len(box.frames) <= LEAD + 2
        rest = [f async for f in subscriber]
        llm_frames += await frames_of(slow)
        assert [f.index for f in [first, *rest]] == list(range(FRAMES)) == [f.index for f in llm_frames]
        await until(lambda: not lm.streams)
        return np.concatenate([f.audio for f in [first, *rest]])

    held = asyncio.run(main())
    expected = alone(ckpt, 1)
    assert np.abs(held - expected).max() <= 1e-5 * np.abs(expected).max()


async def _frames_while_held(job: Job) -> list[Frame]:
    """The llm's events for a keyed stream (read as they come) until the stream is held."""
    frames = []
    while not job.stream.held:
        try:
            event = await asyncio.wait_for(job.events.get(), 0.05)
        except TimeoutError:
            continue
        if isinstance(event, Frame):
            frames.append(event)
    return frames


def test_a_stream_held_past_the_limit_ends_and_frees_its_row(ckpt):
    async def main():
        lm, acoustic = engines(ckpt)
        scheduler = Scheduler(lm, LocalLink(acoustic), lead=(LEAD, RESUME))
        scheduler.held_limit_s = 0.3
        never_read = submit(scheduler, ckpt, 1)
        await until(lambda: never_read.stream.held)
        await until(lambda: not lm.streams)
        events = [never_read.events.get_nowait() for _ in range(never_read.events.qsize())]
        assert isinstance(events[-1], Failed) and "read nothing" in events[-1].message
        assert sum(isinstance(e, Frame) for e in events) <= LEAD + 1
        assert lm.blocks.available == lm.blocks.usable  # its pages went back to the pool

    asyncio.run(main())


WIRE_LEAD, WIRE_RESUME = 40, 20


@contextlib.asynccontextmanager
async def acoustic_server(ckpt, lead: tuple[int, int]) -> AsyncIterator[str]:
    """The acoustic servicer on a gRPC port of its own: its report comes back over the wire, as between two GPUs."""
    server = grpc.aio.server()
    servicer = Acoustic(AcousticEngine(ckpt, "cpu", max_streams=4), AudioRouter(lead=lead))
    mesh_pb2_grpc.add_AcousticServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(grace=None)


def test_over_the_wire_a_stream_audio_subscriber_that_stops_reading_gets_its_stream_held(ckpt):
    """In pipelined steps beside a stream read as it comes: the llm stops the slow stream although it reads its
    own events, the other goes on, and the subscriber then gets every frame, in order."""
    # With its window grown by bandwidth probes, gRPC itself holds about 490 frames a subscriber has not read; this
    # subscriber keeps HTTP/2's initial window (a few frames), so the mailbox reaches the lead after a few more.
    frames = WIRE_LEAD + 150

    async def main():
        async with acoustic_server(ckpt, (WIRE_LEAD, WIRE_RESUME)) as address:
            lm = LMEngine(ckpt, "cpu", max_streams=4)
            link = WireLink(address)
            scheduler = Scheduler(lm, link, pipelined=True)
            stream = LMStream(prompt_ids=prompt(ckpt, 1), voice_embeddings=None, fixed_frames=frames, max_frames=10_000)
            job = Job(stream, StreamSpec(scheduler.new_stream_id(), 1, 1.3, 10, audio_key="wire-slow"))
            async with grpc.aio.insecure_channel(address, options=[("grpc.http2.bdp_probe", 0)]) as channel:
                call = mesh_pb2_grpc.AcousticStub(channel).StreamAudio(
                    mesh_pb2.StreamAudioRequest(audio_key="wire-slow"), timeout=300
                )
                scheduler.submit(job)
                fast = asyncio.create_task(frames_of(submit(scheduler, ckpt, 2, frames=frames)))
                first = await call.read()
                made = await asyncio.wait_for(_frames_while_held(job), 240)
                assert WIRE_LEAD < len(made) < frames, len(made)  # held past the lead, before its end
                assert len(await fast) == frames  # the other stream, decoding beside it when it was held, went on
                rest = []
                while (part := await call.read()) is not grpc.aio.EOF:
                    rest.append(part.index)
                made += await frames_of(job)
            await until(lambda: not lm.streams)
            await link.close()
            assert scheduler.runner.pipelined_halves > 0
            return [first.index, *rest], [f.index for f in made]

    heard, made = asyncio.run(main())
    assert heard == list(range(frames)) == made


def test_when_the_pool_runs_short_a_held_stream_is_swapped_out_before_a_decoding_one(ckpt, monkeypatch):
    """Pages of 4 positions, reservations of one frame and a pool too small for both streams' growth: the held
    stream goes to host memory, the stream being read never does, and the held one, read at last, comes back
    with its audio unchanged."""
    monkeypatch.setattr(LMEngine, "expected_frames", lambda self, stream: 1)  # each stream outgrows its pages
    monkeypatch.setattr(stream_size, "TURN_TOKENS", 0)
    swapped = []

    async def main():
        lm = LMEngine(ckpt, "cpu", max_streams=4, page_size=4, kv_pages=1 + 2 * 13 + 16)
        swap_out = lm._swap_out
        monkeypatch.setattr(lm, "_swap_out", lambda stream: swapped.append(stream) or swap_out(stream))
        scheduler = Scheduler(lm, LocalLink(AcousticEngine(ckpt, "cpu", max_streams=4)), lead=(LEAD, RESUME))
        slow, fast = submit(scheduler, ckpt, 1, frames=40), submit(scheduler, ckpt, 2, frames=40)
        assert len(await frames_of(fast)) == 40
        assert swapped and all(s is slow.stream for s in swapped)
        assert slow.stream.held and slow.stream.swapped is not None
        slow_audio = audio(await frames_of(slow))
        await until(lambda: not lm.streams)
        assert lm.blocks.available == lm.blocks.usable
        return slow_audio

    held = asyncio.run(main())
    monkeypatch.undo()

    async def uninterrupted():
        lm, acoustic = engines(ckpt)
        return audio(await frames_of(submit(Scheduler(lm, LocalLink(acoustic)), ckpt, 1, frames=40)))

    expected = asyncio.run(uninterrupted())
    assert np.abs(held - expected).max() <= 1e-5 * np.abs(expected).max()
