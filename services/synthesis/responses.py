"""The public stream of one synthesis: frames in, SynthesizeResponse messages out.

A header, audio chunks in frame order (their bytes concatenated are a complete file in the request's format),
a progress event every PROGRESS_EVERY_FRAMES frames, then the container's trailing bytes and a summary. The
gateway feeds it the llm's frames as they come; the jobs service feeds it stored frames, so a job watched
later sends the same messages, byte for byte, as a live stream of the same audio.
"""

from __future__ import annotations

import time

import numpy as np
from vibevoice.tts.v1 import tts_pb2

from services.common.audio import StreamEncoder
from services.common.frames import FRAMES_PER_SECOND, SAMPLE_RATE, SAMPLES_PER_FRAME
from services.common.telemetry import mark

PROGRESS_EVERY_FRAMES = 8
# Formats whose bytes for a frame depend on that frame alone: a stream of them can start at any frame.
STATELESS_FORMATS = frozenset({"pcm16", "pcm_f32", "wav"})


class Responses:
    def __init__(self, header: tts_pb2.StreamHeader, encoder: str, started: float | None = None) -> None:
        self.header = header
        self.encoder = StreamEncoder(encoder, SAMPLE_RATE)
        self.pending = self.encoder.header()  # goes out with the first frame's chunk
        self.started = time.monotonic() if started is None else started
        self.frames = 0
        self.first_audio: float | None = None
        # What a frame's progress event says of the prompt: all of it, unless a live stream of several segments
        # says how far it has read.
        self.prompt_tokens_done = header.prompt_tokens

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def start_at(self, frame: int) -> None:
        """The stream's first chunk is frame `frame` (a stateless format only): what comes before is not sent."""
        if self.encoder.fmt not in STATELESS_FORMATS:
            raise ValueError(f"a {self.encoder.fmt} stream is encoded from its first frame")
        if frame > 0:
            self.pending = b""
            self.frames = frame

    def progress(self, prompt_tokens_done: int) -> tts_pb2.SynthesizeResponse:
        return tts_pb2.SynthesizeResponse(
            progress=tts_pb2.Progress(
                frames=self.frames,
                audio_seconds=self.frames / FRAMES_PER_SECOND,
                elapsed_seconds=self.elapsed(),
                max_frames=self.header.max_frames,
                prompt_tokens_done=prompt_tokens_done,
            )
        )

    def frame(
        self, index: int, segment: int, samples: np.ndarray, send: bool = True
    ) -> list[tts_pb2.SynthesizeResponse]:
        """The chunk for one frame, and a progress event when one is due; nothing when `send` is off (the frame
        is still encoded, as the codec's state carries into the next frames)."""
        data = self.pending + self.encoder.encode(samples)
        self.pending = b""
        self.frames = index + 1
        if not send:
            return []
        if self.first_audio is None:
            self.first_audio = self.elapsed()
            mark("first audio")
        out = [
            tts_pb2.SynthesizeResponse(
                audio=tts_pb2.AudioChunk(
                    frame_index=index,
                    segment_index=segment,
                    start_seconds=index * SAMPLES_PER_FRAME / SAMPLE_RATE,
                    data=data,
                )
            )
        ]
        if self.frames % PROGRESS_EVERY_FRAMES == 0:
            out.append(self.progress(self.prompt_tokens_done))
        return out

    def finish(
        self, finish_reason: str, elapsed: float | None = None, first_audio: float | None = None
    ) -> list[tts_pb2.SynthesizeResponse]:
        """The container's trailing bytes (FLAC, Ogg) and the summary; `elapsed` and `first_audio` default to
        this stream's own clock."""
        out = []
        tail = self.pending + self.encoder.finish()
        if tail:
            out.append(
                tts_pb2.SynthesizeResponse(
                    audio=tts_pb2.AudioChunk(
                        frame_index=max(self.frames - 1, 0), start_seconds=self.frames / FRAMES_PER_SECOND, data=tail
                    )
                )
            )
        elapsed = self.elapsed() if elapsed is None else elapsed
        audio_seconds = self.frames / FRAMES_PER_SECOND
        out.append(
            tts_pb2.SynthesizeResponse(
                summary=tts_pb2.Summary(
                    frames=self.frames,
                    audio_seconds=audio_seconds,
                    time_to_first_audio_seconds=(self.first_audio if first_audio is None else first_audio) or 0.0,
                    real_time_factor=elapsed / audio_seconds if audio_seconds else 0.0,
                    elapsed_seconds=elapsed,
                    finish_reason=finish_reason,
                )
            )
        )
        return out
