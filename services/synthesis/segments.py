"""A script run segment after segment (services/text_parser/segments.py plans them), as one stream of frames.

Each segment is a Generate call of its own, in order, with the voices of its own speakers. To the caller they
are one stream: frame indices and the model's speech segment numbers go on across seams, progress counts
the whole script's prompts, a `max_audio_seconds` budget is shared by all segments (a segment gets what the
ones before it left), and nothing is added at a seam: the audio is each segment's frames, back to back.

Seeds: segment 0 runs with the request's seed, so a script of one segment is generated as before; segment
k > 0 with `segment_seed(seed, k)`. Each segment's noise (its voices' sampling, then its frames') comes from
its own seed, so a segment's audio is that of its turns sent alone with that seed, and a job can resume at
any segment.

A segment that fills its context ends there and the next one starts; the summary's reason is the last
segment's, or `max_audio_seconds` when the budget stopped the script.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from google.rpc import code_pb2, status_pb2
from vibevoice.mesh.v1 import mesh_pb2

from services.common.errors import RequestError
from services.synthesis.backends import Backends, Prepared, finish_reason
from services.synthesis.options import Options
from services.synthesis.voice_cache import Voice

SEED_BITS = 63  # the seeds the API hands out are below 2**63


def segment_seed(seed: int, index: int) -> int:
    """The seed of segment `index`: the request's for the first, else 63 bits of SHA-256 over both."""
    if index == 0:
        return seed
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> (64 - SEED_BITS)


@dataclass(frozen=True)
class SegmentStart:
    """Segment `index` starts at frame `first_frame`; its speech segments are numbered from `first_speech`."""

    index: int
    first_frame: int
    first_speech: int


@dataclass(frozen=True)
class Resume:
    """The first segment's llm stream goes on after the frames it made (a job resuming): the history its state is
    rebuilt from, and the speech segment of its last frame, numbered within that segment's stream."""

    history: mesh_pb2.ResumeHistory
    last_speech: int


@dataclass(frozen=True)
class Progress:
    prompt_tokens_done: int  # of the whole script's


@dataclass(frozen=True)
class Finished:
    frames: int
    finish_reason: str  # in the public API's words


Event = SegmentStart | Progress | mesh_pb2.GeneratedFrame | Finished


def _request(prepared: Prepared, index: int, budget_left: int) -> mesh_pb2.GenerateRequest:
    segment = prepared.segments[index]
    generate = mesh_pb2.GenerateRequest()
    generate.CopyFrom(prepared.generate)
    generate.prompt_ids.extend(segment.prompt_ids)
    generate.seed = segment_seed(prepared.generate.seed, index)
    generate.max_frames = min(segment.max_new_frames, budget_left) if budget_left else segment.max_new_frames
    generate.fixed_frames = segment.fixed_frames
    generate.expected_frames = segment.fixed_frames or min(segment.expected_frames, generate.max_frames)
    return generate


async def run_segments(
    backends: Backends,
    prepared: Prepared,
    options: Options,
    voices: list[Voice],
    time_remaining: Callable[[], float | None],
    start: SegmentStart | None = None,
    resume: Resume | None = None,
) -> AsyncIterator[Event]:
    """The script's events, from segment `start` (a job resuming; default: the first) to a Finished event. With
    `resume`, segment `start` goes on after the frames in its history instead of making them again.

    Leaving the loop early ends the segment's llm stream there. Frames come as the llm's GeneratedFrame
    messages, renumbered within the whole script.
    """
    start = start or SegmentStart(0, 0, 0)
    frames, speech = start.first_frame, start.first_speech
    prompt_done = sum(len(s.prompt_ids) for s in prepared.segments[: start.index])
    reason = ""
    for index in range(start.index, len(prepared.segments)):
        segment = prepared.segments[index]
        budget_left = max(options.max_frames - frames, 0) if options.max_frames else 0
        if options.max_frames and not budget_left and not options.fixed_frames:
            reason = "max_audio_seconds"
            break
        yield SegmentStart(index, frames, speech)
        if options.fixed_frames and not segment.fixed_frames:  # its words got no whole frame of the total
            prompt_done += len(segment.prompt_ids)
            continue
        generate = _request(prepared, index, budget_left)
        await backends.encode_voices(generate, list(segment.voice_order), voices, time_remaining())
        done: mesh_pb2.GenerateDone | None = None
        last_speech = -1
        if resume is not None and index == start.index:
            generate.resume.CopyFrom(resume.history)
            last_speech = resume.last_speech
        async for event in backends.generate(generate, time_remaining()):
            kind = event.WhichOneof("event")
            if kind == "progress":
                yield Progress(prompt_done + event.progress.prompt_tokens_done)
            elif kind == "frame":
                frame = event.frame
                last_speech = frame.segment_index
                frame.index += frames
                frame.segment_index += speech
                yield frame
            elif kind == "done":
                done = event.done
        if done is None:
            raise RequestError(status_pb2.Status(code=code_pb2.UNAVAILABLE, message="the llm's stream ended early"))
        frames += done.frames
        speech += last_speech + 1
        prompt_done += len(segment.prompt_ids)
        reason = finish_reason(done.finish_reason, budget_left, segment.max_new_frames)
        if reason == "max_audio_seconds":
            break
    yield Finished(frames, reason)
