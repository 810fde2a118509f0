"""The KV positions a stream is expected to hold: one estimate for the gateway's admission and the llm's.

transformers' `generate()` runs three language-model branches per stream (services/llm/engine.py says how):
the positive one holds the prompt, every frame and the turn tokens between segments; the speech-CFG negative
one only the current segment; the token-CFG unconditional one every generated token.
"""

from __future__ import annotations

import math

from services.common.frames import FRAMES_PER_SECOND

# How fast a script is expected to be spoken; the estimate for admission, segment plans and `--fixed-frames auto`.
SPOKEN_WORDS_PER_SECOND = 2.5
TURN_TOKENS = 64  # positions expected beyond the speech frames, for the turn tokens between segments
SEGMENT_FRAMES = 1024  # the negative branch's expected longest segment


def expected_branch_positions(prompt_tokens: int, frames: int) -> tuple[int, int, int]:
    """(positive, negative, unconditional) positions for a prompt and the frames it is expected to make."""
    return prompt_tokens + frames + TURN_TOKENS, min(frames, SEGMENT_FRAMES), frames + TURN_TOKENS


def expected_frames(words: int) -> int:
    """Speech frames a script of this many words is expected to take."""
    # Multiplied before dividing: 7.5 / 2.5 is exact, so the result is a whole number, not one rounded up from 3w + ε.
    return math.ceil(words * FRAMES_PER_SECOND / SPOKEN_WORDS_PER_SECOND)
