"""The model's audio clock, defined once: 24 kHz samples, 3200 of them a speech frame, 7.5 frames a second."""

from __future__ import annotations

SAMPLE_RATE = 24000
SAMPLES_PER_FRAME = 3200  # one speech frame of the model, one language-model step
FRAMES_PER_SECOND = SAMPLE_RATE / SAMPLES_PER_FRAME
FRAME_MS = SAMPLES_PER_FRAME / SAMPLE_RATE * 1000
MAX_VOICE_SECONDS = 60.0  # the longest voice prompt a request may carry
