"""Request limits every service checks the same way: the public API's and the internal ones'."""

from __future__ import annotations

import math

from services.common.frames import FRAMES_PER_SECOND, MAX_VOICE_SECONDS

DEFAULT_CFG_SCALE = 1.3
MAX_CFG_SCALE = 10.0
DEFAULT_DIFFUSION_STEPS = 10
MAX_DIFFUSION_STEPS = 100
MAX_VOICES = 4  # one per speaker
MAX_VOICE_FRAMES = math.ceil(MAX_VOICE_SECONDS * FRAMES_PER_SECOND)  # a voice's prompt positions


def cfg_scale_problem(value: float) -> str | None:
    if not (math.isfinite(value) and 0.0 < value <= MAX_CFG_SCALE):
        return f"{value} is out of range (0, {MAX_CFG_SCALE:g}]"
    return None


def diffusion_steps_problem(value: int) -> str | None:
    if not 1 <= value <= MAX_DIFFUSION_STEPS:
        return f"{value} is out of range [1, {MAX_DIFFUSION_STEPS}]"
    return None
