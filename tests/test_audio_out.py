"""The acoustic side's per-key mailboxes (services/render/audio_out.py), without a mesh."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import threading

import pytest
import torch
from google.rpc import code_pb2

from services.acoustic.server import Acoustic
from services.common.errors import RequestError
from services.render.audio_out import AudioRouter
from services.render.local import LocalLink
from services.render.values import RenderResult, RenderStep, StreamHistory, StreamSpec


def spec(stream_id: int, key: str = "", history: StreamHistory | None = None) -> StreamSpec:
    return StreamSpec(stream_id, seed=1, cfg_scale=1.3, diffusion_steps=2, history=history, audio_key=key)


def result(ids: list[int], step: int) -> RenderResult:
    """Rows whose values say which stream and step made them."""
    n = len(ids)
    base = torch.tensor([[s * 1000.0 + step] for s in ids]).reshape(n, 1)
    return RenderResult(torch.zeros(n, 4), base.expand(n, 6), base.expand(n, 2) + 0.5, base.expand(n, 3) + 0.25)


def render(router: AudioRouter, step: int, ids: list[int], starts=(), ends=()) -> None:
    rs = RenderStep(step, list(starts), ids, ends=list(ends))
    router.deliver(router.gather(rs, result(ids, step)).to_host())


async def collect(router: AudioRouter, key: str) -> list:
    return [f async for f in router.subscribe(key)]


async def waiting(router: AudioRouter, key: str) -> asyncio.Task:
    """A subscriber that has subscribed and waits for frames."""
    task = asyncio.create_task(collect(router, key))
    await asyncio.sleep(0.01)
    assert router.boxes[key].subscribed
    return task


def on_loop(test):
    """Runs an async test on a fresh event loop."""

    @functools.wraps(test)
    def run(*args, **kwargs):
        asyncio.run(test(*args, **kwargs))

    return run


@on_loop
async def test_subscribe_before_and_after_start_and_unkeyed_streams_ignored():
    router = AudioRouter()
    early = await waiting(router, "early")
    render(router, 0, [1, 2], starts=[spec(1, "early"), spec(2)])  # stream 2 has no key
    render(router, 1, [1, 2, 3], starts=[spec(3, "late")])
    render(router, 2, [2, 3], ends=[1])
    render(router, 3, [3], ends=[3])
    frames = await early
    assert [f.index for f in frames] == [0, 1]
    assert [f.audio[0].item() for f in frames] == [1000.0, 1001.0]
    assert frames[1].latent.tolist() == [1001.5] * 2 and frames[1].semantic.tolist() == [1001.25] * 3
    late = await collect(router, "late")  # after its stream ended: its frames waited
    assert [(f.index, f.audio[0].item()) for f in late] == [(0, 3001.0), (1, 3002.0), (2, 3003.0)]
    assert router.boxes == {} and router.keys == {} and router.counts == {}


@on_loop
async def test_resumed_stream_counts_on_and_mixed_steps_mark_rows():
    router = AudioRouter()
    history = StreamHistory(frames_made=7, replay_latents=torch.zeros(2, 2))
    step = RenderStep(0, [spec(4, "k", history), spec(5)], [5, 4], ends=[4])
    routed = router.gather(step, result([5, 4], 0)).to_host()
    assert [s for s, _ in routed.frames] == [4]  # only the keyed row is copied out
    router.deliver(routed)
    assert [(f.index, f.audio[0].item()) for f in await collect(router, "k")] == [(7, 4000.0)]


@on_loop
async def test_subscriber_leaving_removes_the_mailbox_and_later_frames_are_dropped():
    router = AudioRouter()
    render(router, 0, [1], starts=[spec(1, "gone")])
    frames = router.subscribe("gone")
    assert (await anext(frames)).index == 0
    await frames.aclose()  # the consumer cancelled
    assert "gone" not in router.boxes
    render(router, 1, [1], ends=[1])
    assert router.boxes == {} and router.keys == {}


@on_loop
async def test_cancelled_waiting_subscriber_leaves_nothing():
    router = AudioRouter()
    task = await waiting(router, "never")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert router.boxes == {}


@on_loop
async def test_a_subscriber_waits_past_the_ttl_for_a_stream_the_llm_keeps_queued():
    """The consumer subscribes when it calls Generate; the stream starts when the llm admits it, which under load
    may be long after. Only the call's own deadline ends that wait, not the TTL of unread mailboxes."""
    router = AudioRouter(ttl_s=0.05)
    queued = await waiting(router, "queued")
    await asyncio.sleep(0.15)
    render(router, 0, [1], starts=[spec(1, "queued")])
    render(router, 1, [1], ends=[1])
    assert [f.index for f in await queued] == [0, 1]
    assert router.boxes == {}


@on_loop
async def test_ttl_unsubscribed_mailbox_dropped_and_unknown_key_not_found():
    router = AudioRouter(ttl_s=0.05)
    render(router, 0, [1], starts=[spec(1, "orphan")])
    await asyncio.sleep(0.1)
    render(router, 1, [1])  # a delivery sweeps the stale mailbox; the frame has nowhere to go
    assert router.boxes == {}
    with pytest.raises(RequestError) as e:
        await collect(router, "orphan")  # its stream started too long ago: as good as unknown
    assert e.value.status.code == code_pb2.NOT_FOUND and "audio_key" in e.value.status.message
    assert router.boxes == {}
    render(router, 2, [], ends=[1])
    assert router.keys == {} and router.counts == {}


