"""Checking a public request's options before any work is done: precise INVALID_ARGUMENT for each field."""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

from vibevoice.tts.v1 import tts_pb2

from services.common.errors import invalid_argument

FRAMES_PER_SECOND = 7.5
DEFAULT_CFG_SCALE = 1.3
DEFAULT_DIFFUSION_STEPS = 10
MAX_CFG_SCALE = 10.0
MAX_DIFFUSION_STEPS = 100
MAX_VOICES = 4

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


def check_options(request: tts_pb2.SynthesizeRequest) -> Options:
    if request.format not in FORMATS:
        raise invalid_argument(
            "format", f"unknown output format {request.format}; use PCM16, PCM_F32, WAV, FLAC or OGG_OPUS"
        )
    if len(request.voices) > MAX_VOICES:
        raise invalid_argument("voices", f"{len(request.voices)} voices; at most {MAX_VOICES}, one per speaker")
    o = request.options
    cfg = o.cfg_scale if o.HasField("cfg_scale") else DEFAULT_CFG_SCALE
    if not (math.isfinite(cfg) and 0.0 < cfg <= MAX_CFG_SCALE):
        raise invalid_argument("options.cfg_scale", f"{cfg} is out of range (0, {MAX_CFG_SCALE:g}]")
    steps = o.diffusion_steps if o.HasField("diffusion_steps") else DEFAULT_DIFFUSION_STEPS
    if not 1 <= steps <= MAX_DIFFUSION_STEPS:
        raise invalid_argument("options.diffusion_steps", f"{steps} is out of range [1, {MAX_DIFFUSION_STEPS}]")
    max_frames = 0
    if o.HasField("max_audio_seconds"):
        if not (math.isfinite(o.max_audio_seconds) and o.max_audio_seconds > 0):
            raise invalid_argument("options.max_audio_seconds", f"{o.max_audio_seconds} must be above 0")
        max_frames = max(1, math.ceil(o.max_audio_seconds * FRAMES_PER_SECOND))
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
