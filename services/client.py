"""A small client for the public API: synthesize a script to a file, with a progress bar."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from tqdm import tqdm
from vibevoice.tts.v1 import tts_pb2, tts_pb2_grpc

from services.common.audio_files import finalize
from services.common.grpc_server import CHANNEL_OPTIONS
from services.common.stream_size import expected_frames

FORMAT_BY_SUFFIX = {
    ".wav": tts_pb2.AUDIO_FORMAT_WAV,
    ".flac": tts_pb2.AUDIO_FORMAT_FLAC,
    ".ogg": tts_pb2.AUDIO_FORMAT_OGG_OPUS,
    ".opus": tts_pb2.AUDIO_FORMAT_OGG_OPUS,
    ".pcm": tts_pb2.AUDIO_FORMAT_PCM16,
    ".f32": tts_pb2.AUDIO_FORMAT_PCM_F32,
}
# The API's formats by their services.common.audio names (the encoder's, and finalize's).
FORMAT_NAMES = {
    tts_pb2.AUDIO_FORMAT_WAV: "wav",
    tts_pb2.AUDIO_FORMAT_FLAC: "flac",
    tts_pb2.AUDIO_FORMAT_OGG_OPUS: "ogg_opus",
    tts_pb2.AUDIO_FORMAT_PCM16: "pcm16",
    tts_pb2.AUDIO_FORMAT_PCM_F32: "pcm_f32",
}


def estimate_frames(script: str) -> int:
    """Speech frames a script needs at the spoken rate (for random-weight models)."""
    words = sum(
        len(m.group(2).split())
        for line in script.splitlines()
        if (m := re.match(r"^\s*Speaker\s+(\d+)\s*:\s*(.*)$", line, re.IGNORECASE))
    )
    return max(1, expected_frames(words))


@dataclass
class Result:
    header: tts_pb2.StreamHeader | None = None
    summary: tts_pb2.Summary | None = None
    chunks: list[tts_pb2.AudioChunk] = field(default_factory=list)

    @property
    def data(self) -> bytes:
        return b"".join(c.data for c in self.chunks)


def build_request(script: str, voices: dict[int, bytes], fmt: int, **options) -> tts_pb2.SynthesizeRequest:
    return tts_pb2.SynthesizeRequest(
        text=script,
        voices=[tts_pb2.VoicePrompt(speaker=s, audio=a) for s, a in sorted(voices.items())],
        format=fmt,
        options=tts_pb2.GenerationOptions(**{k: v for k, v in options.items() if v is not None}),
    )


def synthesize(
    address: str,
    request: tts_pb2.SynthesizeRequest,
    progress: bool = False,
    metadata: list[tuple[str, str]] | None = None,
    timeout: float | None = None,
) -> Result:
    result = Result()
    with grpc.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stub = tts_pb2_grpc.TextToSpeechStub(channel)
        bar = None
        try:
            for response in stub.Synthesize(request, metadata=metadata, timeout=timeout):
                kind = response.WhichOneof("event")
                if kind == "header":
                    result.header = response.header
                    if progress:
                        # disable=None: no bar when stderr is not a terminal (logs, pipes)
                        bar = tqdm(total=response.header.max_frames, unit=" frames", desc="synthesizing", disable=None)
                elif kind == "audio":
                    result.chunks.append(response.audio)
                    if bar is not None and response.audio.data and response.audio.frame_index >= bar.n:
                        bar.update(1)
                elif kind == "summary":
                    result.summary = response.summary
        finally:
            if bar is not None:
                bar.close()
    return result


def file_format(result: Result, path: Path) -> str:
    """The container the stream carries (its header says), else the one the file's suffix names."""
    if result.header is not None and result.header.format in FORMAT_NAMES:
        return FORMAT_NAMES[result.header.format]
    return FORMAT_NAMES[FORMAT_BY_SUFFIX.get(path.suffix.lower(), tts_pb2.AUDIO_FORMAT_WAV)]


def write(result: Result, path: Path) -> None:
    """The stream as a file: its container's sizes filled in, written whole or not at all."""
    data = finalize(result.data, file_format(result, path))
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".part")
    partial.write_bytes(data)
    partial.replace(path)