@on_loop
async def test_unread_cap_and_lost_stream():
    router = AudioRouter(cap=3)
    render(router, 0, [1, 2], starts=[spec(1, "slow"), spec(2, "lost")])
    for step in range(1, 4):
        render(router, step, [1])
    assert len(router.boxes["slow"].frames) == 0  # over the cap: dropped, not kept growing
    with pytest.raises(RequestError) as e:
        await collect(router, "slow")
    assert e.value.status.code == code_pb2.RESOURCE_EXHAUSTED
    lost = router.subscribe("lost")
    assert (await anext(lost)).index == 0
    router.end(2, RequestError(e.value.status))  # e.g. the llm's render stream closed
    with pytest.raises(RequestError):
        await anext(lost)
    assert router.boxes == {}


@pytest.mark.parametrize("key", ["", "x" * 65, "bad key", "é"])
@on_loop
async def test_bad_key_is_invalid_argument(key):
    router = AudioRouter()
    with pytest.raises(RequestError) as e:
        await collect(router, key)
    assert e.value.status.code == code_pb2.INVALID_ARGUMENT and e.value.status.message.startswith("audio_key")


@on_loop
async def test_second_subscriber_refused():
    router = AudioRouter()
    first = await waiting(router, "one")
    with pytest.raises(RequestError) as e:
        await collect(router, "one")
    assert e.value.status.code == code_pb2.INVALID_ARGUMENT
    render(router, 0, [1], starts=[spec(1, "one")], ends=[1])
    assert len(await first) == 1


class RowsEngine:
    """A render engine whose results say which stream and step made each row (as `result` does)."""

    def step(self, step: RenderStep) -> RenderResult:
        return result(step.ids, step.step)


@on_loop
async def test_the_llm_gets_only_embeddings_when_every_frame_went_to_its_consumer():
    router = AudioRouter()
    link = LocalLink(RowsEngine(), router)
    keyed = await link.step(RenderStep(0, [spec(1, "a"), spec(2, "b")], [1, 2]))
    assert keyed.embeddings.shape[0] == 2 and keyed.audio is None and keyed.latents is None
    mixed = await link.step(RenderStep(1, [spec(3)], [1, 2, 3]))  # stream 3 has no key: its audio goes to the llm
    assert mixed.audio[:, 0].tolist() == [1001.0, 2001.0, 3001.0]
    await link.routed()
    assert [f.index for f in router.boxes["a"].frames] == [0, 1]


class GatedEngine(RowsEngine):
    """Rows whose copy to the host waits until the test opens `gate`: a render still running on the GPU."""

    def __init__(self) -> None:
        self.gate = threading.Event()

    def step(self, step: RenderStep) -> RenderResult:
        rendered = super().step(step)
        gate = self.gate

        class Pending(torch.Tensor):
            def cpu(self, *args, **kwargs):
                assert gate.wait(5), "the test never let the render finish"
                return super().cpu(*args, **kwargs)

        # The router copies one tensor of the keyed rows to the host; make that copy wait for the gate.
        return RenderResult(
            *(t.as_subclass(Pending) if t is not None else None for t in dataclasses.astuple(rendered)[:4])
        )


@on_loop
async def test_a_step_answers_before_its_frames_reach_the_host_and_mailboxes_keep_render_order():
    """The llm gets a step's embeddings while its frames still wait for the GPU; the next step delivers them first,
    so a subscriber sees every frame once, in order, and the stream's end after them."""
    engine = GatedEngine()
    router = AudioRouter()
    link = LocalLink(engine, router)
    first = await asyncio.wait_for(link.step(RenderStep(0, [spec(1, "a")], [1])), 1)
    assert first.embeddings.shape[0] == 1 and first.audio is None
    second = asyncio.create_task(link.step(RenderStep(1, [], [1])))
    await asyncio.sleep(0.05)
    assert "a" not in router.keys.values()  # neither its start nor its frame has been delivered...
    assert not second.done()  # ...and the next step waits for them
    engine.gate.set()
    assert (await asyncio.wait_for(second, 1)).audio is None
    await link.step(RenderStep(2, [], [1], ends=[1]))
    await link.close()
    frames = await collect(router, "a")
    assert [(f.index, f.audio[0]) for f in frames] == [(0, 1000.0), (1, 1001.0), (2, 1002.0)]


class _Context:
    def peer(self) -> str:
        return "test"


class _ServedEngine(RowsEngine):
    """What the acoustic servicer's Render reads of its engine, beside `step`."""

    def __init__(self) -> None:
        self.ended: list[int] = []

    def end(self, stream_id: int) -> None:
        self.ended.append(stream_id)


@on_loop
async def test_the_acoustic_service_delivers_an_answered_step_even_if_the_llm_leaves_at_once():
    """The service answers a step before its frames reach the host. An llm that goes away right after its last
    answer (a drained llm exits) must not lose that step's frames or the end of its streams."""
    router = AudioRouter()
    servicer = Acoustic(_ServedEngine(), router)
    step = RenderStep(0, [spec(1, "last")], [1], torch.zeros(1, 4), torch.zeros(1, 4), ends=[1])

    async def requests():
        yield step.to_proto()
        await asyncio.Event().wait()  # the stream stays open until the llm goes

    render = servicer.Render(requests(), _Context())
    response = await anext(render)
    assert list(response.stream_ids) == [1] and response.frames_routed
    subscriber = asyncio.create_task(collect(router, "last"))
    await render.aclose()  # the llm's call is gone while the service still holds the answered step
    frames = await asyncio.wait_for(subscriber, 1)
    assert [f.index for f in frames] == [0]  # the frame, then a clean end
