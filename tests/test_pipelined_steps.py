"""Pipelined steps over the wire: two halves of the batch, one rendering while the other decodes, must make the
same tokens and the same audio as the plain step, where the llm decodes and renders the whole batch in turn.

The llm's scheduler runs here, in the test's process, against an acoustic service in its own process (tensors in
the Render messages, as between two GPUs). Streams join at other steps, make their own decisions (speech,
audio_eos, audio_bos, eos at other frames), one has fixed_frames, and one is cancelled mid-stream, so halves are
split again as streams join, finish and leave.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from transformers import AutoTokenizer

from services.common import stream_size
from services.common.checkpoint import resolve_checkpoint
from services.llm.engine import FINISH_EOS, FINISH_FIXED_FRAMES, LMEngine, LMStream
from services.llm.scheduler import Failed, Finished, Frame, Job, Scheduler
from services.render.values import StreamSpec
from services.render.wire import WireLink
from tests.conftest import SCRIPTS, acoustic_alone
from tests.prompts import reference_prompt

SCRIPT = (SCRIPTS / "2p_short.txt").read_text()
STREAMS = [  # seed, steps to wait before joining, fixed frames (0: the model decides)
    (0, 0, 0),
    (2, 0, 0),
    (3, 2, 0),
    (4, 5, 0),
    (7, 1, 9),
]
CANCELLED_AFTER = 4  # frames of a long fixed_frames stream before its caller goes away


@pytest.fixture(scope="module")
def acoustic_address(tiny_checkpoint, tmp_path_factory):
    """An acoustic service of its own, CPU float32, the llm's peer over gRPC."""
    with acoustic_alone(tiny_checkpoint, tmp_path_factory, "pipelined") as address:
        yield address


@pytest.fixture(scope="module")
def prompt(tiny_checkpoint) -> list[int]:
    config = resolve_checkpoint(str(tiny_checkpoint)).config
    return reference_prompt(AutoTokenizer.from_pretrained(tiny_checkpoint), config, SCRIPT, [])


def generate(
    tiny_checkpoint,
    address: str,
    prompt: list[int],
    pipelined: bool,
    streams: list[tuple[int, int, int]] = STREAMS,
    cancel: bool = True,
    expected_frames: int = 0,
    **engine,
) -> tuple[list[dict], int, LMEngine]:
    """Every stream's tokens, audio, segments and finish reason; the halves left in flight; the engine."""
    ckpt = resolve_checkpoint(str(tiny_checkpoint))

    async def main():
        lm = LMEngine(ckpt, max_streams=8, **engine)
        link = WireLink(address)
        scheduler = Scheduler(lm, link, pipelined=pipelined)
        tokens: dict[int, list[int]] = {}
        accept = lm.accept

        def recording_accept(decisions, embeddings):
            for d in decisions:
                tokens.setdefault(id(d.stream), []).append(d.token)
            return accept(decisions, embeddings)

        lm.accept = recording_accept

        def submit(seed: int, fixed_frames: int) -> Job:
            stream = LMStream(list(prompt), None, fixed_frames, max_frames=200, expected_frames=expected_frames)
            job = Job(stream, StreamSpec(scheduler.new_stream_id(), seed, 1.3, 10))
            scheduler.submit(job)
            return job

        async def one(seed: int, after: int, fixed_frames: int) -> dict:
            for _ in range(after):
                await asyncio.sleep(0.05)
            job = submit(seed, fixed_frames)
            frames, segments = [], []
            while True:
                event = await asyncio.wait_for(job.events.get(), 60)
                if isinstance(event, Frame):
                    frames.append(event.audio.numpy())
                    segments.append(event.segment)
                elif isinstance(event, Finished):
                    audio = np.concatenate(frames) if frames else np.zeros(0, np.float32)
                    return {"stream": job.stream, "audio": audio, "segments": segments, "finish": event.reason}
                elif isinstance(event, Failed):
                    raise AssertionError(event.message)

        async def cancelled() -> None:
            if not cancel:
                return
            job = submit(11, 150)
            for _ in range(CANCELLED_AFTER):
                while not isinstance(await asyncio.wait_for(job.events.get(), 60), Frame):
                    pass
            scheduler.cancel(job)

        results, _ = await asyncio.gather(asyncio.gather(*(one(*s) for s in streams)), cancelled())
        while scheduler.active:  # the cancelled stream leaves at a step boundary
            await asyncio.sleep(0.01)
        await link.close()
        for r in results:
            r["tokens"] = tokens[id(r.pop("stream"))]
        return results, scheduler.runner.pipelined_halves, lm

    return asyncio.run(main())


def assert_same_streams(plain: list[dict], piped: list[dict]) -> None:
    assert len({len(r["tokens"]) for r in plain}) > 1, "streams must end at other steps"
    assert any(max(r["segments"], default=0) >= 1 for r in plain), "some stream must speak in several segments"
    for a, b in zip(plain, piped, strict=True):
        assert b["tokens"] == a["tokens"]
        assert (b["finish"], b["segments"]) == (a["finish"], a["segments"])
        assert b["audio"].shape == a["audio"].shape and a["audio"].size > 0
        assert np.abs(b["audio"] - a["audio"]).max() <= 1e-5 * np.abs(a["audio"]).max()


def assert_all_released(lm: LMEngine) -> None:
    """Every slot and page is back: nothing was left behind by a half in flight."""
    assert lm.streams == [] and len(lm.blocks.free) == lm.blocks.usable and lm.blocks.reserved == 0


def test_pipelined_steps_make_the_plain_steps_tokens_and_audio(tiny_checkpoint, acoustic_address, prompt):
    plain, plain_halves, _ = generate(tiny_checkpoint, acoustic_address, prompt, pipelined=False)
    piped, piped_halves, lm = generate(tiny_checkpoint, acoustic_address, prompt, pipelined=True)
    assert plain_halves == 0
    assert piped_halves > 10, "the pipelined steps must have run, or this compares the plain path with itself"
    assert [r["finish"] for r in plain] == [FINISH_EOS] * 4 + [FINISH_FIXED_FRAMES]
    assert plain[-1]["audio"].shape == (STREAMS[-1][2] * 3200,)
    assert_same_streams(plain, piped)
    assert_all_released(lm)


def test_a_full_kv_pool_stops_the_pipeline_for_swaps_and_changes_no_audio(
    tiny_checkpoint, acoustic_address, prompt, monkeypatch
):
    """Pages of 4 positions and a pool that holds the prompts and small reservations but not all the streams
    grow to: streams are swapped to host memory and back, which moves slots, so no half may be in flight then."""
    monkeypatch.setattr(stream_size, "TURN_TOKENS", 0)  # reserve no room to grow: each stream outgrows its own
    reserved = -(-(len(prompt) + 1) // 4) + 2  # what admission reserves for each: the prompt and one frame
    streams = [(0, 0, 0), (2, 0, 0), (3, 0, 0)]
    pool = {"page_size": 4, "kv_pages": 1 + len(streams) * reserved + 4, "expected_frames": 1}
    plain, _, _ = generate(tiny_checkpoint, acoustic_address, prompt, False, streams, cancel=False, **pool)
    piped, piped_halves, lm = generate(tiny_checkpoint, acoustic_address, prompt, True, streams, cancel=False, **pool)
    assert lm.preemptions > 0, "the pool must run out, or this is the test above"
    assert piped_halves > 0
    assert [r["finish"] for r in piped] == [FINISH_EOS] * len(streams)
    assert_same_streams(plain, piped)
    assert_all_released(lm)
