"""WatchJob: a job's stream as Synthesize sends it, from any frame, replayed from the store and then followed live.

The chunks are made by the same code as the gateway's (services/synthesis/responses.py) from the stored
samples, so a watch that starts at frame k sends, for every frame from k on, the bytes a watch from the
start sends. Raw PCM and WAV chunks depend on their frame alone and are read from k; FLAC and Ogg carry the
codec's state from frame to frame, so those are encoded from frame 0 and only the chunks from k are sent.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from google.rpc import code_pb2, status_pb2
from vibevoice.tts.v1 import tts_pb2

from services.common.errors import RequestError, invalid_argument, status_error
from services.jobs import store as states
from services.jobs.frame_log import read_frames
from services.jobs.runner import Runner
from services.synthesis.options import FORMATS
from services.synthesis.responses import STATELESS_FORMATS, Responses

# Envoy ends a stream silent for 60 s: a watch of a queued or slow job says something more often than that.
KEEPALIVE_S = 10.0
READ_BATCH_FRAMES = 64


async def watch(runner: Runner, job_id: str, from_frame: int) -> AsyncIterator[tts_pb2.SynthesizeResponse]:
    store = runner.store
    record = store.get(job_id)
    header = tts_pb2.StreamHeader.FromString(record.header)
    if record.state == states.SUCCEEDED and from_frame > record.frames_done:
        raise invalid_argument("from_frame", f"{from_frame} is past the job's last frame ({record.frames_done - 1})")
    responses = Responses(header, FORMATS[header.format])
    next_frame = 0
    if responses.encoder.fmt in STATELESS_FORMATS:
        responses.start_at(from_frame)
        next_frame = from_frame
    yield tts_pb2.SynthesizeResponse(header=header)
    while True:
        changed = runner.signal(job_id).current()
        record = store.get(job_id)
        if record is None:
            raise status_error(code_pb2.NOT_FOUND, f"jobs/{job_id} was deleted")
        available = runner.frames(record)
        while next_frame < available:
            stop = min(available, next_frame + READ_BATCH_FRAMES)
            batch = await asyncio.to_thread(
                lambda a=next_frame, b=stop: list(read_frames(store.frames_path(job_id), a, b))
            )
            for index, segment, samples in batch:
                for response in responses.frame(index, segment, samples, send=index >= from_frame):
                    yield response
            next_frame = stop
        if record.state not in states.ACTIVE and next_frame >= record.frames_done:
            for response in _end(record, responses):
                yield response
            return
        try:
            await asyncio.wait_for(changed.wait(), KEEPALIVE_S)
        except TimeoutError:
            yield responses.progress(header.prompt_tokens if record.state == states.RUNNING else 0)


def _end(record, responses: Responses) -> list[tts_pb2.SynthesizeResponse]:
    if record.state == states.SUCCEEDED:
        elapsed = (record.end_time or 0.0) - (record.start_time or 0.0)
        return responses.finish(record.finish_reason, elapsed=elapsed, first_audio=0.0)
    if record.state == states.FAILED and record.error:
        raise RequestError(status_pb2.Status.FromString(record.error))
    raise status_error(code_pb2.CANCELLED, f"jobs/{record.job_id} was cancelled")
