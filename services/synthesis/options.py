"""Checking a public request's options before any work is done: precise INVALID_ARGUMENT for each field."""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

from vibevoice.tts.v1 import tts_pb2

from services.common.errors import invalid_argument
from services.common.frames import FRAMES_PER_SECOND
from services.common.limits import (
    DEFAULT_CFG_SCALE,
    DEFAULT_DIFFUSION_STEPS,
    MAX_VOICES,
    cfg_scale_problem,
    diffusion_steps_problem,
)

# A request id is echoed in the header and written in logs: short, and nothing that could break a log line.
MAX_REQUEST_ID_CHARS = 128

FORMATS = {
    tts_pb2.AUDIO_FORMAT_UNSPECIFIED: "wav",
    tts_pb2.AUDIO_FORMAT_WAV: "wav",
    tts_pb2.AUDIO_FORMAT_PCM16: "pcm16",
    tts_pb2.AUDIO_FORMAT_FLAC: "flac",
    tts_pb2.AUDIO_FORMAT_OGG_OPUS: "ogg_opus",
    tts_pb2.AUDIO_FORMAT_PCM_F32: "pcm_f32",
}


@dataclass(frozen=True)
class Options:
    format: int  # the AudioFormat reported back (UNSPECIFIED resolved to WAV)
    encoder: str  # services.common.audio format name
    cfg_scale: float
    diffusion_steps: int
    seed: int
    max_frames: int  # 0: as many as the context allows
    fixed_frames: int


def check_request_id(request_id: str) -> None:
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise invalid_argument("request_id", f"{len(request_id)} characters; at most {MAX_REQUEST_ID_CHARS}")
    if not request_id.isprintable():
        raise invalid_argument(
            "request_id", "must be printable characters only (no newlines, tabs or other control characters)"
        )


def check_options(request: tts_pb2.SynthesizeRequest) -> Options:
    check_request_id(request.request_id)
    if request.format not in FORMATS:
        raise invalid_argument(
            "format", f"unknown output format {request.format}; use PCM16, PCM_F32, WAV, FLAC or OGG_OPUS"
        )
    if len(request.voices) > MAX_VOICES:
        raise invalid_argument("voices", f"{len(request.voices)} voices; at most {MAX_VOICES}, one per speaker")
    o = request.options
    cfg = o.cfg_scale if o.HasField("cfg_scale") else DEFAULT_CFG_SCALE
    if problem := cfg_scale_problem(cfg):
        raise invalid_argument("options.cfg_scale", problem)
    steps = o.diffusion_steps if o.HasField("diffusion_steps") else DEFAULT_DIFFUSION_STEPS
    if problem := diffusion_steps_problem(steps):
        raise invalid_argument("options.diffusion_steps", problem)
    max_frames = 0
    if o.HasField("max_audio_seconds"):
        if not (math.isfinite(o.max_audio_seconds) and o.max_audio_seconds > 0):
            raise invalid_argument("options.max_audio_seconds", f"{o.max_audio_seconds} must be above 0")
        # The field is a float32: 0.4 arrives as 0.4000000059, which must not round up to a fourth frame.
        max_frames = max(1, math.ceil(round(o.max_audio_seconds * FRAMES_PER_SECOND, 4)))
    if o.HasField("fixed_frames") and o.fixed_frames < 1:
        raise invalid_argument("options.fixed_frames", "must be at least 1 when set")
    fmt = request.format or tts_pb2.AUDIO_FORMAT_WAV
    return Options(
        format=fmt,
        encoder=FORMATS[fmt],
        cfg_scale=cfg,
        diffusion_steps=steps,
        # A request without a seed gets one, reported in the header, so its audio can be reproduced.
        seed=o.seed if o.HasField("seed") else secrets.randbits(63),
        max_frames=max_frames,
        fixed_frames=o.fixed_frames if o.HasField("fixed_frames") else 0,
    )
